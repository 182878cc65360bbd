"""Fused linear + cross-entropy (kernels/fused_linear_cross_entropy.py) against its PyTorch reference,
on the CPU under the Triton interpreter.

Harness, poisoning and tolerances: tests/kernel_harness.py. Small `chunk_rows` and `vocab_block`
make the tiny shapes cover several row chunks (with a short last one) and several vocabulary blocks
(with a partial last one) per row, which the default sizes reach only at training shapes.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("triton") is None:  # not importorskip: that would import triton now
    pytest.skip("triton is not installed", allow_module_level=True)

from tests.kernel_harness import (  # noqa: E402, F401 (fresh_seed, interpreter: autouse fixtures)
    DTYPES,
    IDS,
    assert_matches,
    fresh_seed,
    interpreter,
    kernel_module,
    run_both,
)


def _inputs(lead: tuple[int, ...], hidden: int, vocab: int, dtype: torch.dtype, bias: bool):
    x = torch.randn(*lead, hidden, dtype=dtype)
    w = (torch.randn(vocab, hidden) / hidden**0.5 * 2).to(dtype)  # logits of O(1), as in training
    b = torch.randn(vocab, dtype=dtype) if bias else None
    target = torch.randint(0, vocab, lead)
    target.view(-1)[1::4] = -100  # every fourth position ignored
    return x, w, b, target


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(
    "lead,hidden,vocab,chunk_rows,vocab_block,bias,z_loss",
    [
        ((5,), 123, 77, 2, 32, False, 0.0),  # 5x123: chunks 2+2+1, vocab blocks 32+32+13
        ((3, 7), 96, 300, 8, 128, True, 1e-2),  # 3x7x96 with bias and z-loss: chunks 8+8+5
        ((3, 7), 96, 300, None, None, False, 1e-3),  # the default launch sizes
        ((1,), 1, 2, None, None, False, 0.0),  # smallest
    ],
    ids=["5x123", "3x7x96-bias-z", "3x7x96-defaults", "1x1"],
)
def test_linear_cross_entropy(lead, hidden, vocab, chunk_rows, vocab_block, bias, z_loss, dtype):
    mod = kernel_module("fused_linear_cross_entropy")
    x, w, b, target = _inputs(lead, hidden, vocab, dtype, bias)
    if lead == (1,):
        target[0] = 1  # the only position must count

    def kernel(x, w, *b):
        return mod.linear_cross_entropy(x, w, target, *b, z_loss=z_loss, chunk_rows=chunk_rows, vocab_block=vocab_block)

    def reference(x, w, *b):
        return mod.linear_cross_entropy_reference(x, w, target, *b, z_loss=z_loss)

    outs, grads = run_both(kernel, reference, [x, w] + ([b] if bias else []))
    (loss, ref_loss), = outs
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)  # float32 softmax in both
    for out, ref in grads:
        assert_matches(out, ref, dtype)


def test_reference_is_the_model_loss():
    from training.model import z_loss_term

    mod = kernel_module("fused_linear_cross_entropy")
    x, w, _, target = _inputs((2, 9), 16, 40, torch.float32, False)
    logits = F.linear(x, w).float().view(18, 40)
    expected = F.cross_entropy(logits, target.view(18), ignore_index=-100) + 0.1 * z_loss_term(logits, target.view(18))
    assert torch.equal(mod.linear_cross_entropy_reference(x, w, target, z_loss=0.1), expected)


def test_never_materialises_the_full_logits():
    """No tensor the fused path creates holds [tokens, vocab]; the reference's does (the spy works)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0  # bytes: the interpreter also copies raw (uint8) storages

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel() * t.element_size())
            return out

    mod = kernel_module("fused_linear_cross_entropy")
    n, hidden, vocab = 64, 16, 96  # logits (6144 elements) dwarf x (1024) and W (1536)
    x, w, _, target = _inputs((n,), hidden, vocab, torch.float32, False)
    runs = {}
    for name, fn in (("fused", mod.linear_cross_entropy), ("reference", mod.linear_cross_entropy_reference)):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        with LargestOutput() as spy:
            fn(xg, wg, target).backward()
        runs[name] = spy.largest
    assert runs["reference"] >= n * vocab * 4
    assert runs["fused"] <= max(n * hidden, vocab * hidden) * 4, runs  # default chunk: logits ~ x's size


def test_all_ignored_gives_nan_loss_and_zero_grads_like_the_reference():
    mod = kernel_module("fused_linear_cross_entropy")
    x, w, _, target = _inputs((4,), 8, 10, torch.float32, False)
    target[:] = -100
    outs, grads = run_both(lambda x, w: mod.linear_cross_entropy(x, w, target),
                           lambda x, w: mod.linear_cross_entropy_reference(x, w, target), [x, w])
    (loss, ref_loss), = outs
    assert torch.isnan(loss) and torch.isnan(ref_loss)
    for out, _ in grads:
        assert torch.equal(out, torch.zeros_like(out))


def test_no_grad_gives_the_same_loss():
    mod = kernel_module("fused_linear_cross_entropy")
    x, w, b, target = _inputs((3, 5), 12, 50, torch.float32, True)
    with torch.no_grad():
        loss = mod.linear_cross_entropy(x, w, target, b, z_loss=1e-3, chunk_rows=4, vocab_block=16)
    ref = mod.linear_cross_entropy_reference(x, w, target, b, z_loss=1e-3)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named():
    mod = kernel_module("fused_linear_cross_entropy")
    x, w, _, target = _inputs((4,), 8, 10, torch.float32, False)
    with pytest.raises(ValueError, match=r"weight \[V, H\]"):
        mod.linear_cross_entropy(x, w[:, :7], target)
    with pytest.raises(ValueError, match="target shape"):
        mod.linear_cross_entropy(x, w, target[:3])
    with pytest.raises(ValueError, match="class indices"):
        mod.linear_cross_entropy(x, w, target.float())
    with pytest.raises(ValueError, match="bias must be"):
        mod.linear_cross_entropy(x, w, target, torch.zeros(9))
    with pytest.raises(ValueError, match="z_loss"):
        mod.linear_cross_entropy(x, w, target, z_loss=-1.0)
    with pytest.raises(ValueError, match="vocab_block"):
        mod.linear_cross_entropy(x, w, target, vocab_block=24)
    target[0] = 10  # == vocab: out of range
    with pytest.raises(RuntimeError, match="outside"):
        mod.linear_cross_entropy(x, w, target)
