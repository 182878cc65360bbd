"""Shared-prefix log-likelihood scoring: each item's requests packed into one prefix tree.

The naive way scores every (context, continuation) pair as its own row, so a 4-choice cloze
item runs its context through the model four times. Here all requests of one item are merged
into a token trie (requests that share a context share its nodes; WinoGrande's two contexts
share their common prefix) and the trie is run as ONE sequence under a tree attention mask:
a node attends to itself and its ancestors only, and its RoPE position is its depth. Each
node therefore sees exactly the tokens, at exactly the positions, it sees in its own naive
row, so the scores are the naive ones up to float rounding.

Why outside the model: ``training.model.Transformer.forward`` builds its own (causal or
intra-document) mask from the ids, but its blocks take an explicit boolean mask and per-token
cos/sin tables (that is how ``intra_doc_mask`` works), so the tree forward below composes the
model's own embedding, blocks, final norm and head; nothing in the model is copied or changed.
With ``intra_doc_mask`` the tree keeps the model's document rule: an EOS ends its document,
positions restart after it and nothing attends across it. Only the hidden states that predict
a continuation token go through the output head (the [T, V] logits of context tokens are never
needed).

Shape legend: B rows, T nodes per row (padded), V vocab, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Scored:
    """One request inside a packed row: the nodes whose outputs predict its continuation."""

    request: int  # index into the caller's request list
    nodes: list[int]  # node predicting continuation token k (its parent in the naive row)
    targets: list[int]  # the continuation tokens


@dataclass
class TreeRow:
    """A token trie in creation order (a parent always comes before its children)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # -1 for a root
    children: dict[tuple[int, int], int] = field(default_factory=dict)  # (parent, token) -> node
    scored: list[Scored] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def new_nodes(self, inputs: list[int]) -> int:
        """How many nodes adding a path with these input tokens would create."""
        node, depth = -1, 0
        for depth, tok in enumerate(inputs):
            nxt = self.children.get((node, tok))
            if nxt is None:
                return len(inputs) - depth
            node = nxt
        return 0

    def add(self, request: int, inputs: list[int], targets: list[int]) -> None:
        """Insert the path of `inputs`; its last len(targets) nodes predict `targets`."""
        node, path = -1, []
        for tok in inputs:
            nxt = self.children.get((node, tok))
            if nxt is None:
                nxt = len(self.tokens)
                self.tokens.append(tok)
                self.parents.append(node)
                self.children[(node, tok)] = nxt
            node = nxt
            path.append(node)
        self.scored.append(Scored(request, path[len(path) - len(targets):], list(targets)))


def pack_groups(
    groups: list[list[tuple[int, list[int], int]]], max_nodes: int
) -> list[TreeRow]:
    """Tries from groups of (request index, sequence, n_cont): each group's requests share rows.

    A sequence's inputs are seq[:-1] and its targets its last n_cont tokens. A group whose trie
    would outgrow max_nodes continues in a new row (a single path never exceeds it: the caller
    truncates sequences to the model window)."""
    rows: list[TreeRow] = []
    for group in groups:
        row = TreeRow()
        for req, seq, n_cont in group:
            inputs = seq[:-1]
            if len(inputs) > max_nodes:
                raise ValueError(f"request {req}: {len(inputs)} input tokens exceed the row limit {max_nodes}")
            if len(row) and len(row) + row.new_nodes(inputs) > max_nodes:
                rows.append(row)
                row = TreeRow()
            row.add(req, inputs, seq[-n_cont:])
        if len(row):
            rows.append(row)
    return rows


def tree_layout(row: TreeRow, width: int, eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(positions [width], mask [width, width] bool, True = may attend) of one row.

    eos_id set (the model's intra_doc_mask): the node after an EOS starts a new document, at
    position 0, and attends to nothing before it. Padding nodes attend to themselves only, so
    no attention row is empty (an all-masked row would give NaN)."""
    pos = np.zeros(width, dtype=np.int64)
    mask = np.zeros((width, width), dtype=bool)
    for j, parent in enumerate(row.parents):
        if parent >= 0 and not (eos_id is not None and row.tokens[parent] == eos_id):
            mask[j] = mask[parent]
            pos[j] = pos[parent] + 1
        mask[j, j] = True
    for j in range(len(row), width):
        mask[j, j] = True
    return pos, mask


def tree_hidden(model, idx: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states [B, T, C] of a training.model.Transformer under an explicit
    tree mask [B, 1, T, T] with per-token positions [B, T]."""
    cos = model.rope_cos[pos][:, None]  # [B, 1, T, D]
    sin = model.rope_sin[pos][:, None]  # [B, 1, T, D]
    x = model.embed(idx)  # [B, T, C]
    for layer in model.layers:
        x = layer(x, cos, sin, mask)
    return model.norm(x)


def supports_tree(model) -> bool:
    """Whether `model` is a Foundry Transformer whose blocks can be driven with a tree mask."""
    from training.model import Transformer

    return isinstance(model, Transformer)


@torch.inference_mode()
def score_rows(model, rows: list[TreeRow], batch_size: int, n_requests: int,
               on_batch: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum log-prob of the continuation, is it the greedy continuation) per request index.

    on_batch(n): called after each batch with the number of requests it scored (progress)."""
    cfg = model.config
    eos_id = cfg.eos_token_id if cfg.intra_doc_mask else None
    device = next(model.parameters()).device
    results: list[tuple[float, bool] | None] = [None] * n_requests
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))  # longest first: little padding
    for start in range(0, len(order), max(1, batch_size)):
        batch = [rows[r] for r in order[start : start + batch_size]]
        width = len(batch[0])
        idx = torch.zeros((len(batch), width), dtype=torch.long)
        pos = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), 1, width, width), dtype=bool)
        for b, row in enumerate(batch):
            idx[b, : len(row)] = torch.tensor(row.tokens, dtype=torch.long)
            pos[b], mask[b, 0] = tree_layout(row, width, eos_id)
        hidden = tree_hidden(model, idx.to(device), torch.from_numpy(pos).to(device),
                             torch.from_numpy(mask).to(device))  # [B, T, C]
        # Only the nodes that predict a continuation token need the output head.
        sel_b, sel_t, targets, owners = [], [], [], []
        for b, row in enumerate(batch):
            for s in row.scored:
                sel_b.extend([b] * len(s.nodes))
                sel_t.extend(s.nodes)
                targets.extend(s.targets)
                owners.append((s.request, len(s.nodes)))
        h = hidden[torch.tensor(sel_b, device=device), torch.tensor(sel_t, device=device)]  # [N, C]
        logprobs = F.log_softmax(model.lm_head(h).float(), dim=-1)  # [N, V]
        tgt = torch.tensor(targets, dtype=torch.long, device=device)
        token_lp = logprobs.gather(-1, tgt[:, None]).squeeze(-1)  # [N]
        hit = logprobs.argmax(dim=-1) == tgt  # [N]
        offset = 0
        for request, n in owners:
            results[request] = (float(token_lp[offset : offset + n].sum()), bool(hit[offset : offset + n].all()))
            offset += n
        if on_batch is not None:
            on_batch(len(owners))
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"requests {missing[:5]} were not scored (packing bug)")
    return results  # type: ignore[return-value]
