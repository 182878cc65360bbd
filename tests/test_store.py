"""ArtifactStore: atomic publication, manifests, content-derived data versions, crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from assets.settings import PROJECT_ROOT
from assets.store import MANIFEST, ArtifactStore, Manifest, atomic_write_json

KEY = "0123456789abcdef"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fill(dir_: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        p = dir_ / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def visible(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


# --------------------------------------------------------------------- publication


def test_build_publishes_with_manifest(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    content = {"a.txt": b"hello\n", "sub/b.bin": bytes(range(256)) * 3, "empty": b""}
    with store.build("curated", KEY, spec={"shards": 2}) as b:
        assert b.dir.parent == tmp_path / "store" / "curated"
        assert b.dir.name.startswith(f".tmp-{KEY}-{os.getpid()}-")
        fill(b.dir, content)
        b.counts["documents"] = 3
        # nothing visible while building
        assert store.lookup("curated", KEY) is None
        assert not store.path("curated", KEY).exists()
    final = tmp_path / "store" / "curated" / KEY
    assert visible(tmp_path / "store" / "curated") == [KEY]  # temp dir renamed away
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()) == [
        MANIFEST, "a.txt", "empty", "sub/b.bin",
    ]
    raw = json.loads((final / MANIFEST).read_text())
    assert raw["kind"] == "curated" and raw["key"] == KEY
    assert raw["spec"] == {"shards": 2}
    assert raw["counts"] == {"documents": 3}
    assert raw["files"] == {name: {"bytes": len(data), "sha256": sha(data)} for name, data in content.items()}

    m = store.lookup("curated", KEY)
    assert isinstance(m, Manifest)
    assert m.path == final
    assert m.files == raw["files"]
    assert m.total_bytes == 6 + 768 + 0
    assert b.manifest == m
    assert len(m.data_version) == 16


def test_lookup_none_for_unknown_key_and_dir_without_manifest(tmp_path):
    store = ArtifactStore(tmp_path)
    assert store.lookup("curated", KEY) is None
    (tmp_path / "curated" / KEY).mkdir(parents=True)
    (tmp_path / "curated" / KEY / "x").write_text("partial")
    assert store.lookup("curated", KEY) is None


def test_exception_inside_build_publishes_nothing(tmp_path):
    store = ArtifactStore(tmp_path)

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with store.build("tokenized", KEY) as b:
            fill(b.dir, {"tokens.npy": b"x" * 100})
            tmp_dir = b.dir
            assert tmp_dir.is_dir()
            raise Boom("halfway")
    assert not tmp_dir.exists()
    assert store.lookup("tokenized", KEY) is None
    assert visible(tmp_path / "tokenized") == []

    # KeyboardInterrupt (a BaseException) cleans up as well
    with pytest.raises(KeyboardInterrupt):
        with store.build("tokenized", KEY) as b:
            tmp_dir = b.dir
            raise KeyboardInterrupt
    assert not tmp_dir.exists() and visible(tmp_path / "tokenized") == []

    # and the key can still be built afterwards
    with store.build("tokenized", KEY) as b:
        fill(b.dir, {"tokens.npy": b"ok"})
    assert store.lookup("tokenized", KEY).files == {"tokens.npy": {"bytes": 2, "sha256": sha(b"ok")}}


def test_second_writer_of_same_key_keeps_first(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.build("mixture", KEY) as b:
        fill(b.dir, {"index.npy": b"first"})
    with store.build("mixture", KEY) as b:
        fill(b.dir, {"index.npy": b"second"})
    assert (tmp_path / "mixture" / KEY / "index.npy").read_bytes() == b"first"
    assert visible(tmp_path / "mixture") == [KEY]
    assert b.manifest.files["index.npy"]["sha256"] == sha(b"first")


# --------------------------------------------------------------------- data versions


def test_data_version_depends_only_on_file_contents(tmp_path):
    store = ArtifactStore(tmp_path)
    files = {"docs/00000.jsonl": b'{"id": 1}\n', "decisions.parquet": b"PAR1..."}
    with store.build("curated", "aaaaaaaaaaaaaaaa", spec={"a": 1}) as b:
        fill(b.dir, files)
        b.counts["kept"] = 1
    time.sleep(0.01)
    with store.build("tokenized", "bbbbbbbbbbbbbbbb", spec={"b": 2}) as b:
        fill(b.dir, files)
        b.counts["other"] = 99
    m1 = store.lookup("curated", "aaaaaaaaaaaaaaaa")
    m2 = store.lookup("tokenized", "bbbbbbbbbbbbbbbb")
    assert (m1.spec, m1.counts) != (m2.spec, m2.counts)
    assert m1.created != m2.created
    assert m1.data_version == m2.data_version

    expected = hashlib.sha256(
        "".join(f"{n}\0{sha(files[n])}\n" for n in sorted(files)).encode()
    ).hexdigest()[:16]
    assert m1.data_version == expected

    with store.build("curated", "cccccccccccccccc") as b:
        fill(b.dir, {**files, "docs/00000.jsonl": b'{"id": 2}\n'})  # one byte differs
    assert store.lookup("curated", "cccccccccccccccc").data_version != m1.data_version

    with store.build("curated", "dddddddddddddddd") as b:
        fill(b.dir, {"docs/00001.jsonl": files["docs/00000.jsonl"], "decisions.parquet": files["decisions.parquet"]})
    assert store.lookup("curated", "dddddddddddddddd").data_version != m1.data_version  # names count too


# --------------------------------------------------------------------- atomic writes


def test_atomic_write_json_leaves_no_temp_files(tmp_path):
    target = tmp_path / "deep" / "dir" / "state.json"
    atomic_write_json(target, {"b": [1, 2], "a": "x"})
    assert target.read_text() == '{\n  "a": "x",\n  "b": [\n    1,\n    2\n  ]\n}\n'
    atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 2}
    assert visible(target.parent) == ["state.json"]


def test_atomic_write_json_failure_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("assets.store.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert visible(tmp_path) == ["state.json"]

    monkeypatch.undo()
    with pytest.raises(TypeError):
        atomic_write_json(target, {"v": object()})  # not serializable: nothing touched
    assert json.loads(target.read_text()) == {"v": 1}
    assert visible(tmp_path) == ["state.json"]


# --------------------------------------------------------------------- crash safety

CHILD = r"""
import sys, time
from pathlib import Path
from assets.store import ArtifactStore
store = ArtifactStore(Path(sys.argv[1]))
with store.build("curated", sys.argv[2]) as b:
    (b.dir / "docs").mkdir()
    (b.dir / "docs" / "00000.jsonl").write_text('{"id": "half"}\n')
    print("ready", b.dir.name, flush=True)
    time.sleep(120)
"""


def _child_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def test_sigkill_during_build_leaves_nothing_visible_and_next_build_cleans_up(tmp_path):
    root = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), KEY],
        cwd=PROJECT_ROOT, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready "), proc.stderr.read() if proc.poll() is not None else line
        tmp_name = line.split()[1]
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    kind_dir = root / "curated"
    assert tmp_name.startswith(f".tmp-{KEY}-{proc.pid}-")
    assert visible(kind_dir) == [tmp_name]  # only the abandoned temp dir
    assert (kind_dir / tmp_name / "docs" / "00000.jsonl").is_file()
    store = ArtifactStore(root)
    assert store.lookup("curated", KEY) is None
    assert not store.path("curated", KEY).exists()

    with store.build("curated", KEY) as b:
        assert not (kind_dir / tmp_name).exists()  # removed as soon as the new build starts
        fill(b.dir, {"docs/00000.jsonl": b'{"id": "whole"}\n'})
    assert visible(kind_dir) == [KEY]
    m = store.lookup("curated", KEY)
    assert m.files == {"docs/00000.jsonl": {"bytes": 16, "sha256": sha(b'{"id": "whole"}\n')}}


def test_temp_dir_of_live_process_is_not_removed(tmp_path):
    store = ArtifactStore(tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / "curated" / f".tmp-{KEY}-{sleeper.pid}-abc123"
        live.mkdir(parents=True)
        other_key = tmp_path / "curated" / ".tmp-fedcba9876543210-999999999-abc123"
        other_key.mkdir()
        with store.build("curated", KEY) as b:
            fill(b.dir, {"x": b"1"})
        assert live.is_dir()  # its owner still runs
        assert other_key.is_dir()  # another key's temp dir is not this build's business
        assert store.lookup("curated", KEY) is not None
    finally:
        sleeper.kill()
        sleeper.wait()
    with store.build("curated", "1111111111111111") as b:
        pass
    assert live.is_dir()  # only builds of the same key clean up
    with store.build("curated", KEY) as b:
        pass
    assert not live.exists()  # owner gone: cleaned by the next build of its key
