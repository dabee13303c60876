"""Pure-torch twins of the Triton kernels: the definition of what they must compute.

They run everywhere (CPU included) and are what dispatch uses off CUDA. Experts are
dequantized one at a time so the CPU path never holds a whole layer in bf16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dgemma.kernels.packed import QuantizedWeight


def w4a16_matmul_ref(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x [..., K] @ W[N, K]^T -> [..., N] in x's dtype."""
    return nn.functional.linear(x, w.dequantize(x.dtype))


def moe_w4a16_ref(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: QuantizedWeight,
    down: QuantizedWeight,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Same loop as transformers' DiffusionGemmaTextExperts.forward, on 4-bit experts.

    hidden_states [T, H]; top_k_index/top_k_weights [T, K]; gate_up [E, 2I, H];
    down [E, H, I]. Indices >= E (expert-parallel sentinels) are skipped, as upstream.
    """
    num_experts = gate_up.packed.shape[0]
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        hit = torch.unique(top_k_index[top_k_index < num_experts]).tolist()
    for e in hit:
        token_idx, top_k_pos = torch.where(top_k_index == e)
        x = hidden_states[token_idx]
        gate, up = nn.functional.linear(x, gate_up[e].dequantize(x.dtype)).chunk(2, dim=-1)
        h = nn.functional.linear(act_fn(gate) * up, down[e].dequantize(x.dtype))
        h = h * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
    return out
