"""4-bit kernels with dispatch: Triton on CUDA, the pure-torch reference elsewhere.

`DGEMMA_KERNELS=torch` forces the reference (e.g. to bisect a numerical issue);
`DGEMMA_KERNELS=triton` forces Triton, which off CUDA only works under
`TRITON_INTERPRET=1` (how the CPU tests exercise the kernels); `auto` (or unset) is the
default. Any other value is an error rather than a silent fallback.

The kernels are the lowest layer: the 4-bit weight they take is `dgemma.kernels.packed`, and
nothing here imports dgemma.quant (which builds and stores those weights).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from dgemma.kernels.reference import moe_w4a16_ref, w4a16_matmul_ref
from dgemma.kernels.packed import QuantizedWeight

__all__ = ["w4a16_matmul", "moe_w4a16", "use_triton", "w4a16_matmul_ref", "moe_w4a16_ref"]


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # deliberate: a Triton that fails to import in any way means the torch path
        return False
    return True


MODES = ("auto", "torch", "triton")


def use_triton(x: torch.Tensor) -> bool:
    """Whether the kernels for `x` run in Triton, as DGEMMA_KERNELS asks (read at every call)."""
    mode = os.environ.get("DGEMMA_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"DGEMMA_KERNELS={os.environ['DGEMMA_KERNELS']!r} is not one of {', '.join(MODES)}")
    if mode == "auto":
        return x.is_cuda and _triton_available()
    return mode == "triton"


def w4a16_matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x [..., K] @ W^T for a 4-bit W [N, K]."""
    if use_triton(x):
        from dgemma.kernels.triton_w4a16 import w4a16_matmul_triton

        return w4a16_matmul_triton(x, w)
    return w4a16_matmul_ref(x, w)


def moe_w4a16(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: QuantizedWeight,
    down: QuantizedWeight,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    activation: str = "gelu_pytorch_tanh",
) -> torch.Tensor:
    """Mixture of 4-bit experts; same contract as DiffusionGemmaTextExperts.forward."""
    if use_triton(hidden_states) and activation == "gelu_pytorch_tanh":
        from dgemma.kernels.triton_w4a16 import moe_w4a16_triton

        return moe_w4a16_triton(hidden_states, top_k_index, top_k_weights, gate_up, down, activation)
    return moe_w4a16_ref(hidden_states, top_k_index, top_k_weights, gate_up, down, act_fn)
