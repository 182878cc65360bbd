"""Foundry evaluation: cloze multiple-choice tasks through lighteval, and held-out loss.

Entry point: ``evaluation.run.evaluate_checkpoint``. Importing this package is cheap;
lighteval (~10 s to import) is only imported when tasks are actually run.
"""

from evaluation.run import evaluate_checkpoint
from evaluation.tasks import TASK_SPECS, known_tasks

__all__ = ["evaluate_checkpoint", "TASK_SPECS", "known_tasks"]
