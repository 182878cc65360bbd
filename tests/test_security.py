"""Security: recipes load with a safe YAML loader, no code deserializes files it did not write
with pickle (or torch.load without weights_only=True), and the UI listens on 127.0.0.1 only.

Secrets: rephrase's API key has its own test (tests/test_rephrase.py: the key is nowhere but
the request header); tests/test_fault_drills.py runs every drill with secret-looking variables
in the environment and finds them in no output, log, stats database or Dagster instance.
"""

from __future__ import annotations

import ast
import signal
from pathlib import Path

import pytest

from assets.recipe import RecipeError, load_recipe

PROJECT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("assets", "dataprep", "training", "evaluation", "kernels", "benchmarks")

# (file, call) pairs allowed to deserialize with pickle, and why
ALLOWED = {
    ("dataprep/pdf.py", "pickle.loads"): "frames on the pipe to the PDF worker process Foundry itself starts; "
                                         "both ends are this module, no file is ever read",
}


# --------------------------------------------------------------------- recipes


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
    "!!python/name:os.system",
])
def test_recipe_with_a_python_tag_is_rejected_and_runs_nothing(tmp_path, tag):
    marker = tmp_path / "executed"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"name: evil\ndescription: {tag.format(marker=marker)}\n"
                      "sources: {}\nmixture: {weights: {}, total_tokens: 1}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    message = str(err.value)
    assert str(recipe) in message and "tags that build Python objects are refused" in message and "python/" in message
    assert not marker.exists()


# --------------------------------------------------------------------- unsafe deserialization

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
PICKLE_CALLS = {"load", "loads", "Unpickler", "open"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unsafe_calls(source: str) -> list[tuple[int, str, str]]:
    """(line, call, why) for each call that may run code hidden in data, or reach wider than asked."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, attr = name.rpartition(".")
        if head.split(".")[-1] in PICKLE_MODULES and attr in PICKLE_CALLS:
            found.append((node.lineno, name, "pickle-family deserialization"))
        elif attr == "load" and head.split(".")[-1] == "torch" and not _keyword_true(node, "weights_only"):
            found.append((node.lineno, name, "torch.load without weights_only=True"))
        elif attr in ("load", "load_all", "full_load", "unsafe_load", "unsafe_load_all") and head == "yaml":
            found.append((node.lineno, name, "yaml loader other than safe_load"))
        elif attr == "load" and _keyword_true(node, "allow_pickle"):
            found.append((node.lineno, name, "numpy load with allow_pickle=True"))
        elif _keyword_true(node, "trust_remote_code"):
            found.append((node.lineno, name, "trust_remote_code=True"))
        elif _keyword_true(node, "shell"):
            found.append((node.lineno, name, "subprocess with shell=True"))
        elif isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
            found.append((node.lineno, name, "eval/exec"))
    return sorted(found)


def test_the_scanner_finds_each_kind_of_unsafe_call():
    planted = """
import pickle, torch, yaml, numpy as np, subprocess
pickle.load(open("f", "rb"))
pickle.Unpickler(f).load()
torch.load("model.pt")
torch.load("model.pt", weights_only=False)
yaml.load(text, Loader=yaml.Loader)
yaml.unsafe_load(text)
np.load("x.npy", allow_pickle=True)
Auto.from_pretrained(p, trust_remote_code=True)
subprocess.run(cmd, shell=True)
eval(text)
torch.load("model.pt", weights_only=True)
yaml.safe_load(text)
np.load("x.npy", mmap_mode="r")
model.eval()
"""
    whys = [why for _, _, why in unsafe_calls(planted)]
    assert whys == ["pickle-family deserialization", "pickle-family deserialization",
                    "torch.load without weights_only=True", "torch.load without weights_only=True",
                    "yaml loader other than safe_load", "yaml loader other than safe_load",
                    "numpy load with allow_pickle=True", "trust_remote_code=True", "subprocess with shell=True",
                    "eval/exec"]


def test_no_code_deserializes_untrusted_data():
    files = sorted(p for d in SOURCE_DIRS for p in (PROJECT / d).rglob("*.py"))
    assert len(files) > 40  # the scan sees the code base, not an empty folder
    found, allowed_seen = [], set()
    for path in files:
        rel = path.relative_to(PROJECT).as_posix()
        for line, call, why in unsafe_calls(path.read_text(encoding="utf-8")):
            if (rel, call) in ALLOWED:
                allowed_seen.add((rel, call))
            else:
                found.append(f"{rel}:{line}: {call} ({why})")
    assert found == []
    assert allowed_seen == set(ALLOWED), "an allowed exception no longer exists: remove it from ALLOWED"


# --------------------------------------------------------------------- the UI


def test_ui_listens_on_loopback_unless_told_otherwise(monkeypatch, tmp_path):
    """`foundry ui` hands Dagster 127.0.0.1 by default (the server itself is not started here;
    tests/test_cli.py starts it for real)."""
    from assets import cli

    launched: list[list[str]] = []

    class NotStarted:
        pid = -1

        def wait(self, timeout=None) -> int:
            return 0

    def fake_popen(cmd, **kwargs):
        launched.append(list(cmd))
        return NotStarted()

    monkeypatch.setattr(cli.subprocess, "Popen", fake_popen)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        args = cli.build_parser().parse_args(["ui", "--port", "3999"])
        assert args.func(args) == 0
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    (cmd,) = launched
    flag = next(f for f in ("-h", "--host") if f in cmd)
    assert cmd[cmd.index(flag) + 1] == "127.0.0.1"
    assert "0.0.0.0" not in cmd
    assert getattr(args, "host", "127.0.0.1") == "127.0.0.1"  # a --host option, if any, defaults to loopback
