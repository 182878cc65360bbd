"""Dagster definitions for every recipe: `dagster dev -m assets.definitions`.

Recipes come from $FOUNDRY_RECIPES (paths separated by ':') or else recipes/*.yaml. An entry may
also be an ablation file (it names a `base:` recipe): it adds one asset group per run and its
report. Ablation files are added from $FOUNDRY_ABLATIONS (globs separated by ':', e.g.
`ablations/*.yaml`); by default none are, since a grid trains many models and a plain
`foundry sync` should not start them.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from dagster import Definitions

from .ablation import is_ablation_file
from .ablation_assets import AblationAssets, ablation_bundles
from .automation import automation_sensor
from .console import compact_console
from .factory import RecipeAssets, recipe_assets
from .nightly import nightly_schedule, sync_job
from .recipe import RecipeError, load_recipe
from .resources import FoundryResource
from .settings import PROJECT_ROOT, configure_offline_environment, data_root


def recipe_paths() -> list[Path]:
    env = os.environ.get("FOUNDRY_RECIPES")
    paths = ([Path(p) for p in env.split(os.pathsep) if p] if env
             else sorted((PROJECT_ROOT / "recipes").glob("*.yaml")))
    return paths + [p for p in ablation_paths() if p not in paths]


def ablation_paths() -> list[Path]:
    """Files matching $FOUNDRY_ABLATIONS (relative globs are taken in the project)."""
    found: list[Path] = []
    for pattern in (os.environ.get("FOUNDRY_ABLATIONS") or "").split(os.pathsep):
        if pattern:
            full = pattern if os.path.isabs(pattern) else str(PROJECT_ROOT / pattern)
            found += [Path(p) for p in sorted(glob.glob(full))]
    return list(dict.fromkeys(found))


def bundle_name(bundle: RecipeAssets | AblationAssets) -> str:
    return bundle.name if isinstance(bundle, AblationAssets) else bundle.recipe.name


def load_all(paths: list[Path] | None = None) -> list[RecipeAssets | AblationAssets]:
    """Recipes and ablations (their runs, then their report), with every asset group name unique."""
    loaded: list[RecipeAssets | AblationAssets] = []
    seen: dict[str, str] = {}
    for path in paths if paths is not None else recipe_paths():
        if is_ablation_file(path):
            bundles = ablation_bundles(path, data_root())
        else:
            bundles = [recipe_assets(load_recipe(path, data_root()), path)]
        for bundle in bundles:
            name = bundle_name(bundle)
            if name in seen:
                raise RecipeError(f"{path}: the name '{name}' is already used by {seen[name]}")
            seen[name] = str(path)
            loaded.append(bundle)
    return loaded


def build_definitions(recipes: list[RecipeAssets]) -> Definitions:
    """Every recipe's assets and sensors, the automation sensor, and the nightly `foundry sync`
    job with its schedule (assets/nightly.py; stopped by default)."""
    assets = Definitions(
        assets=[a for r in recipes for a in r.assets],
        sensors=[automation_sensor(), *(s for r in recipes for s in r.sensors)],
        resources={"foundry": FoundryResource()},
        loggers={"compact": compact_console},
    )
    sync = sync_job(assets, recipes)
    return Definitions.merge(assets, Definitions(jobs=[sync], schedules=[nightly_schedule(sync)]))


configure_offline_environment()
RECIPES = load_all()
defs = build_definitions(RECIPES)
