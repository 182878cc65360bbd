"""Workaround: make lighteval's task Registry see only our own tasks.

Why: in lighteval 0.13.0, ``Registry.__init__`` calls ``Registry.load_all_task_configs``,
which imports *every* built-in task module (``lighteval/tasks/tasks/*.py`` and the
``*/main.py`` sub-packages) before adding custom tasks. One of them,
``tiny_benchmarks.py``, runs ``requests.get(...)`` at import time with no timeout, so on a
machine without internet building a ``Pipeline`` hangs or fails. Importing ~100 task
modules also costs seconds we do not need, and a custom task named like a built-in one
(e.g. ``hellaswag``) is rejected as a conflict.

What: inside ``custom_tasks_only()``, ``Registry.load_all_task_configs`` is replaced by a
function that loads only the ``TASKS_TABLE`` of the custom-tasks module handed to the
Registry (the Pipeline passes ``PipelineParameters.custom_tasks_directory``, which may be a
module object). The original is restored on exit. Everything else in the Registry (task
spec parsing, config copies, superset expansion) is lighteval's own code.

Check on lighteval upgrades: ``tests/test_evaluation.py`` exercises this with sockets
blocked; if lighteval renames the hook, ``custom_tasks_only`` raises instead of silently
doing nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

_lock = threading.Lock()


def _custom_only_loader(custom_tasks: str | Path | ModuleType | None = None, load_multilingual: bool = False) -> dict:
    from lighteval.tasks.registry import Registry

    if custom_tasks is None:
        return {}
    module = Registry.create_custom_tasks_module(custom_tasks)
    return Registry._extract_configs(module)


@contextmanager
def custom_tasks_only() -> Iterator[None]:
    """Within this block, lighteval Registries load only the custom tasks module's TASKS_TABLE."""
    from lighteval.tasks.registry import Registry

    original = Registry.__dict__.get("load_all_task_configs")
    if not isinstance(original, staticmethod):
        raise RuntimeError(
            "lighteval.tasks.registry.Registry.load_all_task_configs is not the staticmethod this "
            "workaround replaces (lighteval version changed?); revisit evaluation/offline_registry.py"
        )
    with _lock:
        Registry.load_all_task_configs = staticmethod(_custom_only_loader)
        try:
            yield
        finally:
            Registry.load_all_task_configs = original


def make_tasks_module(configs: list, name: str = "foundry_eval_tasks") -> ModuleType:
    """An in-memory module exposing ``TASKS_TABLE`` (what lighteval's Registry looks for)."""
    module = ModuleType(name)
    module.TASKS_TABLE = list(configs)
    return module
