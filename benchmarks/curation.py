"""Curation throughput: Foundry against the same chain written in bare datatrove.

The input is the sample web data (FineWeb sample + commoncrawl_raw) repeated, each copy with
distinct ids, to --docs documents, written once as --files jsonl.gz shards (documents dealt
round-robin, so every file holds the same mix). Both sides run the same filters with the same
parameters and the same number of tasks (one per file), at each worker count:

  (a) bare     benchmarks/bare_datatrove.py: JsonlReader -> datatrove filters -> JsonlWriter
  (b) foundry  `foundry_materialize`: `foundry sync` of a one-source recipe on a fresh Dagster
               instance and store: raw_web -> filtered_web (a partition per file, all curated
               in one datatrove run, decision rows, per-step exclusions) -> curated_web (gathers
               the partitions; MinHash off, as the bare chain has none). Its quality filters
               run on the fused path (the default, `foundry-fused`) and/or the plain datatrove
               classes (`foundry-datatrove`): --path fused|datatrove|both, i.e.
               $FOUNDRY_CURATION_PATH in the run's process.

Runs alternate (a, b, a, b, ...; the order flips every repeat), each in a fresh process (spaCy
loaded before the clock starts), and the best of --repeats is kept. Printed: docs/s of each
side, each Foundry side / bare, and each side's 2-worker / 1-worker scaling.

    python benchmarks/curation.py [--docs 20000] [--files 8] [--repeats 2] [--workers 1 2]
                                  [--chain default|web] [--path fused|datatrove|both] [--json] [--keep DIR]
    python benchmarks/curation.py --profile [--docs 2000]   # cProfile, in-process, workers=1

datatrove logs every task to stderr; `2>/dev/null` leaves the table (its logs stay in the task log files).
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import io
import json
import multiprocessing
import os
import pstats
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))  # `benchmarks.*` when run as a script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(PROJECT / ".cache" / "hf"))  # datatrove's URL block lists unpack here

from assets.recipe import CurationSpec  # noqa: E402
from benchmarks.bare_datatrove import run_bare  # noqa: E402
from dataprep.fused_filters import PATH_ENV  # noqa: E402

DATA = Path(os.environ.get("FOUNDRY_DATA_ROOT", PROJECT.parent / "shared" / "data")) / "web"
SAMPLES = [DATA / "fineweb_sample" / "fineweb_legal_dedup.jsonl.gz",
           *sorted(p for p in (DATA / "commoncrawl_raw").glob("*.json*.gz"))]
CHAINS = {
    "default": CurationSpec().model_dump(mode="json"),
    "web": CurationSpec(url_filter={}, language={}).model_dump(mode="json"),
}


# --------------------------------------------------------------------- input


def write_inputs(folder: Path, docs: int, files: int) -> list[Path]:
    """The samples, shuffled once, repeated to `docs` documents (copy k > 0 gets ids '<id>#k'), dealt to files."""
    records: list[dict] = []
    for path in SAMPLES:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f if line.strip())
    random.Random(0).shuffle(records)  # any prefix (--docs below 3,527) is the same mix of sources
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"part_{i:03d}.jsonl.gz" for i in range(files)]
    outs = [gzip.open(p, "wt", encoding="utf-8", compresslevel=1) for p in paths]
    try:
        for i in range(docs):
            copy, rec = divmod(i, len(records))
            record = dict(records[rec])
            if copy:
                record["id"] = f"{record['id']}#{copy}"
            outs[i % files].write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        for out in outs:
            out.close()
    return paths


# --------------------------------------------------------------------- the two sides


def bare_run(files: list[Path], curation: dict[str, Any], workers: int, tmp: Path) -> float:
    """Seconds for the bare datatrove pipeline (tasks = files; output written uncompressed like Foundry's)."""
    out = tmp / "bare"
    t0 = time.perf_counter()
    run_bare(files, curation, out, tasks=len(files), workers=workers, logging_dir=tmp / "bare.logs",
             compression=None)
    return time.perf_counter() - t0


def foundry_materialize(files: list[Path], curation: dict[str, Any], workers: int, tmp: Path,
                        path: str = "fused") -> float:
    """Seconds for Foundry to materialize a one-source recipe over `files` through Dagster.

    What a user runs: `foundry sync` of raw_<s> -> filtered_<s> (one partition per file,
    curated in one datatrove run) -> curated_<s>, on a fresh Dagster instance and store, with
    one task per file like the bare side. MinHash is off: the bare chain has no dedup.
    `path`: the quality filters' path ($FOUNDRY_CURATION_PATH, an execution knob).
    """
    import dataclasses

    from dagster import DagsterInstance

    from assets.definitions import build_definitions
    from assets.factory import recipe_assets
    from assets.recipe import parse_recipe
    from assets.sync import sync

    folder = files[0].parent
    assert all(f.parent == folder for f in files), "the benchmark's files must share one folder"
    os.environ["FOUNDRY_STORE"] = str(tmp / "foundry-store")
    os.environ["FOUNDRY_WORKERS"] = str(workers)
    os.environ[PATH_ENV] = path
    home = tmp / "foundry-home"
    home.mkdir(parents=True, exist_ok=True)
    recipe = parse_recipe({
        "name": "bench",
        "sources": {"web": {"kind": "jsonl", "path": str(folder), "shards": 1,
                            "curation": {**curation, "minhash": None}}},
        "mixture": {"weights": {"web": 1.0}, "total_tokens": 1000},
    }, origin="benchmark")
    full = recipe_assets(recipe, "benchmark")
    wanted = {p.key for p in full.plans.values() if p.name.endswith("_web")} - {
        p.key for p in full.plans.values() if p.name == "tokenized_web"}
    trimmed = dataclasses.replace(full, plans={k: p for k, p in full.plans.items() if k in wanted})
    instance = DagsterInstance.local_temp(str(home))
    try:
        t0 = time.perf_counter()
        report = sync(build_definitions([full]), [trimmed], instance)
        seconds = time.perf_counter() - t0
    finally:
        instance.dispose()
    if report.error:
        raise RuntimeError(f"Foundry sync failed: {report.error}")
    return seconds


def foundry_fused(files: list[Path], curation: dict[str, Any], workers: int, tmp: Path) -> float:
    return foundry_materialize(files, curation, workers, tmp, path="fused")


def foundry_datatrove(files: list[Path], curation: dict[str, Any], workers: int, tmp: Path) -> float:
    return foundry_materialize(files, curation, workers, tmp, path="datatrove")


SIDES = {"bare": bare_run, "foundry-fused": foundry_fused, "foundry-datatrove": foundry_datatrove}
PATH_SIDES = {"fused": ["foundry-fused"], "datatrove": ["foundry-datatrove"],
              "both": ["foundry-fused", "foundry-datatrove"]}


def kept_count(side: str, tmp: Path) -> int:
    """Documents a side wrote (checked after timing, so reading them costs nothing above)."""
    def count(folder: Path) -> int:
        return sum(1 for part in folder.glob("*.jsonl") for line in part.open("rb") if line.strip())
    if side == "bare":
        return count(tmp / "bare")
    return sum(count(d) for d in sorted((tmp / "foundry-store" / "curated").glob("*/docs")))


def warm_up() -> None:
    """Load spaCy once in this process (workers=1 runs in-process and would charge it to the first run)."""
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    load_word_tokenizer("en").word_tokenize("warm up")


def measured_run(side: str, files: list[Path], curation: dict[str, Any], workers: int, tmp: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one side's run, spaCy already loaded.

    The benchmark calls it in a fresh process per run: spaCy's string store and datatrove's
    caches grow with every document a process tokenizes, so in-process runs would carry state
    from one side's run into the other's.
    """
    warm_up()
    cpu0 = time.process_time()
    seconds = SIDES[side](files, curation, workers, tmp)
    return seconds, time.process_time() - cpu0


def run_fresh(side: str, files: list[Path], curation: dict[str, Any], workers: int, tmp: Path) -> tuple[float, float]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measured_run, side, files, curation, workers, tmp).result()


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --------------------------------------------------------------------- benchmark


def benchmark(files: list[Path], docs: int, curation: dict, workers_list: list[int], repeats: int,
              work: Path, log=print, in_process: bool = False, foundry_sides: list[str] | None = None,
              ) -> dict[str, Any]:
    foundry_sides = foundry_sides or PATH_SIDES["fused"]
    sides = ["bare", *foundry_sides]
    runs: list[dict[str, Any]] = []
    kept: dict[str, int] | None = None
    for rep in range(repeats):
        for workers in workers_list:
            order = sides if rep % 2 == 0 else sides[::-1]
            for side in order:
                tmp = work / f"{side}-w{workers}-r{rep}"
                shutil.rmtree(tmp, ignore_errors=True)
                load = load_average()
                # cpu: CPU seconds of the process that ran the executor: all of the work at
                # workers=1 (tasks run in-process), unaffected by other programs competing for the
                # cores; at workers>1 only the parent's share.
                seconds, cpu = (measured_run if in_process else run_fresh)(side, files, curation, workers, tmp)
                runs.append({"side": side, "workers": workers, "repeat": rep, "seconds": round(seconds, 3),
                             "docs_per_s": round(docs / seconds, 2), "parent_cpu_s": round(cpu, 3),
                             "load_before": load, "load_after": load_average()})
                log(f"  {side:17s} workers={workers} repeat={rep}: {seconds:7.1f} s  {docs / seconds:8.1f} docs/s"
                    f"  (CPU here {cpu:.1f} s; 1-min load before/after: {load} / {load_average()})")
            counts = {side: kept_count(side, work / f"{side}-w{workers}-r{rep}") for side in sides}
            if len(set(counts.values())) != 1:
                log(f"  WARNING: kept documents differ: {counts}")
            kept = kept or counts
            for side in order:
                shutil.rmtree(work / f"{side}-w{workers}-r{rep}", ignore_errors=True)
    best = {side: {w: max(r["docs_per_s"] for r in runs if r["side"] == side and r["workers"] == w)
                   for w in workers_list} for side in sides}
    over_bare = {side: {w: round(best[side][w] / best["bare"][w], 3) for w in workers_list} for side in foundry_sides}
    result: dict[str, Any] = {"docs": docs, "files": len(files), "tasks": len(files), "repeats": repeats,
                              "fresh_process_per_run": not in_process, "sides": sides,
                              "kept": kept, "best_docs_per_s": best, "over_bare": over_bare,
                              "foundry_over_bare": over_bare[foundry_sides[0]], "runs": runs,
                              "cpus": os.cpu_count()}
    if 1 in workers_list:  # docs per CPU-second at workers=1: the work each side does, whatever else runs
        cpu = {side: min(r["parent_cpu_s"] for r in runs if r["side"] == side and r["workers"] == 1) for side in sides}
        result["docs_per_cpu_s_1_worker"] = {side: round(docs / cpu[side], 2) for side in sides}
        result["over_bare_cpu_1_worker"] = {side: round(cpu["bare"] / cpu[side], 3) for side in foundry_sides}
    checks: dict[str, Any] = {}
    if "foundry-fused" in over_bare:
        checks["fused_at_least_2x_bare"] = {w: over_bare["foundry-fused"][w] >= 2.0 for w in workers_list}
    if "foundry-datatrove" in over_bare:
        checks["datatrove_path_at_least_0.9x_bare"] = {w: over_bare["foundry-datatrove"][w] >= 0.9
                                                      for w in workers_list}
    if 1 in workers_list and 2 in workers_list:
        result["scaling_2w_over_1w"] = {side: round(best[side][2] / best[side][1], 3) for side in sides}
        checks["2_workers_at_least_1.7x"] = {side: result["scaling_2w_over_1w"][side] >= 1.7 for side in sides}
    result["checks"] = checks
    return result


def table(result: dict[str, Any], chain: str) -> str:
    best, over_bare, sides = result["best_docs_per_s"], result["over_bare"], result["sides"]
    lines = [
        f"curation throughput: {result['docs']:,} docs in {result['files']} jsonl.gz files, chain={chain}, "
        f"tasks={result['tasks']} on every side, best of {result['repeats']}, {result['cpus']} CPUs "
        f"(1-min load seen: {_load_range(result['runs'])})",
        f"kept documents: {result['kept']}",
        "",
        f"{'workers':>7}" + "".join(f"  {side + ' docs/s':>24}" for side in sides)
        + "".join(f"  {side.removeprefix('foundry-') + ' / bare':>16}" for side in over_bare),
    ]
    for w in best["bare"]:
        lines.append(f"{w:>7}" + "".join(f"  {best[side][w]:>24.1f}" for side in sides)
                     + "".join(f"  {over_bare[side][w]:>15.3f}x" for side in over_bare))
    if "docs_per_cpu_s_1_worker" in result:
        c, r = result["docs_per_cpu_s_1_worker"], result["over_bare_cpu_1_worker"]
        lines += ["", "per CPU-second at 1 worker (not skewed by other load): "
                  + ", ".join(f"{side} {c[side]:.1f} docs" for side in sides)
                  + "  (" + ", ".join(f"{side}/bare {r[side]:.3f}x" for side in r) + ")"]
    if "scaling_2w_over_1w" in result:
        s = result["scaling_2w_over_1w"]
        lines += ["", "2 workers / 1 worker:  " + "   ".join(f"{side} {s[side]:.2f}x" for side in sides)]
    for check, verdicts in result["checks"].items():
        lines.append(f"{check}: " + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in verdicts.items()))
    return "\n".join(lines)


def _load_range(runs: list[dict]) -> str:
    loads = [r[k] for r in runs for k in ("load_before", "load_after") if r.get(k) is not None]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"


# --------------------------------------------------------------------- profile


def profile(files: list[Path], curation: dict, work: Path, top: int, sides: list[str]) -> str:
    """cProfile of each side at workers=1 (tasks run in this process), top functions by own time."""
    out = io.StringIO()
    for side in sides:
        fn = SIDES[side]
        tmp = work / f"profile-{side}"
        prof = cProfile.Profile()
        prof.enable()
        seconds = fn(files, curation, 1, tmp)
        prof.disable()
        out.write(f"\n===== {side}: {seconds:.1f} s =====\n")
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)
        prof.dump_stats(str(work / f"{side}.prof"))
    return out.getvalue()


# --------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=20_000, help="documents in the input (default 20,000)")
    p.add_argument("--files", type=int, default=8, help="jsonl.gz files = tasks on both sides (default 8)")
    p.add_argument("--repeats", type=int, default=2, help="runs per side and worker count; the best counts")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--chain", choices=sorted(CHAINS), default="default",
                   help="default: the four quality filters; web: URL filter + language ID before them")
    p.add_argument("--path", choices=sorted(PATH_SIDES), default="fused",
                   help="Foundry's quality filters: fused (default), datatrove (the plain classes) or both")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--keep", help="work in this folder and keep it (default: a temp dir, removed)")
    p.add_argument("--in-process", action="store_true",
                   help="run every measurement in this process (default: a fresh process per run)")
    p.add_argument("--profile", action="store_true", help="cProfile each side once at workers=1 instead")
    p.add_argument("--top", type=int, default=30, help="functions listed per profile")
    args = p.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="foundry-curation-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    try:
        t0 = time.perf_counter()
        files = write_inputs(work / "input", args.docs, args.files)
        log(f"wrote {args.docs:,} docs to {len(files)} files in {time.perf_counter() - t0:.1f} s ({work / 'input'})")
        warm_up()
        curation = CHAINS[args.chain]
        foundry_sides = PATH_SIDES[args.path]
        if args.profile:
            # the fused path keeps spaCy's common strings for the rest of the process (faster lookups
            # for whatever runs after it there): it is profiled last
            print(profile(files, curation, work, args.top, ["bare", *sorted(foundry_sides, key="foundry-fused".__eq__)]))
            return
        result = benchmark(files, args.docs, curation, args.workers, args.repeats, work, log, args.in_process,
                           foundry_sides)
        result["chain"] = args.chain
        print(json.dumps(result, indent=2) if args.json else "\n" + table(result, args.chain))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
