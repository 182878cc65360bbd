"""What Foundry's bookkeeping costs next to the work it schedules.

Times, as a user runs them (`foundry sync --recipe R --json` in a fresh process each):
  full     the whole recipe built from nothing (fresh store and Dagster instance)
  noop     a sync right after it: everything fresh, nothing runs
  edit     one mix weight changed: mixture, checkpoint, eval_report, data_stats rebuild
  revert   the edit undone: those assets are cache hits, nothing recomputes
  rehydrate  a brand-new Dagster instance over the same store: every asset a cache hit
and prints each with its ratio to the full build.

    python benchmarks/sync_overhead.py [--recipe recipes/demo.yaml] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent


def run_sync(recipe: Path, store: Path, home: Path) -> tuple[float, dict]:
    env = dict(os.environ, FOUNDRY_STORE=str(store), DAGSTER_HOME=str(home), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "assets.cli", "sync", "--recipe", str(recipe), "--json"],
                          cwd=PROJECT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"sync failed:\n{proc.stderr[-4000:]}")
    return seconds, json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(PROJECT / "recipes" / "demo.yaml"))
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temp dir, removed)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="foundry-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    store, home = work / "store", work / "home"
    base = yaml.safe_load(Path(args.recipe).read_text())
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base))

    rows = []
    t, rep = run_sync(recipe, store, home)
    rows.append(("full", t, rep))
    t, rep = run_sync(recipe, store, home)
    rows.append(("noop", t, rep))
    edited = json.loads(json.dumps(base))
    first = next(iter(edited["mixture"]["weights"]))
    edited["mixture"]["weights"][first] *= 0.5
    recipe.write_text(yaml.safe_dump(edited))
    t, rep = run_sync(recipe, store, home)
    rows.append(("edit", t, rep))
    recipe.write_text(yaml.safe_dump(base))
    t, rep = run_sync(recipe, store, home)
    rows.append(("revert", t, rep))
    t, rep = run_sync(recipe, store, work / "home2")
    rows.append(("rehydrate", t, rep))

    full = rows[0][1]
    print(f"recipe: {args.recipe}   machine: {os.cpu_count()} cores")
    print(f"{'sync':<10} {'seconds':>8} {'vs full':>8}  {'ran':>4} {'hits':>5} {'untouched':>9}")
    for name, seconds, rep in rows:
        print(f"{name:<10} {seconds:8.1f} {seconds / full:8.3f}  {len(rep['ran']):>4} {len(rep['cache_hit']):>5} "
              f"{len(rep['untouched']):>9}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
