"""Dagster definitions for every recipe: `dagster dev -m assets.definitions`.

Recipes come from $FOUNDRY_RECIPES (paths separated by ':') or else recipes/*.yaml.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import Definitions

from .automation import automation_sensor
from .console import compact_console
from .factory import RecipeAssets, recipe_assets
from .recipe import RecipeError, load_recipe
from .resources import FoundryResource
from .settings import PROJECT_ROOT, configure_offline_environment, data_root


def recipe_paths() -> list[Path]:
    env = os.environ.get("FOUNDRY_RECIPES")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return sorted((PROJECT_ROOT / "recipes").glob("*.yaml"))


def load_all(paths: list[Path] | None = None) -> list[RecipeAssets]:
    loaded: list[RecipeAssets] = []
    seen: dict[str, Path] = {}
    for path in paths if paths is not None else recipe_paths():
        recipe = load_recipe(path, data_root())
        if recipe.name in seen:
            raise RecipeError(f"{path}: recipe name '{recipe.name}' is already used by {seen[recipe.name]}")
        seen[recipe.name] = path
        loaded.append(recipe_assets(recipe, path))
    return loaded


def build_definitions(recipes: list[RecipeAssets]) -> Definitions:
    return Definitions(
        assets=[a for r in recipes for a in r.assets],
        sensors=[automation_sensor(), *(s for r in recipes for s in r.sensors)],
        resources={"foundry": FoundryResource()},
        loggers={"compact": compact_console},
    )


configure_offline_environment()
RECIPES = load_all()
defs = build_definitions(RECIPES)
