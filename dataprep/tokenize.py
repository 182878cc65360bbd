"""Tokenizer training and document tokenization.

The tokenizer is trained on a seeded sample of the *raw* sources, so tightening a filter
never retrains it. Tokenized output is numpy arrays (memory-mapped by the trainer):

    tokens.npy   1-D uint16/uint32, every document followed by the EOS token
    offsets.npy  1-D int64, n_docs + 1 entries; document i is tokens[offsets[i]:offsets[i+1]]
    documents.parquet  doc_id and token count of each document, in the same order

With a held-out share, the documents whose hash rank (`heldout_rank`) falls under it go to a
`heldout/` folder of the same three files instead, ordered by rank, so the mixture (which
reads only the top-level arrays) never sees them and a token cap on the held-out set takes a
uniform sample. The rank depends on the document id alone: adding documents to a source
never moves an existing one across the split.
"""

from __future__ import annotations

import hashlib
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


HELDOUT_DIR = "heldout"


def heldout_rank(doc_id: str) -> float:
    """A stable, uniform number in [0, 1) for a document id: held out when below the share."""
    digest = hashlib.sha256(b"foundry-heldout\x00" + doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_id(doc: dict) -> str:
    """The id a document is split by. A rephrased document carries its original's id as
    `source_id`, so the rewrite of a held-out document is held out too."""
    value = doc.get("source_id") or doc.get("id")
    if value is None or value == "":
        raise ValueError(f"document without an id (keys: {sorted(doc)}): cannot place it in the held-out split")
    return str(value)


class _TokenArrays:
    """Token arrays of documents as they are encoded, written as tokens/offsets/documents."""

    def __init__(self, dtype: type) -> None:
        self.dtype = dtype
        self.chunks: list[np.ndarray] = []
        self.ids: list[str] = []

    def add(self, doc_id: str, token_ids: list[int], eos: int) -> None:
        arr = np.empty(len(token_ids) + 1, dtype=self.dtype)
        arr[:-1] = token_ids
        arr[-1] = eos
        self.chunks.append(arr)
        self.ids.append(doc_id)

    def write(self, out_dir: Path, order: list[int] | None = None) -> dict[str, int]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        order = list(range(len(self.chunks))) if order is None else order
        chunks = [self.chunks[i] for i in order]
        lengths = [c.size for c in chunks]
        tokens = np.concatenate(chunks) if chunks else np.empty(0, dtype=self.dtype)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        out_dir.mkdir(parents=True, exist_ok=True)
        np.save(out_dir / "tokens.npy", tokens)
        np.save(out_dir / "offsets.npy", offsets)
        pq.write_table(pa.table({"doc_id": [self.ids[i] for i in order], "tokens": lengths}),
                       out_dir / "documents.parquet")
        return {"documents": len(lengths), "tokens": int(tokens.size)}


def tokenize_documents(
    docs: Iterable[dict], tokenizer: Tokenizer, out_dir: Path, batch_size: int = 256,
    progress: Progress | None = None, heldout_share: float = 0.0,
) -> dict[str, int]:
    """Encode documents (batched, Rust-parallel) and write tokens/offsets/doc ids.
    Documents whose `heldout_rank` is below `heldout_share` go to `out_dir/heldout/` instead
    (counted as heldout_documents/heldout_tokens; with a share of 0 there is no such folder).
    `progress` is told the documents done after each batch, and finished at the end."""
    if not 0 <= heldout_share < 1:
        raise ValueError(f"heldout_share must be in [0, 1), got {heldout_share}")
    eos = tokenizer.token_to_id(EOS)
    dtype = np.uint16 if tokenizer.get_vocab_size() < 2**16 else np.uint32
    train, heldout = _TokenArrays(dtype), _TokenArrays(dtype)
    ranks: list[float] = []
    batch: list[dict] = []
    done = 0

    def flush() -> None:
        nonlocal done
        encoded = tokenizer.encode_batch([d["text"] for d in batch], add_special_tokens=False)
        for doc, enc in zip(batch, encoded, strict=True):
            rank = heldout_rank(split_id(doc)) if heldout_share > 0 else 1.0
            if rank < heldout_share:
                heldout.add(str(doc.get("id")), enc.ids, eos)
                ranks.append(rank)
            else:
                train.add(str(doc.get("id")), enc.ids, eos)
        done += len(batch)
        batch.clear()
        if progress is not None:
            progress.update(done)

    for doc in docs:
        batch.append(doc)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    counts = train.write(out_dir)
    if heldout_share > 0:
        held = heldout.write(out_dir / HELDOUT_DIR, order=sorted(range(len(ranks)), key=ranks.__getitem__))
        counts |= {"heldout_documents": held["documents"], "heldout_tokens": held["tokens"]}
    if progress is not None:
        progress.finish()
    return counts
