"""Held-out language-modelling loss and bits per byte on a plain-text file.

The text is read as one document: EOS (the training document separator) is put in front,
so every text token is a target. The token stream is cut into non-overlapping windows of
``seq_len`` targets (window k feeds tokens [k*L, k*L+L) and predicts [k*L+1, k*L+L+1)), so
each token is predicted exactly once and the context restarts at every window boundary.
Only the first ``max_tokens`` targets are scored.

bits_per_byte = (sum of target NLL in nats) / ln 2 / (UTF-8 bytes of the target tokens).
For a byte-level BPE the bytes of each token are read from its byte-level symbols, so the
byte count is exact (it equals the UTF-8 length of the text the targets cover).

`heldout_loss_documents` scores tokenized documents (a source's held-out split) the same way,
each document on its own as if it were the text file: EOS in front, its text tokens as
targets (its closing EOS is not scored and has no bytes), windows restarting per document.
So its figures equal `heldout_loss` run on each document's text, summed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

EOS_TOKEN = "<|endoftext|>"


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level mapping: each of the 256 byte values is shown as one
    printable unicode character (printable latin-1 bytes as themselves, the rest shifted to
    code points from 256 up)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    char_to_byte = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            char_to_byte[chr(256 + shifted)] = b
            shifted += 1
    return char_to_byte


def token_byte_lengths(tokenizer) -> list[int]:
    """UTF-8 byte length of the text each token id stands for."""
    alphabet = _byte_level_alphabet()
    added = {tok.content for tok in tokenizer.get_added_tokens_decoder().values()}
    lengths = []
    for i in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        tok = tokenizer.id_to_token(i)
        if tok is None:
            lengths.append(0)
        elif tok in added or not all(ch in alphabet for ch in tok):
            # special/added tokens match raw text; non-byte-level symbols: count their text
            lengths.append(len(tok.encode("utf-8")))
        else:
            lengths.append(len(tok))  # one symbol per byte
    return lengths


def _tokenize_prefix(tokenizer, text: str, n_needed: int) -> list[int]:
    """Token ids of (a prefix of) text, at least n_needed of them when the text has that many.

    Encodes growing line-aligned prefixes rather than the whole file; ids near the cut may
    differ from whole-text tokenisation, so a margin of tokens past n_needed is required.
    """
    margin = 64
    n_chars = max(4096, 8 * (n_needed + margin))
    while True:
        if n_chars >= len(text):
            return tokenizer.encode(text, add_special_tokens=False).ids
        cut = text.rfind("\n", 0, n_chars)
        prefix = text[: cut + 1] if cut > 0 else text[:n_chars]
        ids = tokenizer.encode(prefix, add_special_tokens=False).ids
        if len(ids) >= n_needed + margin:
            return ids
        n_chars *= 2


def _check_lengths(model: torch.nn.Module, seq_len: int, max_tokens: int) -> None:
    if seq_len <= 0 or max_tokens <= 0:
        raise ValueError(f"seq_len and max_tokens must be positive (got {seq_len}, {max_tokens})")
    model_max = int(model.config.max_seq_len)
    if seq_len > model_max:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {model_max}")


def _stream_nll(model: torch.nn.Module, streams: Sequence[torch.Tensor], seq_len: int, batch_size: int) -> float:
    """Summed next-token NLL (nats) over token streams: every token but a stream's first is a target.

    Each stream is cut into non-overlapping windows of seq_len targets; windows of the same
    length (from any stream) run as one batch, so no padding enters a forward pass.
    """
    by_length: dict[int, list[tuple[int, int]]] = {}
    for i, stream in enumerate(streams):
        n_targets = len(stream) - 1
        for start in range(0, n_targets, seq_len):
            by_length.setdefault(min(seq_len, n_targets - start), []).append((i, start))
    device = next(model.parameters()).device
    total = 0.0
    for length, windows in sorted(by_length.items(), reverse=True):
        for b in range(0, len(windows), batch_size):
            group = windows[b : b + batch_size]
            inputs = torch.stack([streams[i][s : s + length] for i, s in group]).to(device)
            targets = torch.stack([streams[i][s + 1 : s + 1 + length] for i, s in group]).to(device)
            logits, _ = model(inputs)
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total += float(nll)
    return total


def _summary(total_nll: float, n_targets: int, n_bytes: int) -> dict:
    return {
        "loss": total_nll / n_targets,
        "bits_per_byte": total_nll / math.log(2) / n_bytes if n_bytes else float("nan"),
        "tokens": n_targets,
        "bytes": n_bytes,
    }


@torch.inference_mode()
def heldout_loss(
    model: torch.nn.Module,
    tokenizer,
    text_path: Path,
    seq_len: int,
    max_tokens: int,
    batch_size: int = 8,
) -> dict:
    """Mean next-token loss (nats) and bits per byte over the first max_tokens targets of text_path.

    Returns {"loss", "bits_per_byte", "tokens" (targets scored), "bytes" (UTF-8 bytes they cover)}.
    """
    _check_lengths(model, seq_len, max_tokens)
    text = Path(text_path).read_text(encoding="utf-8")
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    prefix = [eos_id] if eos_id is not None else []
    ids = prefix + _tokenize_prefix(tokenizer, text, max_tokens + 1)
    n_targets = min(max_tokens, len(ids) - 1)
    if n_targets <= 0:
        raise ValueError(f"{text_path}: not enough text to score")
    stream = torch.tensor(ids[: n_targets + 1], dtype=torch.long)

    byte_len = token_byte_lengths(tokenizer)
    n_bytes = sum(byte_len[t] for t in ids[1 : n_targets + 1])
    return _summary(_stream_nll(model, [stream], seq_len, batch_size), n_targets, n_bytes)


def load_token_documents(folder: Path) -> list[np.ndarray]:
    """Documents of a tokenized folder (tokens.npy + offsets.npy, as dataprep.tokenize writes
    them; each document ends with EOS), in file order. Errors name the file."""
    folder = Path(folder)
    arrays = {}
    for name in ("tokens.npy", "offsets.npy"):
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (is this a tokenized output with a held-out split?)")
        arrays[name] = np.load(path, mmap_mode="r")
    tokens, offsets = arrays["tokens.npy"], arrays["offsets.npy"]
    if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(tokens) \
            or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{folder / 'offsets.npy'}: not the document boundaries of {folder / 'tokens.npy'} "
                         f"({len(tokens)} tokens)")
    return [np.asarray(tokens[offsets[i] : offsets[i + 1]]) for i in range(len(offsets) - 1)]


@torch.inference_mode()
def heldout_loss_documents(
    model: torch.nn.Module,
    tokenizer,
    documents: Sequence[np.ndarray | Sequence[int]],
    seq_len: int,
    max_tokens: int,
    batch_size: int = 8,
) -> dict:
    """Loss and bits per byte over tokenized documents, each scored as `heldout_loss` scores a
    text file (see the module docstring), until max_tokens targets: the document that reaches
    the cap is cut there, later ones are left out.

    Returns {"loss", "bits_per_byte", "tokens", "bytes", "documents" (documents scored)}.
    """
    _check_lengths(model, seq_len, max_tokens)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"the tokenizer has no {EOS_TOKEN} token (the document separator)")
    byte_len = token_byte_lengths(tokenizer)
    streams: list[torch.Tensor] = []
    n_targets = n_bytes = 0
    for doc in documents:
        if n_targets >= max_tokens:
            break
        ids = [int(t) for t in doc]
        if ids and ids[-1] == eos_id:
            ids = ids[:-1]  # the closing separator: not text, not scored
        ids = ids[: max_tokens - n_targets]
        if not ids:
            continue
        streams.append(torch.tensor([eos_id, *ids], dtype=torch.long))
        n_targets += len(ids)
        n_bytes += sum(byte_len[t] for t in ids)
    if n_targets == 0:
        raise ValueError("no held-out tokens to score (no documents, or only empty ones)")
    return _summary(_stream_nll(model, streams, seq_len, batch_size), n_targets, n_bytes) | {"documents": len(streams)}
