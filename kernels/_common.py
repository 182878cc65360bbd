"""Helpers shared by the kernel files: where a Triton kernel can run, and launch sizes.

Importing this module imports Triton. Whether `@triton.jit` kernels become interpreted (CPU) or
compiled (GPU) functions is decided by TRITON_INTERPRET at the moment the kernel module is
imported, so the flag is captured here, once, next to the kernels.
"""

from __future__ import annotations

import torch
import triton
from triton import knobs

# True when the kernels in this process were built by the Triton interpreter (TRITON_INTERPRET=1
# was set before the first import of a kernel module): they then run on CPU tensors, slowly.
INTERPRETED: bool = bool(knobs.runtime.interpret)

MAX_FUSED_SIZE = 65536  # widest row one program holds in registers (elements)


def can_run(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: CUDA tensors, or any tensor in the interpreter."""
    if INTERPRETED:
        return True
    return all(t.is_cuda for t in tensors)


def row_block(n: int) -> int:
    """Power-of-two block that covers a row of n elements in one program."""
    block = triton.next_power_of_2(n)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"row of {n} elements exceeds the fused kernel limit of {MAX_FUSED_SIZE}")
    return block


def num_warps_for(block: int) -> int:
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def num_programs_hint(device: torch.device) -> int:
    """How many persistent programs a grid-stride kernel should use on this device."""
    if device.type == "cuda" and not INTERPRETED:
        return torch.cuda.get_device_properties(device).multi_processor_count * 4
    return 4  # interpreter: each program costs ~1-2 ms, so keep the count small
