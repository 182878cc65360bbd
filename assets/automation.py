"""Automation conditions and the sensor that evaluates them.

Data assets rebuild on their own: when an upstream updates (eager) or when their own spec or
logic changes (code version) -- eager alone ignores code-version changes. Training and
evaluation follow the recipe's policy, since a training run is expensive to start by accident.
`foundry sync` never depends on any of this: it computes what is stale itself.
"""

from __future__ import annotations

from dagster import AssetSelection, AutomationCondition, AutomationConditionSensorDefinition, DefaultSensorStatus

from .recipe import AutomationSpec

DATA_KINDS = {"raw", "curated", "ocr_queue", "tokenizer", "tokenized", "mixture", "contamination", "data_stats"}


def data_condition() -> AutomationCondition:
    return (AutomationCondition.eager() | AutomationCondition.code_version_changed()).with_label(
        "eager or own code version changed"
    )


def condition_for(kind: str, policy: AutomationSpec) -> AutomationCondition | None:
    if kind == "filtered":
        # New file partitions are started by the source's sensor; here only a changed filter
        # spec re-runs the existing ones (eager would start new partitions a second time).
        return AutomationCondition.code_version_changed().with_label("own code version changed")
    if kind in DATA_KINDS:
        return data_condition()
    if kind == "eval_step":
        return None  # kept checkpoint steps: their sensor adds and evaluates them (assets/eval_steps.py)
    choices = {"checkpoint": policy.training, "rephrased": policy.rephrase}
    choice = choices.get(kind, policy.evaluation)
    return data_condition() if choice == "eager" else None


def automation_sensor() -> AutomationConditionSensorDefinition:
    return AutomationConditionSensorDefinition(
        "foundry_automation",
        target=AssetSelection.all(),
        default_status=DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description="Evaluates every asset's automation condition (eager data, per-recipe training policy).",
    )
