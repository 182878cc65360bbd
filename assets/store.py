"""Content-addressed artifact store.

Layout: `<root>/<kind>/<key>/` holding the output files and `_manifest.json`. An output is
built in a hidden temp directory beside its final place, the manifest is written last, and
the directory is published with one atomic rename. A process killed half way leaves only a
temp directory, which no reader looks at and the next build of that key removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.atomic import atomic_path  # the one temp-then-rename writer

MANIFEST = "_manifest.json"
TMP_PREFIX = ".tmp-"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so readers see either the old content or the new, never a torn one."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@dataclass(frozen=True)
class Manifest:
    kind: str
    key: str
    files: dict[str, dict]  # relative path -> {"bytes": n, "sha256": hex}
    counts: dict[str, Any]
    spec: Any
    seconds: float
    created: float
    path: Path = field(compare=False)

    @property
    def data_version(self) -> str:
        """Derived from file contents only: an identical rebuild gives the same version."""
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(f"{name}\0{self.files[name]['sha256']}\n".encode())
        return digest.hexdigest()[:16]

    @property
    def total_bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def lookup(self, kind: str, key: str) -> Manifest | None:
        """The published output for this key, or None. Only a manifest makes it visible."""
        final = self.path(kind, key)
        manifest_file = final / MANIFEST
        if not manifest_file.is_file():
            return None
        data = json.loads(manifest_file.read_text())
        return Manifest(
            kind=data["kind"],
            key=data["key"],
            files=data["files"],
            counts=data.get("counts", {}),
            spec=data.get("spec"),
            seconds=data.get("seconds", 0.0),
            created=data.get("created", 0.0),
            path=final,
        )

    @contextlib.contextmanager
    def build(self, kind: str, key: str, spec: Any = None) -> Iterator["Build"]:
        """Yield a temp dir to fill; on clean exit publish it atomically with its manifest."""
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        self._remove_abandoned(final.parent, key)
        tmp = final.parent / f"{TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir()
        build = Build(dir=tmp, spec=spec)
        start = time.time()
        try:
            yield build
            files = {}
            for p in sorted(tmp.rglob("*")):
                if p.is_file() and p.name != MANIFEST:
                    files[p.relative_to(tmp).as_posix()] = {
                        "bytes": p.stat().st_size,
                        "sha256": file_sha256(p),
                    }
            manifest = {
                "kind": kind,
                "key": key,
                "files": files,
                "counts": build.counts,
                "spec": spec,
                "seconds": round(time.time() - start, 3),
                "created": time.time(),
            }
            atomic_write_json(tmp / MANIFEST, manifest)  # last: marks the output complete
            try:
                os.rename(tmp, final)
            except OSError:
                # Another writer published the same key first; same key means same output.
                if (final / MANIFEST).is_file():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        result = self.lookup(kind, key)
        assert result is not None
        build.manifest = result

    def _remove_abandoned(self, parent: Path, key: str) -> None:
        """Delete temp dirs of this key left by processes that no longer run (e.g. SIGKILL)."""
        for stale in parent.glob(f"{TMP_PREFIX}{key}-*"):
            try:
                pid = int(stale.name[len(TMP_PREFIX) + len(key) + 1 :].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)  # e.g. a run config written beside the temp dir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Build:
    dir: Path
    spec: Any = None
    counts: dict[str, Any] = field(default_factory=dict)
    manifest: Manifest | None = None
