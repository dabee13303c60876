"""Group (token, slot) pairs by expert so one kernel program sees one expert's weights.

Each expert's rows are padded to a multiple of BLOCK_M with a sentinel, so a program
covers rows of exactly one expert and experts nobody routed to cost nothing.
"""

from __future__ import annotations

import torch

# Tokens per fused-MoE launch: a long prefill would otherwise hold [T*K, H] partial outputs at
# once. The memory plan (dgemma.quant.plan) counts the MoE buffers of one chunk.
MOE_CHUNK_TOKENS = 1024


def moe_align(
    top_k_index: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return (sorted_rows, block_expert, num_rows).

    sorted_rows: int32 [num_blocks * block_m], indices into the flattened [T*K] pairs,
    grouped by expert; padding holds num_rows (= T*K), which kernels mask out.
    block_expert: int32 [num_blocks], the expert of each block.
    """
    flat = top_k_index.reshape(-1)
    num_rows = flat.numel()
    valid = flat < num_experts
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    n_valid = int(counts.sum())  # one host sync: the grid size depends on it
    total = int(padded.sum())
    order = order[:n_valid]
    expert = key[order]
    start = torch.cumsum(counts, 0) - counts
    pstart = torch.cumsum(padded, 0) - padded
    pos = torch.arange(n_valid, device=flat.device) - start[expert]
    sorted_rows = torch.full((total,), num_rows, dtype=torch.int32, device=flat.device)
    sorted_rows[pstart[expert] + pos] = order.to(torch.int32)
    block_expert = torch.repeat_interleave(
        torch.arange(num_experts, device=flat.device, dtype=torch.int32), padded // block_m
    )
    return sorted_rows, block_expert, num_rows
