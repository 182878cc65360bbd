"""A lighteval model backed by a Foundry ``training.model.Transformer`` and a ``tokenizers`` BPE.

Only log-likelihood scoring is implemented (what cloze multiple-choice tasks need).

Scoring of one (context, continuation) request:
  * the context is the prompt lighteval would build for a plain-text model (few-shot
    examples, instruction, query), via lighteval's ``PromptManager``;
  * trailing whitespace of the context is moved to the front of the continuation (the
    usual convention: " Paris" is one BPE word, "Paris" after "is " is not);
  * context and continuation are encoded separately, so the scored tokens are exactly the
    continuation's; the context is prefixed with the EOS token, which is the document
    separator the model was trained with (it plays the role of BOS);
  * if the sequence is longer than ``max_seq_len + 1`` it is cut from the left (context
    first; a continuation longer than the window keeps its last tokens);
  * log P(continuation | context) is the sum of the continuation tokens' log-probs.
Partial scoring (WinoGrande): a doc whose ``specific["contexts"]`` is set scores choice i as
the (shared) continuation ``choices[i]`` after the context ``contexts[i]``.
Batching (``FoundryModelConfig.shared_prefix``):
  * True (default): the requests of one item (its choices) are packed into one prefix tree
    and run as one sequence under a tree attention mask, so a shared context is computed once
    (``evaluation.shared_prefix``); trees are sorted by size and run in padded batches.
  * False: the naive path, kept for comparison: every request is its own row; rows are sorted
    by length and run in right-padded batches (padding on the right of a causal model cannot
    change the positions that are scored).
Both give the same scores up to float rounding (tests/test_eval_batching.py).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lighteval.models.abstract_model import LightevalModel
from lighteval.models.abstract_model import ModelConfig as LightevalModelConfig
from lighteval.models.model_output import ModelResponse
from lighteval.tasks.prompt_manager import PromptManager
from lighteval.tasks.requests import Doc, SamplingMethod
from lighteval.utils.cache_management import SampleCache, cached

from evaluation.shared_prefix import pack_groups, score_rows, supports_tree

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"


class FoundryModelConfig(LightevalModelConfig):
    """lighteval model config. ``model_name`` + all fields key lighteval's prediction cache:
    give each checkpoint a distinct ``model_name`` (or a fresh ``cache_dir``)."""

    model_name: str
    cache_dir: str  # no default: lighteval's is ~/.cache/huggingface/lighteval, shared by every run
    checkpoint_id: str = ""
    batch_size: int = 32
    max_length: int = 0
    prepend_eos: bool = True
    shared_prefix: bool = True  # False: the naive one-row-per-request path (benchmarks compare both)


@dataclass
class _Request:
    doc_index: int
    choice_index: int
    context: list[int]
    continuation: list[int]


class FoundryLightevalModel(LightevalModel):
    def __init__(self, model: torch.nn.Module, tokenizer, config: FoundryModelConfig):
        """model: a Transformer (forward(idx) -> (logits [B,T,V], loss)); tokenizer: tokenizers.Tokenizer."""
        max_seq_len = int(model.config.max_seq_len)
        if config.max_length <= 0:
            config = config.model_copy(update={"max_length": max_seq_len})
        elif config.max_length > max_seq_len:
            raise ValueError(f"max_length {config.max_length} exceeds the model's max_seq_len {max_seq_len}")
        self.config = config
        self.model = model.eval()
        self._tokenizer = tokenizer
        self._eos_id = tokenizer.token_to_id(EOS_TOKEN)
        if config.prepend_eos and self._eos_id is None:
            raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token; pass prepend_eos=False")
        self.prompt_manager = PromptManager(use_chat_template=False, tokenizer=None, system_prompt=None)
        self._cache = SampleCache(config)  # required by Pipeline (it calls _cache._init_registry)
        # a dataprep.progress.Progress counting scored choices, or None; not in the config, which keys the cache
        self.progress = None

    # --- LightevalModel's abstract properties -------------------------------------------------
    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def add_special_tokens(self) -> bool:
        return False

    @property
    def max_length(self) -> int:
        return self.config.max_length

    @property
    def disable_tqdm(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- tokenisation ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        ctx = self.encode(context)
        if self.config.prepend_eos:
            ctx = [self._eos_id] + ctx
        return ctx, self.encode(continuation)

    # --- scoring ----------------------------------------------------------------------------------
    def _prepare(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], int, int]]:
        """(context ids, continuation ids) -> (sequence cut to the window, tokens scored, tokens cut)."""
        window = self.max_length + 1  # tokens in a window: max_length inputs predict max_length targets
        prepared = []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("empty continuation: nothing to score")
            seq = ctx + cont
            if len(seq) < 2:  # one lone token has no context to be predicted from
                raise ValueError("a lone continuation token needs a context (use prepend_eos=True)")
            truncated = max(0, len(seq) - window)
            seq = seq[truncated:]
            n_cont = min(len(cont), len(seq) - 1)
            prepared.append((seq, n_cont, truncated))
        return prepared

    def score_requests(
        self, pairs: list[tuple[list[int], list[int]]], groups: list[list[int]] | None = None
    ) -> list[tuple[float, bool, int]]:
        """(context ids, continuation ids) -> (sum log-prob of continuation, greedy?, tokens truncated).

        groups: lists of request indices that may share a prefix tree (one item's choices);
        None = every request alone. Ignored on the naive path (``shared_prefix=False``)."""
        prepared = self._prepare(pairs)
        if self.progress is not None:  # lighteval asks for every task's requests in one call
            self.progress.total = (self.progress.total or 0) + len(prepared)
        if not self.config.shared_prefix or not supports_tree(self.model):
            return self._score_naive(prepared)
        if groups is None:
            groups = [[i] for i in range(len(prepared))]
        covered = sorted(i for g in groups for i in g)
        if covered != list(range(len(prepared))):
            raise ValueError("groups must hold every request index exactly once")
        rows = pack_groups([[(i, prepared[i][0], prepared[i][1]) for i in g] for g in groups], self.max_length)
        scores = score_rows(self.model, rows, self.config.batch_size, len(prepared), on_batch=self._count_scored)
        return [(lp, greedy, p[2]) for (lp, greedy), p in zip(scores, prepared, strict=True)]

    @torch.inference_mode()
    def _score_naive(self, prepared: list[tuple[list[int], int, int]]) -> list[tuple[float, bool, int]]:
        results: list[tuple[float, bool, int] | None] = [None] * len(prepared)
        order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
        device = self.device
        bs = max(1, self.config.batch_size)
        for start in range(0, len(order), bs):
            idxs = order[start : start + bs]
            width = len(prepared[idxs[0]][0]) - 1  # longest first
            inputs = torch.zeros((len(idxs), width), dtype=torch.long)
            for row, i in enumerate(idxs):
                seq = prepared[i][0]
                inputs[row, : len(seq) - 1] = torch.tensor(seq[:-1], dtype=torch.long)
            logits, _ = self.model(inputs.to(device))
            if logits.shape[:2] != inputs.shape:
                raise RuntimeError(f"model returned logits of shape {tuple(logits.shape)} for input {tuple(inputs.shape)}")
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(idxs):
                seq, n_cont, truncated = prepared[i]
                n_in = len(seq) - 1
                targets = torch.tensor(seq[-n_cont:], dtype=torch.long, device=device)
                lp = logprobs[row, n_in - n_cont : n_in]  # positions predicting the continuation
                token_lp = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                greedy = bool((lp.argmax(dim=-1) == targets).all())
                results[i] = (float(token_lp.sum()), greedy, truncated)
            self._count_scored(len(idxs))
        return results  # type: ignore[return-value]

    def _count_scored(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(n)

    def context_for(self, doc: Doc) -> str:
        return self.prompt_manager.prepare_prompt(doc)

    @cached(SamplingMethod.LOGPROBS)
    def loglikelihood(self, docs: list[Doc]) -> list[ModelResponse]:
        return self.score_docs(docs)

    def score_docs(self, docs: list[Doc]) -> list[ModelResponse]:
        """One ModelResponse per doc (its choices' log-likelihoods), without lighteval's cache."""
        requests: list[_Request] = []
        groups: list[list[int]] = []  # one item's requests: candidates for one prefix tree
        for d, doc in enumerate(docs):
            groups.append([])
            partial = (doc.specific or {}).get("contexts")
            if partial:  # partial scoring: choice c is context c, the continuation is shared
                if len(partial) != len(doc.choices):
                    raise ValueError(f"doc {doc.id}: {len(partial)} contexts for {len(doc.choices)} choices")
                contexts = [self.context_for(dataclasses.replace(doc, query=q)) for q in partial]
            else:
                contexts = [self.context_for(doc)] * len(doc.choices)
            for c, (context, choice) in enumerate(zip(contexts, doc.choices, strict=True)):
                ctx, cont = self.encode_pair(context, choice)
                groups[-1].append(len(requests))
                requests.append(_Request(d, c, ctx, cont))
        scores = self.score_requests([(r.context, r.continuation) for r in requests], groups)

        per_doc: list[list[tuple[_Request, tuple[float, bool, int]]]] = [[] for _ in docs]
        for req, score in zip(requests, scores, strict=True):
            per_doc[req.doc_index].append((req, score))
        responses = []
        for items in per_doc:
            responses.append(
                ModelResponse(
                    input_tokens=items[0][0].context if items else [],
                    logprobs=[s[0] for _, s in items],
                    argmax_logits_eq_gold=[s[1] for _, s in items],
                    output_tokens=[r.continuation for r, _ in items],
                    truncated_tokens_count=max((s[2] for _, s in items), default=0),
                )
            )
        return responses

    def greedy_until(self, docs: list[Doc]) -> list[ModelResponse]:
        raise NotImplementedError(
            "FoundryLightevalModel scores log-likelihoods only; generative tasks are not supported"
        )

    def loglikelihood_rolling(self, docs: list[Doc]) -> list[ModelResponse]:
        raise NotImplementedError(
            "FoundryLightevalModel does not implement rolling log-likelihood; use evaluation.heldout.heldout_loss"
        )
