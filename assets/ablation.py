"""Ablation files: one base recipe, variants and/or a grid of named override sets, seeds.

    name: optimizer
    base: bases/small.yaml            # a recipe file, relative to this file (it may `extends`)
    overrides: {training: {steps: 100}}   # optional: applied to the base for every run
    variants:                         # an axis of named override sets ...
      - {name: adamw, overrides: {optimizer: {name: adamw}}}
    grid:                             # ... and/or more axes; runs are the product of all axes
      lr: [{name: lr1e3, overrides: {optimizer: {lr: 0.001}}}, ...]
      # or relative to each variant's own value, applied after every override:
      # lr: [{name: x0_5, scale: {optimizer.lr: 0.5}}, {name: x1}, {name: x2, scale: {optimizer.lr: 2}}]
    seeds: [0, 1]                     # training.seed of each run
    best_of: {axis: lr, by: wikitext2/bits_per_byte}   # optional: compare each group at its best lr

Each variant x seed becomes a full recipe named `<ablation>__<variant>__s<seed>`, its own asset
group. Nothing else distinguishes it, so every asset whose spec and inputs agree across runs (the
data assets of a training ablation) has one store key and is computed once.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from .ablation_report import metric_direction
from .recipe import (
    NAME_PATTERN,
    Recipe,
    RecipeError,
    Strict,
    _format_validation_error,
    chain_origin,
    check_paths,
    merge_overrides,
    parse_recipe,
    read_recipe_chain,
    read_yaml_mapping,
)
from .settings import expand_vars

# Variant and axis point names: no double underscore, which separates the parts of a run's name.
POINT_NAME = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)*$")
MAX_RUNS = 256  # a grid that expands beyond this is a mistake more often than a plan
VARIANT_AXIS = "variant"  # the axis `variants:` forms


class OverrideSet(Strict):
    name: str = Field(description="lowercase letters, digits, single '_'")
    overrides: dict[str, Any] = Field(default_factory=dict, description="merged into the base recipe")
    scale: dict[str, float] = Field(
        default_factory=dict,
        description="dotted field -> factor, applied after every override of the run: {optimizer.lr: 3} "
                    "multiplies whatever lr the other axes chose, so one lr axis sweeps around each "
                    "optimizer's own centre")
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name_valid(cls, name: str) -> str:
        if not POINT_NAME.match(name):
            raise ValueError(f"'{name}' must be lowercase letters and digits joined by single '_'")
        return name

    @field_validator("scale")
    @classmethod
    def _scale_valid(cls, scale: dict[str, float]) -> dict[str, float]:
        for field, factor in scale.items():
            if not all(field.split(".")):
                raise ValueError(f"'{field}': give a dotted field such as optimizer.lr")
            if not (math.isfinite(factor) and factor > 0):
                raise ValueError(f"'{field}': the factor must be a positive number, got {factor}")
            if field == "training.seed":
                raise ValueError("training.seed cannot be scaled: list the seeds under `seeds:`")
        return scale

    @field_validator("overrides")
    @classmethod
    def _no_identity_keys(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        if "name" in overrides:
            raise ValueError("overrides cannot set 'name': the ablation names each run")
        if isinstance(overrides.get("training"), dict) and "seed" in overrides["training"]:
            raise ValueError("overrides cannot set training.seed: list the seeds under `seeds:`")
        return overrides


class BestOf(Strict):
    """Collapse one grid axis: each group (the other axes' points) is represented by its best point."""

    axis: str
    by: str | None = Field(None, description="metric that picks the best point (lower or higher is better by "
                           "its name); default: held-out bits per byte, else the final training loss")

    @field_validator("by")
    @classmethod
    def _by_ranks(cls, by: str | None) -> str | None:
        if by is not None and metric_direction(by) is None:
            raise ValueError(f"'{by}' has no better direction: use a loss, bits_per_byte or acc* metric "
                             "such as wikitext2/bits_per_byte, train/final_loss or hellaswag/acc_norm")
        return by


class AblationSpec(Strict):
    name: str
    description: str = ""
    base: str = Field(description="recipe file, relative to the ablation file")
    overrides: dict[str, Any] = Field(default_factory=dict, description="applied to the base for every run")
    variants: list[OverrideSet] = Field(default_factory=list)
    grid: dict[str, list[OverrideSet]] = Field(default_factory=dict)
    seeds: list[int] = Field([0], min_length=1)
    best_of: BestOf | None = None

    @field_validator("name")
    @classmethod
    def _name_valid(cls, name: str) -> str:
        if not NAME_PATTERN.match(name) or "__" in name:
            raise ValueError("must be lowercase letters, digits and single '_', starting with a letter")
        return name

    @field_validator("seeds")
    @classmethod
    def _seeds_valid(cls, seeds: list[int]) -> list[int]:
        if any(s < 0 for s in seeds):
            raise ValueError("seeds must be >= 0")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"a seed is listed twice in {seeds}")
        return seeds

    @field_validator("overrides")
    @classmethod
    def _overrides_valid(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        OverrideSet(name="all", overrides=overrides)  # the same rules as a variant's
        return overrides

    @model_validator(mode="after")
    def _axes_valid(self) -> AblationSpec:
        if not self.variants and not self.grid:
            raise ValueError("give `variants` (a list) and/or `grid` (axes of named override sets)")
        if VARIANT_AXIS in self.grid:
            raise ValueError(f"grid axis '{VARIANT_AXIS}' is reserved for `variants:`; name the axis otherwise")
        for axis, points in self.axes().items():
            where = "variants" if axis == VARIANT_AXIS else f"grid.{axis}"
            if not POINT_NAME.match(axis):
                raise ValueError(f"{where}: axis names are lowercase letters and digits joined by single '_'")
            if not points:
                raise ValueError(f"{where}: give at least one entry")
            names = [p.name for p in points]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"{where}: name(s) {twice} used twice")
        if self.best_of is not None and self.best_of.axis not in self.axes():
            raise ValueError(f"best_of.axis '{self.best_of.axis}' is not an axis; axes are {list(self.axes())}")
        if self.best_of is not None and len(self.axes()) < 2:
            raise ValueError("best_of needs at least two axes: one to pick the best point of, one to compare")
        runs = len(self.seeds)
        for points in self.axes().values():
            runs *= len(points)
        if runs > MAX_RUNS:
            raise ValueError(f"expands to {runs} runs (variants x seeds), more than {MAX_RUNS}")
        return self

    def axes(self) -> dict[str, list[OverrideSet]]:
        """Every axis in order: `variants` first (as axis 'variant'), then the grid's."""
        return ({VARIANT_AXIS: self.variants} if self.variants else {}) | dict(self.grid)


@dataclass(frozen=True)
class Run:
    """One variant trained with one seed: a complete recipe."""

    variant: str
    seed: int
    points: dict[str, str]  # axis -> point name
    recipe: Recipe

    @property
    def name(self) -> str:
        return self.recipe.name


@dataclass(frozen=True)
class Ablation:
    spec: AblationSpec
    path: Path
    base_chain: list[Path]
    runs: list[Run]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def axes(self) -> list[str]:
        return list(self.spec.axes())

    def variants(self) -> list[str]:
        return list(dict.fromkeys(r.variant for r in self.runs))


def run_name(ablation: str, variant: str, seed: int) -> str:
    return f"{ablation}__{variant}__s{seed}"


def is_ablation_file(path: str | os.PathLike) -> bool:
    """An ablation file names a `base` recipe; a recipe never has that key."""
    try:
        data = read_yaml_mapping(Path(path), "a recipe or ablation file")
    except RecipeError:
        return False  # let the recipe loader report what is wrong with it
    return "base" in data


def _leaves(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Paths of the values an override set writes (a mapping's keys recursively; anything else is a leaf)."""
    if isinstance(tree, dict) and tree:
        return [leaf for key, value in tree.items() for leaf in _leaves(value, (*prefix, key))]
    return [prefix] if prefix else []  # no overrides at all write nothing


def _check_no_overlap(origin: Path, chosen: list[tuple[str, OverrideSet]]) -> None:
    """Two axes writing the same field would make the result depend on axis order: refuse."""
    written: dict[tuple, str] = {}
    for axis, point in chosen:
        for leaf in _leaves(point.overrides):
            for other_leaf, other in written.items():
                if leaf[:len(other_leaf)] == other_leaf or other_leaf[:len(leaf)] == leaf:
                    field = ".".join(map(str, min(leaf, other_leaf, key=len)))
                    raise RecipeError(f"{origin}: {other} and {axis} '{point.name}' both set '{field}'; "
                                      "an axis must own the fields it changes")
            written[leaf] = f"{axis} '{point.name}'"


def _apply_scales(origin: str, data: dict[str, Any], chosen: list[tuple[str, OverrideSet]]) -> dict[str, Any]:
    """Multiply the fields the points scale, once every override is in (factors of two axes multiply)."""
    for axis, point in chosen:
        for field, factor in point.scale.items():
            *parents, leaf = field.split(".")
            update: dict[str, Any] = {}
            node, target = data, update
            for key in parents:
                node = node.get(key) if isinstance(node, dict) else None
                target = target.setdefault(key, {})
            value = node.get(leaf) if isinstance(node, dict) else None
            if value is None:
                raise RecipeError(f"{origin}: {axis} '{point.name}' scales '{field}', which this run does not set "
                                  "(a default is not scaled: set the value in the base or another axis)")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise RecipeError(f"{origin}: {axis} '{point.name}' scales '{field}', which is {value!r} in this "
                                  "run, not a number")
            # 12 significant digits: 0.001 x 3 is 0.003 in the recipe (and its hash), not 0.0030000000000000005
            scaled = float(f"{value * factor:.12g}")
            target[leaf] = int(scaled) if isinstance(value, int) and scaled.is_integer() else scaled
            data = merge_overrides(data, update)
    return data


def _check_metric_measured(origin: Path, metric: str, runs: list[Run]) -> None:
    """best_of.by must name something every run measures: train/..., an eval task, the held-out
    text set, or a source's held-out split (heldout:<source>)."""
    prefix = metric.rsplit("/", 1)[0]
    for run in runs:
        r = run.recipe
        measured = {"train", *r.evals.tasks, *([r.evals.heldout] if r.evals.heldout else []),
                    *(f"heldout:{s}" for s in r.sources if r.heldout_share(s) > 0)}  # held-out split per source
        if prefix not in measured:
            raise RecipeError(f"{origin}: best_of.by: '{metric}' is not measured by variant '{run.variant}' "
                              f"(it has {sorted(measured)})")


def parse_ablation(data: Any, path: Path) -> AblationSpec:
    try:
        return AblationSpec.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(str(path), err, what="ablation")) from None


def load_ablation(path: str | os.PathLike, data_root: Path | None = None) -> Ablation:
    """Read, validate and expand an ablation file into one checked recipe per variant x seed."""
    path = Path(path)
    spec = parse_ablation(read_yaml_mapping(path, "an ablation file"), path)
    base_file = Path(expand_vars(spec.base)).expanduser()
    base_file = base_file if base_file.is_absolute() else path.parent / base_file
    if not base_file.is_file():
        raise RecipeError(f"{path}: base: recipe file not found: {base_file}")
    base, chain = read_recipe_chain(base_file)
    base = merge_overrides(base, spec.overrides)
    axes = spec.axes()
    runs: list[Run] = []
    seen: dict[str, tuple] = {}
    for combo in itertools.product(*axes.values()):
        chosen = list(zip(axes, combo, strict=True))
        _check_no_overlap(path, chosen)
        variant = "_".join(point.name for point in combo)
        if variant in seen:
            raise RecipeError(f"{path}: points {seen[variant]} and {[p.name for p in combo]} both make variant "
                              f"name '{variant}'; rename one")
        seen[variant] = tuple(p.name for p in combo)
        data = base
        for _, point in chosen:
            data = merge_overrides(data, point.overrides)
        data = _apply_scales(f"{path}: variant '{variant}'", data, chosen)
        for seed in spec.seeds:
            name = run_name(spec.name, variant, seed)
            recipe_data = merge_overrides(data, {"name": name, "training": {"seed": seed}})
            origin = f"{path}: variant '{variant}' seed {seed} (base {chain_origin(chain)})"
            recipe = parse_recipe(recipe_data, origin=origin)
            runs.append(Run(variant, seed, {axis: point.name for axis, point in chosen}, recipe))
    if spec.best_of is not None and spec.best_of.by is not None:
        _check_metric_measured(path, spec.best_of.by, runs)
    # every run reads the same source paths unless an override changes one: check each distinct set once
    checked: set[str] = set()
    for run in runs:
        sources = run.recipe.model_dump_json(include={"sources", "tokenizer"})
        if sources not in checked:
            checked.add(sources)
            check_paths(run.recipe, origin=f"{path}: variant '{run.variant}'", data_root=data_root)
    return Ablation(spec=spec, path=path, base_chain=chain, runs=runs)
