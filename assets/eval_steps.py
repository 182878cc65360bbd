"""eval_steps: the kept intermediate checkpoints (training.keep_every) as partitions of an eval asset.

A recipe that keeps steps gets `<recipe>/eval_steps`, one dynamic partition per kept step of
its current checkpoint (partitions `<recipe>__eval_steps`, keys `step_00000040` like the folders
`steps/step_00000040/` inside the checkpoint output). The unpartitioned eval_report still
evaluates the final weights.

A step's report is keyed by the eval spec (code version), the data versions of its inputs (the
tokenizer, and the tokenized sources whose held-out split is scored) and the sha256 of that
step's weights and config.json as the checkpoint's manifest lists them: the same weights give a
cache hit, whichever training run kept them. Sync, the sensor, the asset body
and data_stats all compute that key here, so they cannot disagree.

The sensor `<recipe>__eval_steps_sensor` adds a partition for each newly kept step and requests
its evaluation (and re-evaluation when a step's weights or the eval spec change); it starts
RUNNING when the recipe's `automation.evaluation` is eager. `foundry sync` does the same without
it (assets/sync.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dagster import (
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from . import lineage
from .identity import short_hash, store_key
from .plan import AssetPlan
from .settings import store_root
from .store import ArtifactStore, Manifest

KIND = "eval_step"  # store folder and logic version of one step's report
STEPS_DIR = "steps"  # inside the checkpoint output (training.kept_steps.STEPS_DIR)


def partitions_name(recipe: str) -> str:
    return f"{recipe}__eval_steps"


@dataclass(frozen=True)
class KeptStep:
    """One kept step of a published checkpoint."""

    name: str  # partition key and folder name, e.g. step_00000040
    step: int
    tokens: int  # training tokens seen up to and including this step
    dir: Path
    inputs: dict[str, str]  # identity inputs: sha256 of the weights and of config.json


def kept_steps(checkpoint: Manifest) -> list[KeptStep]:
    """The kept steps a checkpoint output lists (counts.kept_steps; files under steps/)."""
    from training.resume import step_dir_name

    found = []
    for entry in checkpoint.counts.get("kept_steps") or []:
        name = step_dir_name(int(entry["step"]))
        files = {f: checkpoint.files.get(f"{STEPS_DIR}/{name}/{f}") for f in ("model.safetensors", "config.json")}
        missing = [f for f, meta in files.items() if meta is None]
        if missing:
            raise FileNotFoundError(f"checkpoint {checkpoint.key}: kept step {entry['step']} lists no "
                                    f"{', '.join(missing)} under {STEPS_DIR}/{name}/ in its manifest")
        found.append(KeptStep(name, int(entry["step"]), int(entry["tokens"]), checkpoint.path / STEPS_DIR / name,
                              {"weights": files["model.safetensors"]["sha256"], "config": files["config.json"]["sha256"]}))
    return found


Inputs = dict[str, "lineage.Record | None"]  # role -> latest materialization of that input


def step_key(plan: AssetPlan, kept: KeptStep, input_versions: dict[str, str]) -> str:
    """Store key of one step's report (what the partition body computes through materialize)."""
    return store_key(plan.code_version, {**input_versions, **kept.inputs})


def current_steps(plan: AssetPlan, store: ArtifactStore, checkpoint: lineage.Record | None,
                  inputs: Inputs) -> list[tuple[KeptStep, str]]:
    """(kept step, the store key its report has now) for the recipe's current checkpoint; empty
    while the checkpoint or an input is not built or the checkpoint left the store."""
    if checkpoint is None or checkpoint.store_key is None or any(
            r is None or r.data_version is None for r in inputs.values()):
        return []
    manifest = store.lookup("checkpoint", checkpoint.store_key)
    if manifest is None:
        return []
    versions = {role: r.data_version for role, r in inputs.items()}
    return [(k, step_key(plan, k, versions)) for k in kept_steps(manifest)]


def evaluated(plan: AssetPlan, store: ArtifactStore, checkpoint: lineage.Record | None,
              inputs: Inputs) -> list[tuple[KeptStep, Manifest]]:
    """The current kept steps whose report is in the store, in step order."""
    found = []
    for kept, key in current_steps(plan, store, checkpoint, inputs):
        manifest = store.lookup(KIND, key)
        if manifest is not None:
            found.append((kept, manifest))
    return found


def outputs_digest(found: list[tuple[KeptStep, Manifest]]) -> str:
    """Identity input of data_stats: which step reports it gathered (so a new one makes it stale)."""
    return short_hash([[kept.name, manifest.data_version] for kept, manifest in found])


def records(plan: AssetPlan, instance) -> tuple[lineage.Record | None, Inputs]:
    """Latest materializations of the checkpoint and of the plan's inputs."""
    return (lineage.latest(instance, plan.context["checkpoint"]),
            {role: lineage.latest(instance, key) for role, key in plan.inputs.items()})


def to_evaluate(plan: AssetPlan, instance, store: ArtifactStore, checkpoint: lineage.Record | None,
                inputs: Inputs) -> tuple[list[tuple[KeptStep, str]], list[str]]:
    """(steps whose latest materialization is not their current report, all current partition keys)."""
    wanted = current_steps(plan, store, checkpoint, inputs)
    names = [kept.name for kept, _ in wanted]
    latest = lineage.latest_by_partition(instance, plan.key, names)
    todo = [(kept, key) for kept, key in wanted
            if (rec := latest.get(kept.name)) is None or rec.store_key != key or store.lookup(KIND, key) is None]
    return todo, names


def steps_sensor(plan: AssetPlan, evaluation_policy: str) -> SensorDefinition:
    """New kept steps become partitions and are evaluated; partitions of steps the current
    checkpoint no longer keeps are removed."""
    assert plan.partitions is not None

    @sensor(name=f"{plan.partitions}_sensor", target=[plan.key], minimum_interval_seconds=30,
            default_status=DefaultSensorStatus.RUNNING if evaluation_policy == "eager" else DefaultSensorStatus.STOPPED,
            description=f"Each checkpoint step kept by {plan.recipe}'s training becomes a partition of "
                        f"{plan.label} and is evaluated.")
    def _watch(context: SensorEvaluationContext):
        store = ArtifactStore(store_root())
        try:
            todo, names = to_evaluate(plan, context.instance, store, *records(plan, context.instance))
        except (OSError, ValueError) as err:
            return SkipReason(f"cannot list the kept steps: {err}")
        if not names:
            return SkipReason("no checkpoint with kept steps yet")
        known = set(context.instance.get_dynamic_partitions(plan.partitions))
        new, gone = [n for n in names if n not in known], sorted(known - set(names))
        pdef = DynamicPartitionsDefinition(name=plan.partitions)
        changes = ([pdef.build_add_request(new)] if new else []) + ([pdef.build_delete_request(gone)] if gone else [])
        # run key = partition @ report key: each (step, content) is requested once; a new
        # checkpoint or eval spec gives new keys, so its steps are evaluated again
        runs = [RunRequest(run_key=f"{kept.name}@{key}", partition_key=kept.name, asset_selection=[plan.key])
                for kept, key in todo]
        if not runs and not changes:
            return SkipReason(f"all {len(names)} kept steps evaluated")
        return SensorResult(run_requests=runs, dynamic_partitions_requests=changes)

    return _watch
