"""Tokenizer training and document tokenization.

The tokenizer is trained on a seeded sample of the *raw* sources, so tightening a filter
never retrains it. Tokenized output is numpy arrays (memory-mapped by the trainer):

    tokens.npy   1-D uint16/uint32, every document followed by the EOS token
    offsets.npy  1-D int64, n_docs + 1 entries; document i is tokens[offsets[i]:offsets[i+1]]
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .progress import Progress
from .readers import DROP_KEY, iter_records

EOS = "<|endoftext|>"


def sample_texts(sources: list[dict], per_source: int, seed: int) -> list[str]:
    """Reservoir-sample usable documents from each raw source (deterministic for a seed)."""
    texts: list[str] = []
    for src in sources:
        rng = random.Random(f"{seed}:{src['data_version']}")
        reservoir: list[str] = []
        records = iter_records([Path(f) for f in src["files"]], src["kind"], src["text_key"], src["id_key"], src["limit"])
        seen = 0
        for doc in records:
            if DROP_KEY in doc.metadata:
                continue
            seen += 1
            if len(reservoir) < per_source:
                reservoir.append(doc.text)
            else:
                j = rng.randrange(seen)
                if j < per_source:
                    reservoir[j] = doc.text
        if src["kind"] == "warc":
            reservoir = extract_html(reservoir)  # sample pages first, extract only the sample
        texts.extend(reservoir)
    return texts


def extract_html(pages: list[str]) -> list[str]:
    """Main text of HTML pages with datatrove's Trafilatura settings; pages with none are left out."""
    from datatrove.pipeline.extractors import Trafilatura

    extractor = Trafilatura(deduplicate=False)  # its dedup cache would make the sample order-dependent
    texts = []
    for html in pages:
        try:
            text = extractor.extract(html)
        except Exception:  # a page trafilatura cannot parse is simply not sampled
            continue
        if text:
            texts.append(text)
    return texts


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization), EOS as the only special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    if tok.token_to_id(EOS) is None:
        raise ValueError(f"{path}: tokenizer has no {EOS} token (needed as document separator)")
    return tok


def iter_curated_docs(docs_dir: Path) -> Iterator[dict]:
    """Kept documents of a curated output, in shard order."""
    for path in sorted(docs_dir.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def tokenize_documents(
    docs: Iterable[dict], tokenizer: Tokenizer, out_dir: Path, batch_size: int = 256,
    progress: Progress | None = None,
) -> dict[str, int]:
    """Encode documents (batched, Rust-parallel) and write tokens/offsets/doc ids.
    `progress` is told the documents done after each batch, and finished at the end."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    eos = tokenizer.token_to_id(EOS)
    dtype = np.uint16 if tokenizer.get_vocab_size() < 2**16 else np.uint32
    chunks: list[np.ndarray] = []
    lengths: list[int] = []
    ids: list[str] = []
    batch: list[dict] = []

    def flush() -> None:
        for doc, enc in zip(batch, tokenizer.encode_batch([d["text"] for d in batch], add_special_tokens=False), strict=True):
            arr = np.empty(len(enc.ids) + 1, dtype=dtype)
            arr[:-1] = enc.ids
            arr[-1] = eos
            chunks.append(arr)
            lengths.append(arr.size)
            ids.append(str(doc.get("id")))
        batch.clear()
        if progress is not None:
            progress.update(len(lengths))

    for doc in docs:
        batch.append(doc)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    tokens = np.concatenate(chunks) if chunks else np.empty(0, dtype=dtype)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(out_dir / "tokens.npy", tokens)
    np.save(out_dir / "offsets.npy", offsets)
    pq.write_table(pa.table({"doc_id": ids, "tokens": lengths}), out_dir / "documents.parquet")
    if progress is not None:
        progress.finish()
    return {"documents": len(lengths), "tokens": int(tokens.size)}
