"""One entry point: evaluate a checkpoint on cloze multiple-choice tasks (through lighteval)
and on held-out text.

Offline: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set (if unset) before lighteval or
datasets are imported here; the caller should set them (and HF_HOME) process-wide too,
because ``datasets`` reads them once, at its first import.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from pathlib import Path

from evaluation.tasks import check_tasks, known_tasks

logger = logging.getLogger(__name__)

# Held-out text sets, paths relative to data_root (the folder holding eval/ and text/).
# The validation split is used; test is kept untouched.
HELDOUT_SETS: dict[str, str] = {
    "wikitext2": "text/wikitext2/valid.txt",
}


def set_offline_env() -> None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")


def _checkpoint_id(ckpt_dir: Path) -> str:
    """Identity of a checkpoint's files (path, sizes, mtimes): keys lighteval's prediction cache."""
    h = hashlib.sha256(str(ckpt_dir.resolve()).encode())
    for p in sorted(ckpt_dir.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _details_rows(spec, details: list) -> list[dict]:
    """Per-item rows: task, form, item (0-based source index), pred, gold, correct, correct_norm."""
    rows = []
    for det in details:
        doc, resp = det.doc, det.model_response
        lps = list(resp.logprobs)[: len(doc.choices)]
        gold = doc.gold_index if isinstance(doc.gold_index, int) else doc.gold_index[0]
        if spec.scoring == "last_word":
            correct = bool(det.metric.get("acc", any(resp.argmax_logits_eq_gold)))
            pred = pred_norm = gold if correct else -1  # -1: the greedy continuation is something else
            correct_norm = correct
        else:
            norm = [lp / len(c) for lp, c in zip(lps, doc.choices, strict=True)]
            pred = max(range(len(lps)), key=lps.__getitem__)
            pred_norm = max(range(len(norm)), key=norm.__getitem__)
            correct = bool(det.metric.get("acc", pred == gold))
            correct_norm = bool(det.metric.get("acc_norm", pred_norm == gold))
        rows.append(
            {
                "task": spec.name,
                "form": spec.form,
                "item": int((doc.specific or {}).get("source_index", int(doc.id))),
                "pred": pred,
                "pred_norm": pred_norm,
                "gold": gold,
                "correct": correct,
                "correct_norm": correct_norm,
                "logprobs": lps,
            }
        )
    rows.sort(key=lambda r: r["item"])
    return rows


def run_lighteval(
    model,
    tokenizer,
    tasks: list[str],
    max_items: int | None,
    data_root: Path,
    work_dir: Path,
    model_name: str,
    checkpoint_id: str = "",
    seed: int = 0,
    batch_size: int = 32,
    lighteval_model=None,
    num_fewshot: int = 0,
    progress=None,
) -> tuple[list[dict], list[dict], dict[str, str]]:
    """Run the tasks through lighteval's Pipeline. Returns (metric rows, per-item rows, failed).

    ``failed`` maps a task that could not be evaluated (unreadable, malformed or empty data,
    or an error while running it) to its error message; the other tasks are still reported.
    Unknown task names raise at once (a recipe error), and so does a run where every task fails.
    ``lighteval_model`` overrides the wrapper built from model/tokenizer (tests use it).
    """
    set_offline_env()
    specs = check_tasks(tasks)
    import torch

    # lighteval's transformers backend calls torch.set_grad_enabled(False) at import time;
    # restore the caller's mode so nothing trained later in this process silently breaks.
    grad_mode = torch.is_grad_enabled()
    try:
        import lighteval.pipeline  # noqa: F401
    finally:
        torch.set_grad_enabled(grad_mode)

    from evaluation.lighteval_model import FoundryLightevalModel, FoundryModelConfig
    from evaluation.tasks import build_task_config, lighteval_name, prepare_task_dataset

    work_dir = Path(work_dir)
    configs: dict[str, object] = {}
    failed: dict[str, str] = {}
    for spec in specs:
        try:
            folder = prepare_task_dataset(spec, data_root, work_dir / "datasets", max_items, seed, num_fewshot)
            configs[spec.name] = build_task_config(spec, folder)
        except (ValueError, OSError) as e:  # messages name the task and the file
            failed[spec.name] = str(e)
            logger.error("eval task %s failed: %s", spec.name, e)
    if lighteval_model is None:
        lighteval_model = FoundryLightevalModel(
            model,
            tokenizer,
            FoundryModelConfig(
                model_name=model_name,
                checkpoint_id=checkpoint_id,
                cache_dir=str(work_dir / "lighteval_cache"),
                batch_size=batch_size,
            ),
        )
    if progress is not None:  # a dataprep.progress.Progress: choices scored so far
        lighteval_model.progress = progress

    results: dict = {}
    details: dict = {}
    if configs:
        try:
            results, details = _run_pipeline(list(configs.values()), lighteval_model, work_dir)
        except Exception as e:  # noqa: BLE001 - isolate the task at fault below
            if len(configs) == 1:
                (name,) = configs
                failed[name] = f"{name}: {type(e).__name__}: {e}"
            else:  # run each task alone, so one broken task does not sink the others
                logger.warning("eval run of %d tasks failed (%s); retrying them one by one", len(configs), e)
                for name, cfg in configs.items():
                    try:
                        r, d = _run_pipeline([cfg], lighteval_model, work_dir)
                        results.update(r)
                        details.update(d)
                    except Exception as task_error:  # noqa: BLE001
                        failed[name] = f"{name}: {type(task_error).__name__}: {task_error}"
                        logger.error("eval task %s failed: %s", name, task_error)
    if specs and len(failed) == len(specs):
        raise RuntimeError("every eval task failed:\n" + "\n".join(f"  {m}" for m in failed.values()))

    rows, item_rows = [], []
    for spec in specs:
        if spec.name in failed:
            continue
        name = lighteval_name(spec.name)
        task_details = details.get(f"{name}|0", [])
        n = len(task_details)
        res = results[f"{name}:0"]
        for metric in spec.metrics:
            rows.append(
                {
                    "task": spec.name,
                    "form": spec.form,
                    "metric": metric,
                    "value": float(res[metric]),
                    "stderr": float(res.get(f"{metric}_stderr", float("nan"))),
                    "n_items": n,
                }
            )
        item_rows.extend(_details_rows(spec, task_details))
    return rows, item_rows, failed


def _run_pipeline(configs: list, lighteval_model, work_dir: Path) -> tuple[dict, dict]:
    """One lighteval Pipeline over these task configs: (results by "name:0", details by "name|0").

    Few-shot examples are already in the prepared prompts, so lighteval runs every task 0-shot."""
    import numpy as np
    import torch
    from lighteval.logging.evaluation_tracker import EvaluationTracker
    from lighteval.pipeline import ParallelismManager, Pipeline, PipelineParameters

    from evaluation.offline_registry import custom_tasks_only, make_tasks_module

    grad_mode = torch.is_grad_enabled()
    # lighteval reseeds the global random / numpy RNGs; do not leak that into the caller.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        tracker = EvaluationTracker(output_dir=str(work_dir / "lighteval_output"), save_details=True)
        params = PipelineParameters(
            launcher_type=ParallelismManager.NONE,
            custom_tasks_directory=make_tasks_module(configs),  # Registry accepts a module object
            max_samples=None,  # the prepared folders already hold exactly the selected items
            dataset_loading_processes=1,
        )
        with custom_tasks_only():
            pipeline = Pipeline(
                tasks=",".join(f"{c.name}|0" for c in configs),
                pipeline_parameters=params,
                evaluation_tracker=tracker,
                model=lighteval_model,
            )
        pipeline.evaluate()
        pipeline.save_and_push_results()
        return pipeline.get_results()["results"], pipeline.get_details()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_grad_enabled(grad_mode)


def _score_heldout_source(model, tokenizer, folder: Path, max_tokens: int) -> dict:
    from evaluation.heldout import heldout_loss_documents, load_token_documents

    documents = load_token_documents(folder)
    if not documents:
        raise ValueError(f"{folder}: no held-out documents (the source is too small for its held-out share)")
    return heldout_loss_documents(model, tokenizer, documents, model.config.max_seq_len, max_tokens)


def evaluate_checkpoint(
    ckpt_dir: Path,
    tokenizer_path: Path,
    tasks: list[str],
    max_items: int | None,
    data_root: Path,
    work_dir: Path,
    heldout: str | None = "wikitext2",
    heldout_max_tokens: int = 50_000,
    seed: int = 0,
    num_fewshot: int = 0,
    heldout_sources: dict[str, Path] | None = None,
    progress=None,
) -> dict:
    """Evaluate one checkpoint.

    Args:
      ckpt_dir: a ``training.checkpoint`` directory (config.json + model.safetensors).
      tokenizer_path: tokenizer.json of the ``tokenizers`` BPE (with ``<|endoftext|>``).
      tasks: names from ``evaluation.tasks.TASK_SPECS`` (may be empty).
      max_items: items per task (a seeded random subset; None = all).
      data_root: folder holding ``eval/`` and ``text/`` (e.g. /work/shared/data); read only.
      work_dir: scratch folder owned by the caller (prepared datasets, lighteval cache and output).
      heldout: a key of ``HELDOUT_SETS`` or None.
      seed: selects the item subset (and the few-shot examples).
      num_fewshot: solved examples put before each prompt (see evaluation.tasks); 0 = zero-shot.
      progress: a dataprep.progress.Progress that counts the choices scored (the UI and log show rate and ETA).
      heldout_sources: source name -> folder of its held-out documents' tokens (the ``heldout/``
        folder of a tokenized output); each is scored up to heldout_max_tokens as task
        ``heldout:<source>`` with n_items = documents scored. One that cannot be scored (e.g. no
        held-out documents) is listed in ``failed``.

    Returns ``{"rows": [{"task", "form", "metric", "value", "stderr", "n_items"}, ...],
    "details": [{"task", "form", "item", "pred", "pred_norm", "gold", "correct", "correct_norm", "logprobs"}, ...],
    "failed": {task: error message}, "meta": {...}}``. A task whose data cannot be read or
    whose run fails is left out of rows/details and listed in ``failed``; the others are kept. Task rows have the metrics of ``TaskSpec.metrics`` ("acc", "acc_norm",
    "acc_norm_token"; form "cloze" or "mc"); the held-out (form "heldout") row set has
    "loss" (nats/token) and "bits_per_byte", with n_items = tokens scored (stderr None); a
    ``heldout:<source>`` row set has the same metrics with n_items = documents scored.
    ``item`` is the 0-based row index in the task's source file.
    """
    tasks = list(tasks)
    check_tasks(tasks)  # fail fast, before any heavy import
    if not isinstance(num_fewshot, int) or isinstance(num_fewshot, bool) or num_fewshot < 0:
        raise ValueError(f"num_fewshot must be an integer >= 0, got {num_fewshot!r}")
    if heldout is not None and heldout not in HELDOUT_SETS:
        raise ValueError(f"unknown heldout set {heldout!r}; known: {', '.join(sorted(HELDOUT_SETS))}")
    heldout_path = None
    if heldout is not None:
        heldout_path = Path(data_root) / HELDOUT_SETS[heldout]
        if not heldout_path.is_file():
            raise FileNotFoundError(f"held-out text not found at {heldout_path} (data_root must hold eval/ and text/)")

    set_offline_env()
    from tokenizers import Tokenizer

    from training.checkpoint import load_checkpoint

    ckpt_dir, work_dir = Path(ckpt_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    model = load_checkpoint(ckpt_dir, device="cpu")
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    ckpt_id = _checkpoint_id(ckpt_dir)
    model_name = f"foundry-{ckpt_dir.name}-{ckpt_id}"
    timings["load"] = time.perf_counter() - t0

    rows: list[dict] = []
    item_rows: list[dict] = []
    failed: dict[str, str] = {}
    if tasks:
        t0 = time.perf_counter()
        task_rows, item_rows, failed = run_lighteval(
            model, tokenizer, tasks, max_items, data_root, work_dir, model_name, ckpt_id, seed=seed,
            num_fewshot=num_fewshot, progress=progress,
        )
        if progress is not None:
            progress.finish()
        rows.extend(task_rows)
        timings["tasks"] = time.perf_counter() - t0

    if heldout_path is not None:
        from evaluation.heldout import heldout_loss

        t0 = time.perf_counter()
        h = heldout_loss(model, tokenizer, heldout_path, model.config.max_seq_len, heldout_max_tokens)
        for metric in ("loss", "bits_per_byte"):
            rows.append({"task": heldout, "form": "heldout", "metric": metric, "value": float(h[metric]), "stderr": None,
                         "n_items": int(h["tokens"])})
        timings["heldout"] = time.perf_counter() - t0

    for source, folder in sorted((heldout_sources or {}).items()):
        t0 = time.perf_counter()
        task = f"heldout:{source}"
        try:
            h = _score_heldout_source(model, tokenizer, Path(folder), heldout_max_tokens)
        except (ValueError, OSError) as e:  # the others are still reported
            failed[task] = f"{task}: {e}"
            logger.error("held-out set %s failed: %s", task, e)
            continue
        for metric in ("loss", "bits_per_byte"):
            rows.append({"task": task, "form": "heldout", "metric": metric, "value": float(h[metric]), "stderr": None,
                         "n_items": int(h["documents"])})
        timings[task] = time.perf_counter() - t0

    return {
        "rows": rows,
        "details": item_rows,
        "failed": failed,
        "meta": {
            "model_name": model_name,
            "checkpoint_id": ckpt_id,
            "tasks": tasks,
            "max_items": max_items,
            "seed": seed,
            "num_fewshot": num_fewshot,
            "heldout": heldout,
            "heldout_sources": sorted(heldout_sources or {}),
            "known_tasks": known_tasks(),
            "seconds": timings,
        },
    }
