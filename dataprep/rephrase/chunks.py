"""Split long documents into chunks that fit a model's context.

Cuts fall on paragraph boundaries where possible, then on sentence ends, then on spaces;
only a single word longer than the limit is cut mid-word. Every chunk is at most
`max_chars` long and the chunks, joined back with the separators that were removed,
cover the whole text in order.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_chunks(text: str, max_chars: int) -> list[str]:
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 (got {max_chars})")
    text = text.strip()
    if not text:
        return []
    if len(text) <= max_chars:
        return [text]
    pieces = _pieces(text, max_chars)
    chunks: list[str] = []
    current = ""
    for sep, piece in pieces:
        if current and len(current) + len(sep) + len(piece) <= max_chars:
            current += sep + piece
        else:
            if current:
                chunks.append(current)
            current = piece
    if current:
        chunks.append(current)
    return chunks


def _pieces(text: str, max_chars: int) -> list[tuple[str, str]]:
    """(separator before it, piece) with every piece <= max_chars, finest split only where needed."""
    out: list[tuple[str, str]] = []
    for i, para in enumerate(p for p in re.split(r"\n\s*\n", text) if p.strip()):
        sep = "\n\n" if i else ""
        para = para.strip()
        if len(para) <= max_chars:
            out.append((sep, para))
            continue
        for j, sentence in enumerate(s for s in _SENTENCE_END.split(para) if s):
            s_sep = sep if j == 0 else " "
            if len(sentence) <= max_chars:
                out.append((s_sep, sentence))
                continue
            for k, word in enumerate(sentence.split()):
                w_sep = s_sep if k == 0 else " "
                while len(word) > max_chars:
                    out.append((w_sep, word[:max_chars]))
                    word, w_sep = word[max_chars:], ""
                out.append((w_sep, word))
    return out
