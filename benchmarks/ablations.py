"""Run one of the example ablation grids end to end and print its report.

    python benchmarks/ablations.py data|optimizer|moe_lb|PATH [--keep DIR] [--quick] [--seeds 0,1]
                                   [--overrides '{training: {steps: 20}}']

The grid runs as a user runs it — `foundry compare FILE --out DIR` in a fresh process — on a fresh
store and Dagster instance (in a temp dir unless --keep), and the script prints the report, the
wall time, and how many assets ran or were cache hits. Reduced settings go through the ablation
file itself: the script writes a copy whose top-level `overrides` take --quick's preset and then
--overrides (or $FOUNDRY_ABLATION_OVERRIDES, YAML), so they enter every run's identity like any edit.
--quick (a tiny model, a few steps, a few eval items, two seeds) checks the machinery in a few
minutes; its numbers say nothing about the variants.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from assets.recipe import merge_overrides  # noqa: E402  (the project root is on the path only now)

QUICK = {
    "sources": {"fineweb": {"limit": 60}, "commoncrawl": {"limit": 15}},
    "tokenizer": {"vocab_size": 400, "sample_docs_per_source": 60},
    "mixture": {"total_tokens": 30_000},
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_hidden": 64, "seq_len": 64},
    "training": {"steps": 6, "warmup_steps": 1, "log_every": 2},
    "evals": {"max_items": 8, "heldout_max_tokens": 1000},
}


def grid_file(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return path.resolve()
    return PROJECT / "ablations" / f"{name}.yaml"


def derived_ablation(source: Path, work: Path, quick: bool, overrides: dict, seeds: list[int] | None) -> Path:
    """A copy of the ablation file with reduced settings in its top-level overrides."""
    data = yaml.safe_load(source.read_text())
    data["base"] = str((source.parent / data["base"]).resolve())
    extra = merge_overrides(QUICK if quick else {}, overrides)
    if extra:
        data["overrides"] = merge_overrides(data.get("overrides") or {}, extra)
    if quick:
        data["name"] = f"{data['name']}_quick"
        data["description"] = "QUICK SETTINGS (a machinery check; the numbers mean nothing). " + data.get("description", "")
        data["seeds"] = (data.get("seeds") or [0])[:2]
    if seeds is not None:
        data["seeds"] = seeds
    out = work / source.name
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="data, optimizer, moe_lb (ablations/<name>.yaml) or an ablation file")
    parser.add_argument("--keep", help="work in this folder (store, Dagster home, report) and keep it")
    parser.add_argument("--quick", action="store_true", help="tiny settings: proves the machinery, not the variants")
    parser.add_argument("--seeds", help="comma-separated seeds instead of the file's")
    parser.add_argument("--overrides", default=os.environ.get("FOUNDRY_ABLATION_OVERRIDES", ""),
                        help="YAML mapping merged into every run (default: $FOUNDRY_ABLATION_OVERRIDES)")
    args = parser.parse_args()

    source = grid_file(args.grid)
    if not source.is_file():
        sys.exit(f"no ablation file {source}")
    overrides = yaml.safe_load(args.overrides) if args.overrides.strip() else {}
    if not isinstance(overrides, dict):
        sys.exit(f"--overrides must be a YAML mapping, got {args.overrides!r}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    work = Path(args.keep or tempfile.mkdtemp(prefix="foundry-ablation-"))
    work.mkdir(parents=True, exist_ok=True)
    ablation = derived_ablation(source, work, args.quick, overrides, seeds)
    env = dict(os.environ, FOUNDRY_STORE=str(work / "store"), DAGSTER_HOME=str(work / "home"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("FOUNDRY_ABLATIONS", None)
    print(f"ablation {source.name} -> {ablation} (work dir {work})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "assets.cli", "compare", str(ablation), "--out", str(work / "report")]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a killed benchmark stops its grid too
    with tempfile.TemporaryFile("w+") as report:
        proc = subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=report, stderr=subprocess.PIPE, text=True)
        log = []
        try:
            for line in proc.stderr:  # progress as it happens: a grid runs for many minutes
                print(line, end="", file=sys.stderr, flush=True)
                log.append(line)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        report.seek(0)
        text = report.read()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return proc.returncode
    print(text)
    counts = re.search(r"compare: (\d+) ran, (\d+) cache hits", "".join(log))
    ran, hits = (int(counts.group(1)), int(counts.group(2))) if counts else (None, None)
    print(f"wall: {seconds:.1f} s for {source.name}{' (quick)' if args.quick else ''}; "
          f"{ran} assets ran, {hits} cache hits; report and loss curves in {work / 'report'}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
        print("(work dir removed; --keep DIR keeps the store and report)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
