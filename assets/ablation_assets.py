"""An ablation file as Dagster assets: one asset group per run, plus `<ablation>/ablation_report`.

Runs are ordinary recipes (`recipe_assets`), so `foundry sync`, the UI and the store treat them like
any other; what they share is shared by identity alone. The report reads every run's checkpoint
and eval report (its identity inputs), writes report.md, loss_curves.png, report.json and
ablations.parquet, and publishes the `ablations` table into the stats database.
"""

# No `from __future__ import annotations`: Dagster reads the asset body's `context` annotation.
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagster import AssetExecutionContext, AssetKey, AssetsDefinition, MaterializeResult, MetadataValue, asset

from . import automation
from .ablation import Ablation, Run, load_ablation
from .ablation_report import RunOutputs, loss_curves_png, make_report, markdown, png_data_uri, write_ablations_table
from .engine import BuildContext, materialize
from .factory import RecipeAssets, recipe_assets
from .plan import AssetPlan
from .resources import FoundryResource
from .stats import publish
from .store import Manifest, atomic_write_json

REPORT = "ablation_report"
IMAGE = "loss_curves.png"


@dataclass(frozen=True)
class AblationAssets:
    """The report of one ablation, shaped like RecipeAssets where sync and status read it."""

    ablation: Ablation
    origin: str
    plans: dict[AssetKey, AssetPlan]
    assets: list[AssetsDefinition]
    sensors: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.ablation.name


def _role(run: Run, asset_name: str) -> str:
    return f"{run.name}:{asset_name}"


def report_plan(ablation: Ablation) -> AssetPlan:
    spec = {
        "grid": ablation.name,
        "description": ablation.spec.description,
        "runs": [{"variant": r.variant, "seed": r.seed, "points": r.points} for r in ablation.runs],
        "best_of": ablation.spec.best_of.model_dump(mode="json") if ablation.spec.best_of else None,
    }
    # the mixture too: its data version says which runs trained on the same text
    inputs = {_role(r, a): AssetKey([r.name, a]) for r in ablation.runs for a in ("mixture", "checkpoint", "eval_report")}
    return AssetPlan(ablation.name, REPORT, REPORT, spec, inputs,
                     f"Which of the {len(ablation.variants())} variants of '{ablation.name}' won each metric, "
                     "by how much, and whether that is beyond noise (across seeds and eval items).",
                     {"ablation": ablation})


def build_ablation_report(ctx: BuildContext) -> dict[str, Any]:
    ablation: Ablation = ctx.plan.context["ablation"]
    runs = [RunOutputs(r.variant, r.seed, r.points, ctx.upstream[_role(r, "checkpoint")].dir,
                       ctx.upstream[_role(r, "eval_report")].dir, ctx.upstream[_role(r, "mixture")].manifest.data_version)
            for r in ablation.runs]
    best_of = ctx.plan.spec["best_of"]
    report = make_report(ablation.name, runs, best_of)
    (ctx.out_dir / IMAGE).write_bytes(loss_curves_png(report))
    (ctx.out_dir / "report.md").write_text(markdown(report, runs, ablation.spec.description, IMAGE))
    atomic_write_json(ctx.out_dir / "report.json", report.as_json())
    write_ablations_table(ctx.out_dir / "ablations.parquet", report)
    # what data_stats writes for a recipe: `publish` points the stats database at this file
    atomic_write_json(ctx.out_dir / "tables.json", [{"table": "ablations", "recipe": ablation.name, "source": None,
                                                     "file": f"{REPORT}/{ctx.key}/ablations.parquet"}])
    for c in report.comparisons.values():
        ctx.log.info(f"{ctx.plan.label}: {c.metric}: {c.verdict} ({', '.join(c.ranked)})")
    return {"runs": len(runs), "variants": len(report.summaries.get("train/final_loss", {})),
            "verdicts": {m: c.verdict for m, c in report.comparisons.items()},
            "winners": {m: c.winner for m, c in report.comparisons.items() if c.direction},
            "leaders": {m: c.leaders for m, c in report.comparisons.items() if c.verdict == "leads"}}


def report_markdown(manifest: Manifest) -> str:
    """report.md with its loss curves embedded (the Dagster UI renders data-URI images)."""
    text = (manifest.path / "report.md").read_text()
    image = manifest.path / IMAGE
    return text.replace(f"]({IMAGE})", f"]({png_data_uri(image.read_bytes())})") if image.is_file() else text


def describe_ablation_report(manifest: Manifest) -> dict[str, Any]:
    c = manifest.counts
    return {"report": MetadataValue.md(report_markdown(manifest)), "runs": c.get("runs", 0),
            "variants": c.get("variants", 0), "winners": MetadataValue.json(c.get("winners", {}))}


def report_asset(plan: AssetPlan) -> AssetsDefinition:
    @asset(
        key=plan.key,
        deps=plan.deps,
        code_version=plan.code_version,
        group_name=plan.recipe,
        description=plan.description,
        # cheap, and only ever a summary of its inputs: rebuild as soon as one changes
        automation_condition=automation.data_condition(),
        kinds={"duckdb"},
        metadata={"foundry/kind": plan.kind},
        pool="duckdb",  # it rewrites stats.duckdb, like data_stats: one writer at a time
    )
    def _asset(context: AssetExecutionContext, foundry: FoundryResource) -> MaterializeResult:
        result = materialize(context, foundry, plan, build_ablation_report, describe_ablation_report)
        store = foundry.store()
        manifest = store.lookup(plan.kind, result.metadata["store_key"])
        db = publish(store.root, f"ablation-{plan.recipe}", manifest)  # '-': never a recipe's name
        context.log.info(f"{plan.label}: ablations table in {db}")
        return result

    return _asset


def ablation_bundles(path: str | Path, data_root: Path | None = None) -> list[RecipeAssets | AblationAssets]:
    """Every run of the ablation file as a recipe, then its report (after them: sync reads in order)."""
    ablation = load_ablation(path, data_root)
    bundles: list[RecipeAssets | AblationAssets] = [
        recipe_assets(run.recipe, f"{path}#{run.variant}/s{run.seed}") for run in ablation.runs]
    plan = report_plan(ablation)
    bundles.append(AblationAssets(ablation, str(path), {plan.key: plan}, [report_asset(plan)]))
    return bundles
