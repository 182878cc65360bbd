"""Content-addressed artifact store.

Layout: `<root>/<kind>/<key>/` holding the output files and `_manifest.json`. An output is
built in a hidden temp directory beside its final place, the manifest is written last, and
the directory is published with one atomic rename. A process killed half way leaves only a
temp directory, which no reader looks at and the next build of that key (or the next
`foundry sync`, through `remove_abandoned`) removes.

One writer per key: a build holds an exclusive claim on its key (`flock` on
`<root>/locks/<kind>/<key>.lock`, released by the kernel when the holder dies), so a second
process that wants the same output waits and then finds it published (a cache hit).

Tests only: FOUNDRY_TEST_PUBLISH_DELAY="tokenized=3,curated=1" holds a finished build of that
kind unpublished for that many seconds, so a fault drill can SIGKILL it at the worst moment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.atomic import atomic_path  # the one temp-then-rename writer

MANIFEST = "_manifest.json"
TMP_PREFIX = ".tmp-"
LOCKS = "locks"  # <root>/locks/<kind>/<key>.lock: one builder per output key
# what a killed build can leave: <kind>/.tmp-<key>-<pid>-<rand>[.run.json|.work|.batch|.logs], and the stats
# database's temp file at the root
_TMP_IN_KIND = re.compile(rf"^{re.escape(TMP_PREFIX)}(?P<key>[0-9a-f]+)-(?P<pid>\d+)-")
_TMP_AT_ROOT = re.compile(rf"^{re.escape(TMP_PREFIX)}.*\.(?P<pid>\d+)(\.wal)?$")


class StoreWriteError(OSError):
    """The store cannot be written where it must be (the message names the path)."""


# claims this process holds: lock path -> [open file, depth] (a claim is re-entrant in its process)
_HELD: dict[str, list] = {}
_HELD_LOCK = threading.Lock()


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
        with self.claim(kind, key):
            _writable_dir(final.parent)
            self._remove_abandoned(final.parent, key)
            tmp = final.parent / f"{TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            try:
                tmp.mkdir()
            except OSError as err:
                raise StoreWriteError(f"cannot create a build folder in the store: {tmp}: {err.strerror or err}") from err
            with self._building(kind, key, tmp, spec) as build:
                yield build

    @contextlib.contextmanager
    def _building(self, kind: str, key: str, tmp: Path, spec: Any) -> Iterator["Build"]:
        final = self.path(kind, key)
        build = Build(dir=tmp, spec=spec)
        start = time.time()
        try:
            yield build
            _test_publish_delay(kind)
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


    @contextlib.contextmanager
    def claim(self, kind: str, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the exclusive claim on one output key (across processes; re-entrant in this one).

        A second claimant blocks until the first releases it or dies; `on_wait` is called once
        if it has to wait. Callers look the key up again once they hold it.
        """
        lock = self.root / LOCKS / kind / f"{key}.lock"
        name = str(lock)
        with _HELD_LOCK:
            held = _HELD.get(name)
            if held is not None:
                held[1] += 1
        if held is not None:
            try:
                yield
            finally:
                with _HELD_LOCK:
                    held[1] -= 1
            return
        _writable_dir(lock.parent)
        f = open(lock, "a")  # noqa: SIM115 - held across the yield
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(f, fcntl.LOCK_EX)
            with _HELD_LOCK:
                _HELD[name] = [f, 1]
            try:
                yield
            finally:
                with _HELD_LOCK:
                    del _HELD[name]
        finally:
            f.close()  # closing the last descriptor releases the flock

    def _claimed_elsewhere(self, kind: str, key: str) -> bool:
        """Does some live process hold this key's claim? (never blocks)"""
        lock = self.root / LOCKS / kind / f"{key}.lock"
        if str(lock) in _HELD:
            return True
        if not lock.is_file():
            return False
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    def remove_abandoned(self) -> list[Path]:
        """Remove what killed builds left anywhere in the store: temp dirs (and the files beside
        them) whose process is gone and whose key nobody claims. Returns what was removed."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for entry in self.root.glob(f"{TMP_PREFIX}*"):
            m = _TMP_AT_ROOT.match(entry.name)
            if m and not _pid_alive(int(m["pid"])):
                _remove(entry)
                removed.append(entry)
        for kind_dir in self.root.iterdir():
            if kind_dir.name == LOCKS or not kind_dir.is_dir():
                continue
            for entry in kind_dir.glob(f"{TMP_PREFIX}*"):
                m = _TMP_IN_KIND.match(entry.name)
                if m is None or _pid_alive(int(m["pid"])) or self._claimed_elsewhere(kind_dir.name, m["key"]):
                    continue
                _remove(entry)
                removed.append(entry)
        return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _writable_dir(path: Path) -> None:
    """mkdir -p, with an error that says which path is in the way."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a directory" if blocker else (err.strerror or str(err))
        raise StoreWriteError(f"cannot write to the store at {path}: {why}") from err
    if not path.is_dir():
        raise StoreWriteError(f"cannot write to the store at {path}: not a directory")


def _test_publish_delay(kind: str) -> None:
    """FOUNDRY_TEST_PUBLISH_DELAY (tests only, see the module docstring)."""
    spec = os.environ.get("FOUNDRY_TEST_PUBLISH_DELAY")
    if not spec:
        return
    for item in spec.split(","):
        name, _, seconds = item.partition("=")
        if name.strip() == kind:
            time.sleep(float(seconds))


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
