"""Packed token stream over a document mixture.

On-disk contract (written by the tokenize/mix assets):

* tokenized source dir: ``tokens.npy`` (1-D uint16, or uint32 for vocab >= 65536; each
  document ends with EOS) and ``offsets.npy`` (1-D int64, n_docs + 1 entries; document i is
  ``tokens[offsets[i]:offsets[i+1]]``).
* mixture dir: ``index.npy`` (int64 [N, 2] rows of (source_id, doc_id), already shuffled,
  repeats allowed) and ``sources.json`` (``[{"id", "name", "tokenized"}, ...]``).

The documents, in index order, are concatenated into one stream (packing; EOS tokens already
separate them) which is cut into non-overlapping windows of seq_len + 1 tokens; window w gives
x = w[:-1] and y = w[1:]. The tail shorter than a window is dropped, so every epoch has the same
windows, and a window is fully determined by its global index (useful for resuming and for
sharding across ranks). Token arrays are memory-mapped; per index row only three int64 numbers
are held in memory. `next_batch_with_sources` also gives the source id of every input token (for
per-source statistics such as MoE expert load).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

TOKEN_DTYPES = (np.dtype(np.uint16), np.dtype(np.uint32))


@dataclass
class _Source:
    id: int
    name: str
    tokens: np.ndarray  # memmap, 1-D uint16/uint32
    offsets: np.ndarray  # memmap, 1-D int64, n_docs + 1
    offsets_path: Path

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"missing file: {path}")
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: cannot read as .npy: {e}") from e


def _open_source(entry: dict, sources_path: Path) -> _Source:
    for key in ("id", "name", "tokenized"):
        if key not in entry:
            raise ValueError(f"{sources_path}: source entry {entry!r} lacks the field {key!r}")
    if not isinstance(entry["id"], int) or isinstance(entry["id"], bool):
        raise ValueError(f"{sources_path}: source 'id' must be an integer, got {entry['id']!r}")
    tok_dir = Path(entry["tokenized"])
    if not tok_dir.is_absolute():  # the contract says absolute; be lenient and anchor to the mixture
        tok_dir = sources_path.parent / tok_dir
    tokens_path, offsets_path = tok_dir / "tokens.npy", tok_dir / "offsets.npy"
    tokens, offsets = _load_npy(tokens_path), _load_npy(offsets_path)

    if tokens.ndim != 1 or tokens.dtype not in TOKEN_DTYPES:
        raise ValueError(f"{tokens_path}: expected a 1-D uint16/uint32 array, got {tokens.dtype} shape {tokens.shape}")
    if offsets.ndim != 1 or offsets.dtype != np.int64 or len(offsets) < 1:
        raise ValueError(f"{offsets_path}: expected a non-empty 1-D int64 array, got {offsets.dtype} shape {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != len(tokens):
        raise ValueError(
            f"{offsets_path}: must start at 0 and end at len(tokens)={len(tokens)}, "
            f"got {int(offsets[0])} .. {int(offsets[-1])}"
        )
    if np.any(np.diff(offsets) < 0):
        raise ValueError(f"{offsets_path}: offsets must be non-decreasing")
    return _Source(entry["id"], str(entry["name"]), tokens, offsets, offsets_path)


class MixtureTokenStream:
    """Deterministic, endlessly repeating stream of (x, y) LongTensor batches of shape [B, seq_len].

    With world_size > 1 each global batch spans batch_size * world_size consecutive windows and
    this rank takes its own batch_size slice of them.
    """

    def __init__(
        self,
        mixture_dir: Path,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int | None = None,
    ):
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.mixture_dir = Path(mixture_dir)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.vocab_size = vocab_size
        self.window_len = seq_len + 1

        self.sources = self._load_sources()
        self._row_source, self._row_start, self._row_end_in_stream = self._load_index()
        self._total_tokens = int(self._row_end_in_stream[-1]) if len(self._row_end_in_stream) else 0
        self.windows_per_epoch = self._total_tokens // self.window_len
        if self.windows_per_epoch == 0:
            raise ValueError(
                f"{self.mixture_dir}: mixture has {self._total_tokens} tokens, fewer than one window "
                f"of seq_len + 1 = {self.window_len}"
            )
        self.windows_consumed = 0  # global count, across all ranks
        self._warned_wrap = False

    # -- loading / validation -------------------------------------------------------------

    def _load_sources(self) -> dict[int, _Source]:
        path = self.mixture_dir / "sources.json"
        if not path.is_file():
            raise ValueError(f"missing file: {path}")
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from e
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"{path}: expected a non-empty JSON list of source objects")
        sources: dict[int, _Source] = {}
        for entry in entries:
            src = _open_source(entry, path)
            if src.id in sources:
                raise ValueError(f"{path}: duplicate source id {src.id}")
            sources[src.id] = src
        return sources

    def _load_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per index row: source id, first token offset in its source, and end position in the stream."""
        path = self.mixture_dir / "index.npy"
        index = _load_npy(path)
        if index.ndim != 2 or index.shape[1] != 2 or not np.issubdtype(index.dtype, np.integer):
            raise ValueError(f"{path}: expected an integer array of shape [N, 2], got {index.dtype} shape {index.shape}")
        if len(index) == 0:
            raise ValueError(f"{path}: index is empty")
        src_ids = np.asarray(index[:, 0], dtype=np.int64)  # [N]
        doc_ids = np.asarray(index[:, 1], dtype=np.int64)  # [N]

        unknown = np.setdiff1d(np.unique(src_ids), np.fromiter(self.sources, dtype=np.int64))
        if len(unknown):
            raise ValueError(
                f"{path}: source_id(s) {unknown[:10].tolist()} not in {self.mixture_dir / 'sources.json'} "
                f"(known ids: {sorted(self.sources)})"
            )

        starts = np.empty(len(index), dtype=np.int64)
        lengths = np.empty(len(index), dtype=np.int64)
        for sid, src in self.sources.items():
            rows = src_ids == sid
            docs = doc_ids[rows]
            bad = docs[(docs < 0) | (docs >= src.n_docs)]
            if len(bad):
                raise ValueError(
                    f"{path}: doc_id(s) {bad[:10].tolist()} out of range for source {sid} ({src.name!r}), "
                    f"which has {src.n_docs} documents per {src.offsets_path}"
                )
            begin = np.asarray(src.offsets[docs], dtype=np.int64)
            starts[rows] = begin
            lengths[rows] = np.asarray(src.offsets[docs + 1], dtype=np.int64) - begin
        return src_ids, starts, np.cumsum(lengths)

    # -- the stream -----------------------------------------------------------------------

    @property
    def total_tokens(self) -> int:
        """Tokens in one pass over the index (before dropping the incomplete last window)."""
        return self._total_tokens

    @property
    def epochs_completed(self) -> int:
        return self.windows_consumed // self.windows_per_epoch

    def window(self, k: int) -> np.ndarray:
        """Window k (global index, wraps every epoch) as an int64 array of seq_len + 1 tokens."""
        return self._window(k, with_sources=False)[0]

    def _window(self, k: int, with_sources: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Window k's tokens and, if asked, the source id of each token (both int64 [seq_len + 1])."""
        pos = (k % self.windows_per_epoch) * self.window_len  # start position in the stream
        out = np.empty(self.window_len, dtype=np.int64)
        sources = np.empty(self.window_len, dtype=np.int64) if with_sources else None
        # First row whose document ends after `pos`; side="right" skips empty documents.
        row = int(np.searchsorted(self._row_end_in_stream, pos, side="right"))
        filled = 0
        while filled < self.window_len:
            end = int(self._row_end_in_stream[row])
            doc_len = end - (int(self._row_end_in_stream[row - 1]) if row else 0)
            into_doc = pos + filled - (end - doc_len)
            take = min(doc_len - into_doc, self.window_len - filled)
            src = self.sources[int(self._row_source[row])]
            begin = int(self._row_start[row]) + into_doc
            out[filled : filled + take] = src.tokens[begin : begin + take]
            if sources is not None:
                sources[filled : filled + take] = src.id
            filled += take
            row += 1
        return out, sources

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, _ = self._next_batch(with_sources=False)
        return x, y  # [B, T] each

    def next_batch_with_sources(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like next_batch, plus the source id of each input token: x, y, source, all [B, T] int64.

        source[b, t] is the id (sources.json "id"; names in `source_names`) of the source whose
        document x[b, t] comes from. The stream advances exactly as next_batch does.
        """
        return self._next_batch(with_sources=True)

    @property
    def source_names(self) -> dict[int, str]:
        """Source id -> name, from sources.json."""
        return {sid: src.name for sid, src in self.sources.items()}

    def _next_batch(self, with_sources: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        first = self.windows_consumed + self.rank * self.batch_size
        pairs = [self._window(first + i, with_sources) for i in range(self.batch_size)]
        windows = np.stack([w for w, _ in pairs])  # [B, T+1]
        self.windows_consumed += self.batch_size * self.world_size
        if not self._warned_wrap and self.windows_consumed > self.windows_per_epoch:
            self._warned_wrap = True
            log.warning(
                "mixture %s exhausted after %d windows (%d tokens); wrapping around and repeating data",
                self.mixture_dir, self.windows_per_epoch, self._total_tokens,
            )
        if self.vocab_size is not None and windows.max() >= self.vocab_size:
            raise ValueError(
                f"{self.mixture_dir}: token id {int(windows.max())} >= model vocab_size {self.vocab_size}"
            )
        t = torch.from_numpy(windows)
        source = torch.from_numpy(np.stack([s for _, s in pairs])[:, :-1].copy()) if with_sources else None  # [B, T]
        return t[:, :-1].contiguous(), t[:, 1:].contiguous(), source  # x, y: [B, T]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict:
        """The stream position, with the window layout it counts in (checked when loaded back)."""
        return {"windows_consumed": self.windows_consumed, "windows_per_epoch": self.windows_per_epoch,
                "window_len": self.window_len}

    def load_state_dict(self, state: dict) -> None:
        # A position only means the same data over the same windows: refuse one from another layout.
        for key in ("windows_per_epoch", "window_len"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"{self.mixture_dir}: saved stream position counts windows with {key}={state[key]}, "
                    f"but this stream has {key}={getattr(self, key)} (another mixture or seq_len)"
                )
        self.windows_consumed = int(state["windows_consumed"])
