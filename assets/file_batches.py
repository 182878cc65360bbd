"""Batches of source files: which partition of `filtered_<source>` a file belongs to.

A source with `batches: N` deals its files into N buckets by a hash of each file's name (its
path under the source folder). A file's bucket depends on its own name only, so adding or
removing a file changes the members of one batch and no other; a target batch *size* would
need re-dealing as the folder grows, moving files between batches. Empty buckets are no
partitions.

Outputs stay per file (keyed by the file's sha256, as without batches): a batch partition
builds the outputs its members miss and records an index of them, whose key is a function of
the members' names and content hashes. So a changed file is curated again alone, curated_<source>
gathers the same per-file outputs with or without batches (batching is in no hash), and turning
batching on, off or to another N re-extracts nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

BATCH_PREFIX = "batch-"


def batch_name(index: int, batches: int) -> str:
    width = max(3, len(str(batches - 1)))
    return f"{BATCH_PREFIX}{index:0{width}d}"


def batch_of(name: str, batches: int) -> str:
    """The batch of the file named `name`: a stable hash (never Python's salted hash())."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return batch_name(int.from_bytes(digest[:8], "big") % batches, batches)


def group_names(names: Iterable[str], batches: int | None) -> dict[str, list[str]]:
    """Partition key -> the file names in it, sorted; without batches, one partition per file."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name if batches is None else batch_of(name, batches), []).append(name)
    return {key: sorted(members) for key, members in sorted(groups.items())}


def members_digest(members: Iterable[tuple[str, str]]) -> str:
    """Identity of a batch: its members' (name, sha256), in name order."""
    h = hashlib.sha256()
    for name, sha in sorted(members):
        h.update(f"{name}\0{sha}\n".encode())
    return h.hexdigest()[:16]
