"""Asset factory: one recipe -> its plans and Dagster assets (one group, keys prefixed by name)."""


from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    MaterializeResult,
    MetadataValue,
    SensorDefinition,
    asset,
)

from . import automation, checks, eval_curve, eval_steps
from .contamination import build_contamination, contamination_spec, describe_contamination
from .curation import build_curated, curated_spec, describe_curated, filtered_spec, materialize_filtered
from .engine import Builder, Describer, materialize
from .evaluation import build_eval_report, build_eval_step, describe_eval_report, describe_eval_step, heldout_inputs
from .file_inputs import file_inputs
from .mixture import build_mixture_asset, describe_mixture
from .ocr_queue import build_ocr_queue, describe_ocr_queue, ocr_queue_spec
from .plan import AssetPlan
from .recipe import Recipe, source_files
from .rephrase import build_rephrased, describe_rephrased, rephrase_spec
from .resources import FoundryResource
from .settings import resolve_data_path
from .shards import partitions_def, partitions_name, shard_sensor
from .sources import build_raw, content_hash, describe_raw, file_table, fingerprint, raw_spec
from .stats import build_data_stats, describe_data_stats, publish
from .tokenization import build_tokenized, build_tokenizer, describe_tokenized, describe_tokenizer, tokenized_spec
from .training import build_checkpoint, describe_checkpoint, training_spec


@dataclass(frozen=True)
class RecipeAssets:
    recipe: Recipe
    origin: str
    plans: dict[AssetKey, AssetPlan]
    assets: list[AssetsDefinition]
    sensors: list[SensorDefinition]


def recipe_plans(recipe: Recipe) -> list[AssetPlan]:
    """The asset graph of one recipe, in topological order."""
    r = recipe.name
    key = lambda name: AssetKey([r, name])  # noqa: E731
    plans: list[AssetPlan] = []
    for s, src in recipe.sources.items():
        plans.append(AssetPlan(r, f"raw_{s}", "raw", raw_spec(src), {},
                               f"Source files of '{s}' ({src.kind}), identified by content.", {"source": src}))
    for s, src in recipe.sources.items():
        filtered = AssetPlan(r, f"filtered_{s}", "filtered", filtered_spec(src), {},
                             f"Each file of '{s}' through extraction and the datatrove filters "
                             f"(one partition per {'batch of files' if src.batches else 'file'}; "
                             "new files are added by a sensor).",
                             {"source": src, "raw": key(f"raw_{s}")},
                             partitions=partitions_name(r, s, batched=src.batches is not None))
        plans.append(filtered)
        plans.append(AssetPlan(r, f"curated_{s}", "curated", curated_spec(src), {"raw": key(f"raw_{s}")},
                               f"'{s}' gathered from its file partitions and MinHash-deduplicated; "
                               "one decision row per input document.",
                               {"source": src, "filtered_plan": filtered}, after=(filtered.key,)))
        if src.kind == "pdf":
            plans.append(AssetPlan(r, f"ocr_queue_{s}", "ocr_queue", ocr_queue_spec(src),
                                   {"curated": key(f"curated_{s}"), "raw": key(f"raw_{s}")},
                                   f"Documents of '{s}' whose text layer needs OCR, highest ocr_score first "
                                   "(listed for an OCR backend; none runs by default).", {"source": src, "name": s}))
    tok = recipe.tokenizer
    if tok.path is None:
        tok_inputs = {s: key(f"raw_{s}") for s in recipe.sources}
        tok_spec = tok.model_dump(mode="json", exclude={"path"})
    else:
        tok_inputs, tok_spec = {}, {"given": True}
    plans.append(AssetPlan(r, "tokenizer", "tokenizer", tok_spec, tok_inputs,
                           "Byte-level BPE trained on a sample of the raw sources (or the file the recipe names).",
                           {"tokenizer": tok, "sources": recipe.sources}))
    for name, spec in recipe.rephrase.items():
        plans.append(AssetPlan(r, f"rephrased_{name}", "rephrased", rephrase_spec(spec),
                               {"curated": key(f"curated_{spec.source}")},
                               f"Kept documents of '{spec.source}' rewritten as {', '.join(spec.styles)} by the "
                               f"{spec.backend.kind} backend" + (f" ({spec.backend.model})." if spec.backend.model else "."),
                               {"rephrase": spec, "name": name}))
    for s in recipe.corpora():
        upstream = f"curated_{s}" if s in recipe.sources else f"rephrased_{s}"
        plans.append(AssetPlan(r, f"tokenized_{s}", "tokenized", tokenized_spec(recipe.heldout_share(s)),
                               {"curated": key(upstream), "tokenizer": key("tokenizer")},
                               f"Token ids of {upstream} with document boundaries."))
    plans.append(AssetPlan(r, "mixture", "mixture", recipe.mixture.model_dump(mode="json"),
                           {s: key(f"tokenized_{s}") for s in recipe.mixed_sources()},
                           "Weights and token budget turned into a shuffled document index.",
                           {"mixture": recipe.mixture}))
    plans.append(AssetPlan(r, "checkpoint", "checkpoint", training_spec(recipe),
                           {"mixture": key("mixture"), "tokenizer": key("tokenizer")},
                           "A dense SmolLM-style model trained by `python -m training.train` through Dagster Pipes.",
                           {"recipe": recipe}))
    plans.append(AssetPlan(r, "eval_report", "eval_report", recipe.evals.model_dump(mode="json"),
                           {"checkpoint": key("checkpoint"), "tokenizer": key("tokenizer"), **heldout_inputs(recipe)},
                           "lighteval tasks and held-out loss of the checkpoint.", {"evals": recipe.evals}))
    steps_plan = None
    if recipe.training.keep_every:  # only then: recipes that keep no steps have the graph they had
        report_plan = plans[-1]
        steps_plan = AssetPlan(r, "eval_steps", eval_steps.KIND, recipe.evals.model_dump(mode="json"),
                               {"tokenizer": key("tokenizer"), **heldout_inputs(recipe)},
                               f"The eval report of each checkpoint step kept every {recipe.training.keep_every} "
                               "steps (one partition per kept step; new ones are added by a sensor).",
                               {"evals": recipe.evals, "checkpoint": key("checkpoint"), "report": key("eval_report")},
                               after=(key("checkpoint"),), partitions=eval_steps.partitions_name(r))
        plans.append(steps_plan)
        report_plan.context["steps_plan"] = steps_plan  # eval_report's page shows the score curve too
    if recipe.contamination is not None:
        corpora = {s: key(f"curated_{s}" if s in recipe.sources else f"rephrased_{s}") for s in recipe.mixed_sources()}
        plans.append(AssetPlan(r, "contamination", "contamination", contamination_spec(recipe), corpora,
                               f"Eval items sharing a word {recipe.contamination.ngram}-gram with the mixed corpora.",
                               {"evals": recipe.evals, "contamination": recipe.contamination}))
    stat_inputs = {p.name: p.key for p in plans if p.kind in ("curated", "ocr_queue", "rephrased", "tokenized",
                                                              "mixture", "checkpoint", "eval_report", "contamination")}
    plans.append(AssetPlan(r, "data_stats", "data_stats", {}, stat_inputs,
                           "DuckDB views over this recipe's statistics (`foundry sql`).",
                           # the reports of kept steps are gathered by their computed keys
                           {"eval_steps": steps_plan} if steps_plan else {},
                           after=(steps_plan.key,) if steps_plan else ()))
    return plans


BUILDERS: dict[str, tuple[Builder, Describer]] = {
    "curated": (build_curated, describe_curated),
    "rephrased": (build_rephrased, describe_rephrased),
    "ocr_queue": (build_ocr_queue, describe_ocr_queue),
    "contamination": (build_contamination, describe_contamination),
    "tokenizer": (build_tokenizer, describe_tokenizer),
    "tokenized": (build_tokenized, describe_tokenized),
    "mixture": (build_mixture_asset, describe_mixture),
    "checkpoint": (build_checkpoint, describe_checkpoint),
    "eval_report": (build_eval_report, describe_eval_report),
    "data_stats": (build_data_stats, describe_data_stats),
}
# Dagster concurrency pools (limits live in the instance: dagster.yaml, profiles/): one trainer or
# evaluator on the accelerator at a time, one writer of stats.duckdb.
POOLS = {"checkpoint": "gpu", "eval_report": "gpu", "eval_step": "gpu", "data_stats": "duckdb"}
KINDS = {
    "raw": {"json"}, "filtered": {"datatrove"}, "curated": {"datatrove"}, "rephrased": {"llm"},
    "ocr_queue": {"parquet"},
    "tokenizer": {"tokenizers"}, "tokenized": {"numpy"}, "mixture": {"numpy"}, "checkpoint": {"pytorch"}, "eval_report": {"lighteval"}, "eval_step": {"lighteval"}, "data_stats": {"duckdb"}, "contamination": {"duckdb"},
}


def _body(plan: AssetPlan) -> Callable[[AssetExecutionContext, FoundryResource], MaterializeResult]:
    if plan.kind == "raw":
        src = plan.context["source"]

        def run_raw(context: AssetExecutionContext, foundry: FoundryResource) -> MaterializeResult:
            files = source_files(src, foundry.data_path())
            if not files:
                raise FileNotFoundError(f"{plan.label}: no files match {resolve_data_path(src.path, foundry.data_path())}")
            table = file_table(files)
            return materialize(
                context, foundry, plan, lambda ctx: build_raw(ctx, table), describe_raw,
                extra_inputs={"content": content_hash(table)},
                extra_metadata={"fingerprint": MetadataValue.json(fingerprint(files))},
            )

        return run_raw
    if plan.kind == "filtered":

        def run_filtered(context: AssetExecutionContext, foundry: FoundryResource) -> MaterializeResult:
            return materialize_filtered(context, foundry, plan)  # one file or a batch of files

        return run_filtered
    if plan.kind in ("tokenizer", "rephrased"):
        build, describe = BUILDERS[plan.kind]

        def run_with_files(context: AssetExecutionContext, foundry: FoundryResource) -> MaterializeResult:
            files = file_inputs(plan, foundry.data_path())  # content digests: part of the store key
            if plan.kind == "tokenizer" and files:
                plan.context["tokenizer_file"] = resolve_data_path(plan.context["tokenizer"].path, foundry.data_path())
            if plan.kind == "rephrased" and files:
                plan.context["model_fingerprint"] = files["model"]
            return materialize(context, foundry, plan, build, describe, extra_inputs=files)

        return run_with_files
    if plan.kind == eval_steps.KIND:
        return _eval_step_body(plan)
    build, describe = BUILDERS[plan.kind]
    if plan.kind == "eval_report" and "steps_plan" in plan.context:

        def run_eval_report(context: AssetExecutionContext, foundry: FoundryResource) -> MaterializeResult:
            result = materialize(context, foundry, plan, build, describe)
            final = foundry.store().lookup("eval_report", result.metadata["store_key"])
            return _with_curve(result, plan.context["steps_plan"], context, foundry, final=final)

        return run_eval_report
    if plan.kind == "data_stats":

        def run_stats(context: AssetExecutionContext, foundry: FoundryResource) -> MaterializeResult:
            steps_plan = plan.context.get("eval_steps")
            if steps_plan is None:
                result = materialize(context, foundry, plan, build, describe)
            else:  # the reports of kept steps evaluated so far; which ones they are enters the key
                found = eval_steps.evaluated(steps_plan, foundry.store(), *eval_steps.records(steps_plan, context.instance))
                result = materialize(context, foundry, plan, lambda ctx: build(ctx, [m for _, m in found]), describe,
                                     extra_inputs={"eval_steps": eval_steps.outputs_digest(found)})
            store = foundry.store()
            manifest = store.lookup("data_stats", result.metadata["store_key"])
            db = publish(store.root, plan.recipe, manifest)
            context.log.info(f"{plan.label}: stats database at {db}")
            return result

        return run_stats

    def run(context: AssetExecutionContext, foundry: FoundryResource) -> MaterializeResult:
        return materialize(context, foundry, plan, build, describe)

    return run


def _eval_step_body(plan: AssetPlan) -> Callable[[AssetExecutionContext, FoundryResource], MaterializeResult]:
    """One kept step (the partition) of the current checkpoint through the evaluation."""

    def run_eval_step(context: AssetExecutionContext, foundry: FoundryResource) -> MaterializeResult:
        name = context.partition_key
        checkpoint, _ = eval_steps.records(plan, context.instance)
        store = foundry.store()
        manifest = store.lookup("checkpoint", checkpoint.store_key) if checkpoint and checkpoint.store_key else None
        if manifest is None:
            raise FileNotFoundError(f"{plan.label}: the checkpoint is not built (or left the store at {store.root}); "
                                    "run `foundry sync` first")
        kept = {k.name: k for k in eval_steps.kept_steps(manifest)}
        if name not in kept:
            raise FileNotFoundError(f"{plan.label}: partition '{name}' is not a step kept by the current checkpoint "
                                    f"({manifest.key}), which keeps {', '.join(kept) or 'none'}")
        step = kept[name]
        result = materialize(context, foundry, plan, lambda ctx: build_eval_step(ctx, step), describe_eval_step,
                             extra_inputs=step.inputs, extra_metadata={"checkpoint_key": manifest.key})
        return _with_curve(result, plan, context, foundry)

    return run_eval_step


def _with_curve(result: MaterializeResult, steps_plan: AssetPlan, context: AssetExecutionContext,
                foundry: FoundryResource, final=None) -> MaterializeResult:
    """Add the score-vs-tokens table and plot over every evaluated step of the checkpoint."""
    pts = eval_curve.points(steps_plan, context.instance, foundry.store(), final=final)
    meta = eval_curve.curve_metadata(pts, f"{steps_plan.recipe}: score vs training tokens")
    return MaterializeResult(metadata={**result.metadata, **meta}, data_version=result.data_version,
                             check_results=result.check_results)


def asset_for(plan: AssetPlan, recipe: Recipe) -> AssetsDefinition:
    body = _body(plan)

    @asset(
        key=plan.key,
        deps=plan.deps,
        partitions_def=partitions_def(plan) if plan.partitions else None,
        code_version=plan.code_version,
        group_name=plan.recipe,
        description=plan.description,
        automation_condition=automation.condition_for(plan.kind, recipe.automation),
        kinds=KINDS[plan.kind],
        metadata={"foundry/kind": plan.kind},
        pool=POOLS.get(plan.kind),
        check_specs=checks.specs_for(plan) or None,
    )
    def _asset(context: AssetExecutionContext, foundry: FoundryResource) -> MaterializeResult:
        return body(context, foundry)

    return _asset


def recipe_assets(recipe: Recipe, origin: str | Path) -> RecipeAssets:
    plans = recipe_plans(recipe)
    by_key = {p.key: p for p in plans}
    return RecipeAssets(
        recipe=recipe,
        origin=str(origin),
        plans=by_key,
        assets=[asset_for(p, recipe) for p in plans],
        sensors=[shard_sensor(p, by_key[p.context["raw"]]) if p.kind == "filtered"
                 else eval_steps.steps_sensor(p, recipe.automation.evaluation) for p in plans if p.partitions],
    )


def describe_recipe(ra: RecipeAssets) -> dict[str, Any]:
    return {p.label: {"kind": p.kind, "code_version": p.code_version,
                      "deps": sorted(k.to_user_string() for k in p.deps)} for p in ra.plans.values()}
