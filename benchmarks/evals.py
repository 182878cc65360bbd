"""Log-likelihood scoring throughput: shared-prefix trees vs one row per choice.

The same randomly initialised Transformer (default d_model 256, 4 layers) and the same real eval
items (HellaSwag, ARC-Easy, WinoGrande ... from the data root, via evaluation.tasks) are scored
by `FoundryLightevalModel.score_docs` (what lighteval calls, minus its cache) in three ways:

  loop   the naive per-choice loop: every (context, choice) its own forward (batch_size 1)
  rows   one row per choice, rows sorted by length and run in padded batches
         (`shared_prefix=False`, the path before shared-prefix batching)
  tree   each item's choices packed into one prefix tree, the context computed once
         (`shared_prefix=True`, the default)

Printed per mode: items/s, choices/s, model input tokens per item, and the best wall time of
--repeats; then the ratios tree/loop and tree/rows, and the largest log-prob difference between
tree and loop (they must agree to float rounding). The tokenizer is a byte-level BPE trained
here on WikiText-2 test text (the model is random, so which text hardly matters; or --tokenizer PATH to a tokenizer.json with <|endoftext|>).

    python benchmarks/evals.py [--tasks hellaswag arc_easy winogrande] [--items 200] [--vocab 8192]
                               [--d-model 256] [--layers 4] [--batch-size 32] [--repeats 3]
                               [--fewshot 0] [--modes loop rows tree] [--threads N] [--json]
    python benchmarks/evals.py --smoke      # seconds: a check that it runs, not a measurement
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))  # `evaluation.*`, `training.*` when run as a script
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from evaluation.tasks import TASK_SPECS, cloze_prompt, fewshot_indices, load_records, select_indices, with_fewshot  # noqa: E402

EOS = "<|endoftext|>"
MODES = ("loop", "rows", "tree")


def train_tokenizer(text_file: Path, vocab: int, max_chars: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = text_file.read_text(encoding="utf-8")[:max_chars]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    tok.save(str(out))
    return Tokenizer.from_file(str(out))


def load_docs(tasks: list[str], data_root: Path, items: int, seed: int, fewshot: int) -> list:
    docs = []
    for task in tasks:
        records = load_records(TASK_SPECS[task], data_root)
        scored = select_indices(len(records), items, seed)
        for i in scored:
            shots = [records[j] for j in fewshot_indices(len(records), scored, i, fewshot, seed)]
            docs.append(cloze_prompt(with_fewshot(records[i], shots), task))
    return docs


def input_tokens(lm, docs: list, tree: bool) -> int:
    """Tokens the model runs on: rows (sum of request lengths) or tree nodes."""
    from evaluation.shared_prefix import pack_groups

    total = 0
    for doc in docs:
        pairs = _pairs(lm, doc)
        prepared = lm._prepare(pairs)
        if tree:
            rows = pack_groups([[(i, s, n) for i, (s, n, _) in enumerate(prepared)]], lm.max_length)
            total += sum(len(r) for r in rows)
        else:
            total += sum(len(s) - 1 for s, _, _ in prepared)
    return total


def _pairs(lm, doc) -> list[tuple[list[int], list[int]]]:
    import dataclasses

    contexts = (doc.specific or {}).get("contexts")
    if contexts:
        texts = [lm.context_for(dataclasses.replace(doc, query=q)) for q in contexts]
    else:
        texts = [lm.context_for(doc)] * len(doc.choices)
    return [lm.encode_pair(c, choice) for c, choice in zip(texts, doc.choices, strict=True)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=Path(os.environ.get("FOUNDRY_DATA_ROOT", "/work/shared/data")))
    p.add_argument("--tasks", nargs="+", default=["hellaswag", "arc_easy", "winogrande"])
    p.add_argument("--items", type=int, default=200, help="items per task (seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fewshot", type=int, default=0, help="solved examples before each prompt")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json to use instead of training one")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokenizer-chars", type=int, default=3_000_000, help="WikiText-2 characters to train on")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward (rows and tree modes)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (not a measurement)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.smoke:
        args.items, args.vocab, args.tokenizer_chars, args.repeats = 2, 400, 100_000, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    from evaluation.lighteval_model import FoundryLightevalModel, FoundryModelConfig
    from training.model import ModelConfig, Transformer

    with tempfile.TemporaryDirectory(prefix="bench_evals_") as tmp:
        t0 = time.perf_counter()
        if args.tokenizer:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(args.tokenizer))
        else:
            tok = train_tokenizer(args.data_root / "text/wikitext2/test.txt", args.vocab, args.tokenizer_chars,
                                  Path(tmp) / "tokenizer.json")
        tokenizer_s = time.perf_counter() - t0
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=args.d_model, n_layers=args.layers,
                          n_heads=args.heads, n_kv_heads=args.kv_heads, ffn_hidden=3 * args.d_model,
                          max_seq_len=args.max_seq_len)
        model = Transformer(cfg).eval()
        docs = load_docs(args.tasks, args.data_root, args.items, args.seed, args.fewshot)
        n_choices = sum(len(d.choices) for d in docs)

        def make(mode: str):
            bs = 1 if mode == "loop" else args.batch_size
            return FoundryLightevalModel(model, tok, FoundryModelConfig(
                model_name=f"bench-{mode}", cache_dir=tmp, batch_size=bs, shared_prefix=mode == "tree"))

        results, scores = {}, {}
        for mode in args.modes:
            lm = make(mode)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = lm.score_docs(docs)
                times.append(time.perf_counter() - t0)
            scores[mode] = [lp for r in out for lp in r.logprobs]
            best = min(times)
            results[mode] = {"seconds": best, "items_per_s": len(docs) / best, "choices_per_s": n_choices / best,
                             "tokens_per_item": input_tokens(lm, docs, mode == "tree") / len(docs)}

    report = {
        "device": "cpu", "threads": torch.get_num_threads(), "tasks": args.tasks, "items": len(docs),
        "choices": n_choices, "fewshot": args.fewshot, "params": model.num_params(), "vocab": cfg.vocab_size,
        "d_model": cfg.d_model, "layers": cfg.n_layers, "batch_size": args.batch_size, "repeats": args.repeats,
        "tokenizer_s": round(tokenizer_s, 2), "modes": results, "smoke": args.smoke,
    }
    if "tree" in results:
        for base in ("loop", "rows"):
            if base in results:
                report[f"tree_vs_{base}"] = results["tree"]["items_per_s"] / results[base]["items_per_s"]
        ref = scores.get("loop") or scores.get("rows")
        if ref:
            pairs = list(zip(scores["tree"], ref, strict=True))
            report["max_abs_logprob_diff"] = max(abs(a - b) for a, b in pairs)
            report["max_rel_logprob_diff"] = max(abs(a - b) / max(1.0, abs(b)) for a, b in pairs)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{len(docs)} items ({', '.join(args.tasks)}; {n_choices} choices, {args.fewshot}-shot), "
          f"model {report['params'] / 1e6:.1f}M params (d_model {cfg.d_model}, {cfg.n_layers} layers, "
          f"vocab {cfg.vocab_size}), CPU threads {report['threads']}, best of {args.repeats}"
          + ("  [SMOKE: not a measurement]" if args.smoke else ""))
    print(f"{'mode':6} {'items/s':>10} {'choices/s':>10} {'tokens/item':>12} {'seconds':>9}")
    for mode, r in results.items():
        print(f"{mode:6} {r['items_per_s']:10.2f} {r['choices_per_s']:10.2f} {r['tokens_per_item']:12.1f} "
              f"{r['seconds']:9.2f}")
    for base in ("loop", "rows"):
        if f"tree_vs_{base}" in report:
            print(f"tree / {base}: {report[f'tree_vs_{base}']:.2f}x items/s")
    if "max_abs_logprob_diff" in report:
        print(f"max |log-prob(tree) - log-prob(naive)|: {report['max_abs_logprob_diff']:.2e} "
              f"(relative {report['max_rel_logprob_diff']:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
