"""Local Hugging Face causal-LM backend: batched `generate` on a model folder.

The model folder must hold `config.json`, the weights and a tokenizer; nothing is downloaded
(`local_files_only=True`).

Prompts: when the tokenizer has a chat template the messages go through
`apply_chat_template(..., add_generation_prompt=True)`. Otherwise (base models) they are
joined as plain text, one paragraph per message, ending with an open assistant turn:

    System: <system content>

    User: <user content>

    Assistant:

Sampling parameters (`params`): `max_tokens` (-> `max_new_tokens`, default 512),
`temperature` (0 or missing -> greedy), `top_p`, `seed` (default 0). The seed is re-applied
before every batch, so for a fixed seed, batch size and request list the outputs repeat.

Requests are sorted by prompt length (longest first, so an out-of-memory batch shows up
early) and padded on the left; results are reported under their original indices. A batch
whose generation raises (out of memory, say) is reported as failed, request by request,
rather than aborting the run.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .types import OnResult, Request, Result

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512
_BLOCK = 1 << 20
_SKIP_DIRS = {".cache"}  # huggingface_hub's download metadata (timestamps), not part of the model


def model_fingerprint(path: str | Path) -> str:
    """sha256 over the sorted relative names and contents of every file in the model folder.

    Files under a top-level `.cache/` (hub download metadata) are left out. Symlinks (as in
    the hub cache's snapshot folders) are followed, so the content is what is hashed.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder not found: {root}")
    files = sorted(
        (p.relative_to(root).as_posix(), p)
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] not in _SKIP_DIRS
    )
    h = hashlib.sha256()
    for rel, p in files:
        name = rel.encode("utf-8")
        h.update(len(name).to_bytes(8, "little"))
        h.update(name)
        h.update(p.stat().st_size.to_bytes(8, "little"))
        with open(p, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
    return h.hexdigest()


def _plain_prompt(messages: list[dict[str, str]]) -> str:
    parts = [f"{m.get('role', 'user').capitalize()}: {m.get('content', '')}" for m in messages]
    parts.append("Assistant:")
    return "\n\n".join(parts)


class TransformersBackend:
    name = "transformers"

    def __init__(
        self,
        model_path: str | Path,
        params: dict[str, Any] | None = None,
        batch_size: int = 8,
        device: str = "auto",
        dtype: Any = None,
        max_input_tokens: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_path).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"model folder not found: {path}")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in model folder: {path}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_input_tokens is not None and max_input_tokens < 1:
            raise ValueError(f"max_input_tokens must be >= 1, got {max_input_tokens}")

        self.path = path
        self.model = path.name
        self.params = dict(params or {})
        self.batch_size = batch_size
        self.max_input_tokens = max_input_tokens
        self.progress = progress
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"tokenizer in {path} has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"

        load_kwargs: dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            if isinstance(dtype, str) and dtype != "auto":
                dtype = getattr(torch, dtype)
            load_kwargs["dtype"] = dtype
        self.hf_model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
        self.hf_model.to(self.device)
        self.hf_model.eval()

        eos: set[int] = set()
        for source in (self.hf_model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source is not None:
                eos.update(int(t) for t in source)
        self.eos_ids = eos
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.use_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    # -- prompts ---------------------------------------------------------------------------

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # the template writes its own BOS and role markers
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(_plain_prompt(messages), add_special_tokens=True)["input_ids"])

    def _generation_config(self):
        cfg = copy.deepcopy(self.hf_model.generation_config)
        temperature = float(self.params.get("temperature") or 0.0)
        update: dict[str, Any] = {
            "max_new_tokens": int(self.params.get("max_tokens") or DEFAULT_MAX_TOKENS),
            "pad_token_id": self.pad_id,
            "eos_token_id": sorted(self.eos_ids) or None,
        }
        if temperature > 0:
            update.update(do_sample=True, temperature=temperature)
            if self.params.get("top_p") is not None:
                update["top_p"] = float(self.params["top_p"])
        else:
            # greedy: clear sampling knobs the model's own generation_config may carry
            update.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None, typical_p=None)
        cfg.update(**update)
        return cfg

    # -- generation ------------------------------------------------------------------------

    def _run_batch(self, batch: list[list[int]], cfg) -> tuple[list[tuple[str, int]], float]:
        import torch

        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)

        torch.manual_seed(int(self.params.get("seed") or 0))
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.hf_model.generate(input_ids=input_ids, attention_mask=mask, generation_config=cfg)
        new = out[:, width:].tolist()
        elapsed = time.perf_counter() - start

        answers = []
        for tokens in new:
            n = end = len(tokens)  # no EOS: the whole max_new_tokens budget was used
            for i, t in enumerate(tokens):
                if t in self.eos_ids:
                    n, end = i + 1, i  # count the EOS, but keep it out of the text
                    break
            text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
            answers.append((text, n))
        return answers, elapsed

    def generate(self, requests: list[Request], on_result: OnResult) -> None:
        total = len(requests)
        if total == 0:
            return
        cfg = self._generation_config()

        prompts: list[list[int]] = []
        dropped: list[int] = []
        for req in requests:
            ids = self._prompt_ids(req.messages)
            cut = 0
            if self.max_input_tokens is not None and len(ids) > self.max_input_tokens:
                cut = len(ids) - self.max_input_tokens
                ids = ids[-self.max_input_tokens:]
            prompts.append(ids)
            dropped.append(cut)
        n_cut = sum(1 for c in dropped if c)
        if n_cut:
            log.warning("%d of %d prompts longer than %d tokens were cut to their last %d tokens",
                        n_cut, total, self.max_input_tokens, self.max_input_tokens)

        order = sorted(range(total), key=lambda i: (-len(prompts[i]), i))
        done = 0
        if self.progress is not None:
            self.progress(0, total)
        for start in range(0, total, self.batch_size):
            idx = order[start:start + self.batch_size]
            results: list[Result]
            try:
                answers, elapsed = self._run_batch([prompts[i] for i in idx], cfg)
            except Exception as exc:  # out of memory and the like: fail the batch, keep going
                reason = f"{type(exc).__name__}: {exc}"[:1000]
                log.warning("generation failed for a batch of %d: %s", len(idx), reason)
                self._free_memory()
                results = [Result(status="failed", reason=reason, tokens_in=len(prompts[i])) for i in idx]
            else:
                per = elapsed / len(idx)
                results = [
                    Result(status="ok", text=text, tokens_in=len(prompts[i]), tokens_out=n, latency_s=per, attempts=1)
                    for i, (text, n) in zip(idx, answers, strict=True)
                ]
            for i, res in zip(idx, results, strict=True):
                if dropped[i]:
                    res.extra["truncated_input_tokens"] = dropped[i]
                on_result(i, res)
            done += len(idx)
            if self.progress is not None:
                self.progress(done, total)

    def _free_memory(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
