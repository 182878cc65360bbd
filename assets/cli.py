"""The `foundry` command: a thin layer over Dagster's Python API.

    foundry demo                         build the demo recipe end to end, then summarize
    foundry sync [--recipe PATH] [--json]  materialize exactly what is missing or stale
    foundry status [--recipe PATH]       fresh / stale (why) / missing, per asset
    foundry sql "QUERY" [--csv]          read-only query on the stats database
    foundry ui [--port N]                the Dagster UI on 127.0.0.1
    foundry export OUT [--recipe PATH]   the recipe's current checkpoint as a Hugging Face model folder
    foundry compare FILE [--out DIR]     build an ablation's runs (what is missing) and print its report
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from .settings import PROJECT_ROOT, configure_offline_environment, dagster_home, store_root
from .store import ArtifactStore

DEMO_RECIPE = PROJECT_ROOT / "recipes" / "demo.yaml"


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _prepare(recipes: list[str] | None) -> None:
    if recipes:
        os.environ["FOUNDRY_RECIPES"] = os.pathsep.join(str(Path(r).resolve()) for r in recipes)
        os.environ["FOUNDRY_ABLATIONS"] = ""  # --recipe names exactly what to load
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and (PROJECT_ROOT / "dagster.yaml").exists():
        shutil.copyfile(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    configure_offline_environment()


def _load(recipes: list[str] | None):
    """(definitions, recipe assets, instance) for the selected recipes."""
    _prepare(recipes)
    from .definitions import build_definitions, load_all, recipe_paths
    from .instance import open_instance  # one creator of a new instance at a time (two syncs may start at once)

    loaded = load_all(recipe_paths())
    return build_definitions(loaded), loaded, open_instance()


def cmd_sync(args: argparse.Namespace) -> int:
    from .sync import sync

    defs, loaded, instance = _load(args.recipe)
    report = sync(defs, loaded, instance, echo=_err)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        failed = f", {len(report.failed)} failed" if report.failed else ""
        _err(f"sync: {len(report.ran)} ran, {len(report.cache_hit)} cache hits, "
             f"{len(report.untouched)} untouched{failed} in {report.seconds:.1f}s")
    if report.error:
        _err(f"error: {report.error}")
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .sync import compute_states

    _, loaded, instance = _load(args.recipe)
    states = compute_states(instance, loaded)
    width = max(len(s.plan.label) for s in states.values())
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s.status] = counts.get(s.status, 0) + 1
        mark = {"fresh": "✓", "stale": "~", "missing": "·", "blocked": "✗"}[s.status]
        print(f"{mark} {s.plan.label:<{width}}  {s.status:<7}  {s.reason}".rstrip())
    print(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from .stats import query

    configure_offline_environment()
    try:
        columns, rows = query(store_root(), args.query)
    except FileNotFoundError as err:
        _err(str(err))
        return 1
    except Exception as err:  # noqa: BLE001 - DuckDB errors are the user's to read
        _err(f"query failed: {err}")
        return 1
    if args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        _print_table(columns, rows)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """The current (latest materialized) checkpoint and tokenizer of one recipe -> a Hugging Face folder."""
    from dagster import AssetKey

    from training.export import export_hf

    from . import lineage

    _, loaded, instance = _load(args.recipe)
    if len(loaded) != 1:
        from .definitions import bundle_name

        _err(f"export: name one recipe with --recipe (loaded {len(loaded)}: {', '.join(bundle_name(ra) for ra in loaded)})")
        return 2
    name = loaded[0].recipe.name
    store = ArtifactStore(store_root())
    outputs = {}
    for asset, kind in (("checkpoint", "checkpoint"), ("tokenizer", "tokenizer")):
        rec = lineage.latest(instance, AssetKey([name, asset]))
        manifest = store.lookup(kind, rec.store_key) if rec and rec.store_key else None
        if manifest is None:
            _err(f"export: {name}/{asset} has no output in {store.root}; run `foundry sync --recipe ...` first")
            return 1
        outputs[asset] = manifest.path
    try:
        out = export_hf(outputs["checkpoint"], Path(args.out), outputs["tokenizer"] / "tokenizer.json",
                        args.dtype, args.overwrite)
    except (FileExistsError, ValueError) as err:
        _err(f"export: {err}")
        return 1
    _err(f"exported {name}/checkpoint ({outputs['checkpoint'].name}) -> {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """An ablation's report: sync its runs and report (cache hits where built), then print report.md."""
    from .ablation import is_ablation_file
    from .ablation_assets import AblationAssets, report_markdown
    from .sync import compute_states, sync

    path = Path(args.file)
    if not is_ablation_file(path):
        _err(f"compare: {path} is not an ablation file (it needs `base:` and `variants:` or `grid:`)")
        return 2
    defs, loaded, instance = _load([str(path)])
    bundle = next(b for b in loaded if isinstance(b, AblationAssets))
    plan = next(iter(bundle.plans.values()))
    if not args.no_sync:
        report = sync(defs, loaded, instance, echo=_err)
        _err(f"compare: {len(report.ran)} ran, {len(report.cache_hit)} cache hits, "
             f"{len(report.untouched)} untouched in {report.seconds:.1f}s")
        if report.error:
            _err(f"error: {report.error}")
            return 1
    else:
        state = compute_states(instance, loaded)[plan.key]
        if state.status != "fresh":
            _err(f"compare: {plan.label} is {state.status} ({state.reason}); run without --no-sync to build it")
            if state.record is None:
                return 1
    from . import lineage

    rec = lineage.latest(instance, plan.key)
    manifest = ArtifactStore(store_root()).lookup(plan.kind, rec.store_key) if rec and rec.store_key else None
    if manifest is None:
        _err(f"compare: {plan.label} has no output in {store_root()}")
        return 1
    print(report_markdown(manifest) if args.embed_images else (manifest.path / "report.md").read_text())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "report.json", "loss_curves.png"):
            shutil.copyfile(manifest.path / name, out / name)
        _err(f"compare: report.md, report.json and loss_curves.png written to {out}")
    _err(f"compare: report in {manifest.path} (report.md, loss_curves.png); numbers: "
         f"foundry sql \"select * from ablations where grid = '{bundle.name}'\"")
    return 0


def _print_table(columns: list[str], rows: list[tuple]) -> None:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.6g}"
        return "NULL" if v is None else str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def cmd_ui(args: argparse.Namespace) -> int:
    _prepare(args.recipe)
    cmd = [sys.executable, "-m", "dagster", "dev", "-m", "assets.definitions", "-h", "127.0.0.1", "-p", str(args.port)]
    _err(f"Dagster UI on http://127.0.0.1:{args.port}  (Ctrl-C stops it)")
    # Ctrl-C (or a SIGTERM) stops the whole tree, even if we were started with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Own process group + default SIGINT in the child: Ctrl-C reaches the whole tree.
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.recipe = [str(DEMO_RECIPE)]
    args.json = False
    code = cmd_sync(args)
    if code:
        return code
    from .stats import query

    root = store_root()
    print("\nFoundry demo: summary")
    for title, sql in [
        ("documents kept per source",
         "select source, count(*) as documents, sum(kept::int) as kept, round(avg(kept::int), 3) as kept_fraction "
         "from curation where recipe = 'demo' group by source order by source"),
        ("tokens per source (curated) and in the mixture",
         "select t.source, t.tokens as curated_tokens, m.tokens as mixture_tokens, m.epochs "
         "from tokens t left join mixture m using (recipe, source) where recipe = 'demo' order by t.source"),
        ("training", "select max(step) as steps, max(tokens) as tokens, "
                     "arg_max(loss, step) as final_loss from train_metrics where recipe = 'demo'"),
        ("evaluation", "select task, metric, round(value, 4) as value, n_items from evals "
                       "where recipe = 'demo' order by task, metric"),
    ]:
        print(f"\n{title}:")
        columns, rows = query(root, sql)
        _print_table(columns, rows)
    print(f"\noutputs: {root}\nstats:   {root / 'stats.duckdb'}  (try: foundry sql \"select * from evals\")"
          f"\nUI:      foundry ui")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foundry", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_recipe(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--recipe", action="append", metavar="PATH",
                       help="recipe file (repeatable); default: every recipes/*.yaml")
        return p

    p = sub.add_parser("demo", help="build the demo recipe end to end and print a summary")
    p.set_defaults(func=cmd_demo)
    p = with_recipe(sub.add_parser("sync", help="materialize exactly what is missing or stale"))
    p.add_argument("--json", action="store_true", help='print {"ran", "cache_hit", "untouched"} as JSON')
    p.set_defaults(func=cmd_sync)
    p = with_recipe(sub.add_parser("status", help="fresh, stale (with the reason) or missing, per asset"))
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("sql", help="read-only DuckDB query on the stats database")
    p.add_argument("query")
    p.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_sql)
    p = with_recipe(sub.add_parser("export", help="the recipe's checkpoint as a Hugging Face model folder"))
    p.add_argument("out", help="folder to write (config.json, model.safetensors, tokenizer)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("compare", help="build an ablation (what is missing) and print its report")
    p.add_argument("file", help="ablation file (base: + variants: and/or grid:, seeds:)")
    p.add_argument("--out", metavar="DIR", help="also copy report.md, report.json and loss_curves.png here")
    p.add_argument("--no-sync", action="store_true", help="build nothing: print the report as last built")
    p.add_argument("--embed-images", action="store_true", help="inline the PNG as a data URI in the markdown")
    p.set_defaults(func=cmd_compare)
    p = with_recipe(sub.add_parser("ui", help="the Dagster UI on 127.0.0.1"))
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .recipe import RecipeError

    try:
        return args.func(args)
    except RecipeError as err:
        _err(str(err))
        return 2


if __name__ == "__main__":
    sys.exit(main())
