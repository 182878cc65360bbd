"""Freshness of every asset, and `sync`: materialize exactly what is missing or stale.

Freshness is computed from the Dagster instance (latest materialization of each asset) and
the plans, the same way the asset bodies compute store keys:

    missing  never materialized
    stale    its code version changed, an input's data version changed since it was built,
             its source files changed on disk (raw), or its output left the store
    fresh    otherwise

A partitioned asset (one partition per source file, or per batch of files) is one node here:
fresh when every partition of the files raw_<source> recorded is materialized with the output
key its files give now. Sync registers new partitions and runs only those that are not fresh.

Staleness reaches a child only once the parent is rebuilt and reports a *new* data version,
so sync works in rounds: build the stale assets whose inputs are all fresh, then look again.
A rebuild that reproduces its old output stops the wave there.

Sync first removes what killed builds left in the store (temp dirs of dead processes) and
last repairs the stats database if it cannot be opened. Two syncs of one recipe may run at
once: each output key is built by one of them while the other waits and then records a hit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dagster import AssetKey, DagsterInstance, Definitions

from dataprep.progress import Progress, describe

from . import eval_steps, lineage
from .curation import prebuild_filtered
from .engine import read_json
from .factory import RecipeAssets
from .file_inputs import file_inputs
from .plan import AssetPlan
from .recipe import source_files
from .resources import FoundryResource
from .settings import data_root, store_root
from .shards import expected_partitions, shard_key
from .sources import fingerprint
from .stats import repair_database
from .store import ArtifactStore


@dataclass
class AssetState:
    plan: AssetPlan
    status: str  # fresh | stale | missing | blocked (an input failed a blocking check)
    reason: str = ""
    record: lineage.Record | None = None
    direct: bool = False  # stale for its own reason (runnable once its inputs are fresh)
    partitions: list[str] = field(default_factory=list)  # partitions to (re)build, if partitioned
    expected: list[str] | None = None  # every partition the current file listing gives (known once it is fresh)


def _upstream(plan: AssetPlan) -> list[AssetKey]:
    """What must be fresh before this asset is built: inputs, ordering deps, a partitioned
    asset's file listing."""
    extra = [plan.context["raw"]] if plan.partitions and "raw" in plan.context else []
    return list(dict.fromkeys([*plan.deps, *extra]))


def _steps_state(instance: DagsterInstance, plan: AssetPlan, states: dict[AssetKey, AssetState],
                 store: ArtifactStore) -> AssetState:
    """eval_steps: one partition per step the current checkpoint kept (assets/eval_steps.py)."""
    waiting = [k for k in _upstream(plan) if states[k].status != "fresh"]
    if waiting:
        return AssetState(plan, "missing" if any(states[k].status == "missing" for k in waiting) else "stale",
                          f"waiting for {', '.join(k.to_user_string() for k in waiting)}")
    inputs = {role: states[key].record for role, key in plan.inputs.items()}
    todo, names = eval_steps.to_evaluate(plan, instance, store, states[plan.context["checkpoint"]].record, inputs)
    if not todo:
        return AssetState(plan, "fresh", "", None)
    shown = ", ".join(k.name for k, _ in todo[:3]) + (f" and {len(todo) - 3} more" if len(todo) > 3 else "")
    return AssetState(plan, "missing" if len(todo) == len(names) else "stale",
                      f"{len(todo)} of {len(names)} kept checkpoint steps to evaluate: {shown}", None,
                      direct=True, partitions=[k.name for k, _ in todo])


def _partitioned_state(instance: DagsterInstance, plan: AssetPlan, states: dict[AssetKey, AssetState],
                       store: ArtifactStore) -> AssetState:
    listing = states[plan.context["raw"]]
    if listing.status != "fresh" or listing.record is None:
        return AssetState(plan, "missing" if listing.status == "missing" else "stale",
                          f"waiting for the file listing ({listing.plan.label})")
    raw = store.lookup("raw", listing.record.store_key)
    files = read_json(raw.path / "files.json") if raw else []
    expected = expected_partitions(plan, files)  # partition -> (store key, its files)
    records = lineage.latest_by_partition(instance, plan.key, list(expected))
    file_key = {row["name"]: shard_key(plan, row["sha256"]) for row in files}
    todo = []
    for name, (key, members) in expected.items():
        rec = records.get(name)
        outputs = {key, *(file_key[m] for m in members)}  # a batch's index and its files' outputs
        if rec is None or rec.store_key != key or any(store.lookup("filtered", k) is None for k in outputs):
            todo.append(name)
    if not todo:
        return AssetState(plan, "fresh", "", None, expected=list(expected))
    shown = ", ".join(todo[:3]) + (f" and {len(todo) - 3} more" if len(todo) > 3 else "")
    status = "missing" if not records else "stale"
    what = "file" if plan.context["source"].batches is None else "batch"
    return AssetState(plan, status, f"{len(todo)} of {len(expected)} {what} partitions to build: {shown}", None,
                      direct=True, partitions=todo, expected=list(expected))


def _direct_reason(plan: AssetPlan, rec: lineage.Record, states: dict[AssetKey, AssetState],
                   store: ArtifactStore, root: Path) -> str:
    if rec.code_version != plan.code_version:
        return f"spec or logic changed (code version {rec.code_version} -> {plan.code_version})"
    for role, up in plan.inputs.items():
        up_rec = states[up].record
        if up_rec is not None and rec.inputs.get(role) != up_rec.data_version:
            return f"input {up.to_user_string()} has new data"
    if plan.kind == "raw":
        try:
            now = fingerprint(source_files(plan.context["source"], root))
        except Exception as err:  # noqa: BLE001 - reported, the asset will fail with detail
            return f"source files unreadable: {err}"
        if now != rec.metadata.get("fingerprint"):
            return "source files changed on disk"
    try:
        files = file_inputs(plan, root)
    except Exception as err:  # noqa: BLE001 - reported, the asset will fail with detail
        return f"input file unreadable: {err}"
    for role, digest in files.items():
        if rec.inputs.get(role) != digest:
            return f"{role} file changed on disk"
    if rec.store_key is None or store.lookup(plan.kind, rec.store_key) is None:
        return "output missing from the store"
    steps_plan = plan.context.get("eval_steps") if plan.kind == "data_stats" else None
    if steps_plan is not None:  # it gathers the reports of kept steps: one more (or a new one) makes it stale
        inputs = {role: states[key].record for role, key in steps_plan.inputs.items()}
        found = eval_steps.evaluated(steps_plan, store, states[steps_plan.context["checkpoint"]].record, inputs)
        if rec.inputs.get("eval_steps") != eval_steps.outputs_digest(found):
            return "reports of kept checkpoint steps changed"
    return ""


def _blocked_by(plan: AssetPlan, states: dict[AssetKey, AssetState]) -> str:
    """Why this asset must not be built: an input failed a blocking check (or is blocked)."""
    for up in plan.deps:
        st = states[up]
        if st.status == "blocked":
            return f"upstream {up.to_user_string()} is blocked"
        failed = (st.record.metadata.get("blocking_checks_failed") or []) if st.record else []
        if failed and st.status == "fresh":
            return f"{up.to_user_string()} failed check {', '.join(failed)}"
    return ""


def compute_states(instance: DagsterInstance, recipes: list[RecipeAssets],
                   store: ArtifactStore | None = None, root: Path | None = None) -> dict[AssetKey, AssetState]:
    store = store or ArtifactStore(store_root())
    root = root or data_root()
    states: dict[AssetKey, AssetState] = {}
    for ra in recipes:
        for plan in ra.plans.values():  # topological order
            if plan.partitions:
                states[plan.key] = (_steps_state(instance, plan, states, store) if plan.kind == eval_steps.KIND
                                    else _partitioned_state(instance, plan, states, store))
                continue
            rec = lineage.latest(instance, plan.key)
            if rec is None:
                blocked = _blocked_by(plan, states)
                states[plan.key] = (AssetState(plan, "blocked", blocked, None) if blocked else
                                    AssetState(plan, "missing", "never materialized", None, direct=True))
                continue
            reason = _direct_reason(plan, rec, states, store, root)
            blocked = _blocked_by(plan, states)
            if blocked:
                states[plan.key] = AssetState(plan, "blocked", blocked, rec)
                continue
            if reason:
                states[plan.key] = AssetState(plan, "stale", reason, rec, direct=True)
                continue
            waiting = [up for up in _upstream(plan) if states[up].status != "fresh"]
            if waiting:
                names = ", ".join(sorted(u.to_user_string() for u in waiting))
                states[plan.key] = AssetState(plan, "stale", f"upstream not fresh: {names}", rec)
            else:
                states[plan.key] = AssetState(plan, "fresh", "", rec)
    return states


def frontier(states: dict[AssetKey, AssetState]) -> list[AssetKey]:
    """Directly stale or missing assets whose inputs are all fresh."""
    return [
        key for key, s in states.items()
        if s.status != "fresh" and s.direct and all(states[u].status == "fresh" for u in _upstream(s.plan))
    ]


@dataclass
class SyncReport:
    ran: list[str] = field(default_factory=list)
    cache_hit: list[str] = field(default_factory=list)
    untouched: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # partitions whose files left their folder
    rounds: int = 0
    seconds: float = 0.0
    error: str | None = None

    def as_json(self) -> dict:
        out = {"ran": self.ran, "cache_hit": self.cache_hit, "untouched": self.untouched}
        if self.removed:
            out["removed"] = self.removed
        if self.failed:
            out["failed"] = self.failed
            out["error"] = self.error
        return out


QUIET_RUN_CONFIG = {"loggers": {"compact": {"config": {"log_level": "INFO"}}}}


def sync(defs: Definitions, recipes: list[RecipeAssets], instance: DagsterInstance,
         echo: Callable[[str], None] = lambda s: None, max_rounds: int = 50) -> SyncReport:
    started = time.time()
    report = SyncReport()
    job = defs.resolve_implicit_global_asset_job_def()
    touched: set[str] = set()
    store = ArtifactStore(store_root())
    leftovers = store.remove_abandoned()
    if leftovers:
        echo(f"removed {len(leftovers)} temp folder(s) of interrupted builds from {store.root}")
    for round_no in range(1, max_rounds + 1):
        states = compute_states(instance, recipes)
        todo = frontier(states)
        if not todo:
            break
        report.rounds = round_no
        labels = [states[k].plan.label for k in todo]
        fresh = sum(1 for s in states.values() if s.status == "fresh")
        echo(f"round {round_no} [{fresh}/{len(states)} fresh]: " + ", ".join(labels))
        for k in todo:
            echo(f"  · {states[k].plan.label}: {states[k].reason}")
        t0 = time.time()
        failure = _run_round(job, instance, states, todo, report, touched, echo)
        if report.failed:
            report.error = failure or "materialization failed"
            echo(f"✗ failed: {', '.join(report.failed)}\n{report.error}")
            break
        echo(f"  round {round_no} done in {time.time() - t0:.1f}s")
        after = compute_states(instance, recipes)
        stuck = [after[k].plan.label for k in todo if after[k].direct and after[k].status != "fresh"]
        if stuck:  # would loop forever: say so instead
            report.error = "still stale right after materializing: " + ", ".join(
                f"{after[k].plan.label} ({after[k].reason})" for k in todo if after[k].plan.label in stuck)
            break
    else:
        report.error = f"still stale after {max_rounds} rounds"
    final = compute_states(instance, recipes)
    report.removed = _prune_partitions(instance, final, echo)
    blocked = [s for s in final.values() if s.status == "blocked"]
    if blocked and not report.error:
        report.error = "blocked by failed checks: " + "; ".join(f"{s.plan.label}: {s.reason}" for s in blocked)
        echo(f"✗ {report.error}")
    if store.root.is_dir():
        note = repair_database(store.root)
        if note:
            echo(note)
    all_labels = [p.label for ra in recipes for p in ra.plans.values()]
    report.untouched = [label for label in all_labels if label not in touched and label not in report.failed]
    report.seconds = time.time() - started
    return report


def _prune_partitions(instance: DagsterInstance, states: dict[AssetKey, AssetState],
                      echo: Callable[[str], None]) -> list[str]:
    """Remove the partitions whose files left the folder, as the file sensors do between syncs, so
    the UI shows no partition for a file that is gone. Their outputs stay in the store."""
    removed = []
    for st in states.values():
        if st.expected is None:
            continue
        gone = sorted(set(instance.get_dynamic_partitions(st.plan.partitions)) - set(st.expected))
        for name in gone:
            instance.delete_dynamic_partition(st.plan.partitions, name)
        if gone:
            removed += [f"{st.plan.label}[{name}]" for name in gone]
            more = f" and {len(gone) - 3} more" if len(gone) > 3 else ""
            echo(f"  − {st.plan.label}: removed {len(gone)} partition(s) whose files are gone: "
                 f"{', '.join(gone[:3])}{more}")
    return removed


def _execute(job, instance: DagsterInstance, keys: list[AssetKey], partition: str | None = None):
    return job.execute_in_process(
        instance=instance, asset_selection=keys, raise_on_error=False, partition_key=partition,
        tags={"foundry/sync": "true"}, run_config=QUIET_RUN_CONFIG,
    )


def _note(report: SyncReport, touched: set[str], label: str, rec: lineage.Record | None, run_id: str,
          echo: Callable[[str], None], built: bool = False) -> bool:
    """Record one materialization; `built`: its output was computed by this sync's batch run."""
    if rec is None or rec.run_id != run_id:
        report.failed.append(label)
        return False
    touched.add(label.split("[")[0])
    hit = rec.cache == "hit" and not built
    (report.cache_hit if hit else report.ran).append(label)
    echo(f"  {'=' if hit else '✓'} {label} ({'cache hit' if hit else 'ran'})")
    return True


def _run_round(job, instance: DagsterInstance, states: dict[AssetKey, AssetState], todo: list[AssetKey],
               report: SyncReport, touched: set[str], echo: Callable[[str], None]) -> str | None:
    """Materialize one round: the unpartitioned assets in one run, then each partition to build."""
    plain = [k for k in todo if not states[k].plan.partitions]
    if plain:
        result = _execute(job, instance, plain)
        mine = lineage.of_run(instance, result.run_id)
        for key in plain:
            _note(report, touched, states[key].plan.label, mine.get((key, None)), result.run_id, echo)
        if report.failed:
            return _failure_message(result)
    for key in (k for k in todo if states[k].plan.partitions):
        plan = states[key].plan
        names = states[key].partitions
        built: list[str] = []
        if len(names) > 1 and plan.kind == "filtered":
            t0 = time.time()
            meter = Progress(f"{plan.label}: curating {len(names)} partitions", report=lambda r: echo(f"  {describe(r)}"))
            try:
                built = prebuild_filtered(plan, names, FoundryResource(), progress=meter)
            except Exception as err:  # noqa: BLE001 - each partition's own run reports the error in detail
                echo(f"  ! {plan.label}: batch build failed ({type(err).__name__}: {err}); building one by one")
            if built:
                echo(f"  ⇶ {plan.label}: {len(built)} partitions curated in one datatrove run ({time.time() - t0:.1f}s)")
        _add_partitions(instance, plan.partitions, names)
        for name in names:
            result = _execute(job, instance, [key], partition=name)
            rec = lineage.of_run(instance, result.run_id).get((key, name))
            if not _note(report, touched, f"{plan.label}[{name}]", rec, result.run_id, echo, built=name in built):
                return _failure_message(result)
    return None


def _add_partitions(instance: DagsterInstance, partitions: str, names: list[str]) -> None:
    """Register file partitions; another sync adding the same names at once is no error."""
    for attempt in range(3):
        known = set(instance.get_dynamic_partitions(partitions))
        new = [n for n in names if n not in known]
        if not new:
            return
        try:
            instance.add_dynamic_partitions(partitions, new)
            return
        except Exception:  # noqa: BLE001 - a unique-index race with a concurrent sync: look again
            if attempt == 2:
                raise
            time.sleep(0.2)


def _failure_message(result) -> str | None:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            err = event.step_failure_data.error
            while err.cause is not None and err.message.startswith("dagster._core.errors"):
                err = err.cause
            return f"{event.step_key}: {err.message.strip()}"
    return None
