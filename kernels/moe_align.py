"""Group (token, slot) pairs by expert so one kernel program sees one expert's weights.

Each expert's rows are padded to a multiple of BLOCK_M with a sentinel, so a program
covers rows of exactly one expert and experts nobody routed to cost nothing.

Nothing here waits for the device: every output has a size fixed by the shapes alone. The
number of blocks the routing needs is at most ``ceil(T*K / BLOCK_M) + E`` (each expert wastes
less than one block on padding), so that many are always laid out; the blocks past the last
expert's are marked with expert ``E`` and the kernel's programs for them return at once. This
is how production MoE kernels size their grid (vLLM's moe_align_block_size), and what lets a
decoder step be captured in one CUDA graph.
"""

from __future__ import annotations

import torch

# Tokens per fused-MoE launch: a long prefill would otherwise hold [T*K, H] partial outputs at
# once. The memory plan (dgemma.engine.plan) counts the MoE buffers of one chunk.
MOE_CHUNK_TOKENS = 1024


def max_blocks(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the blocks of ``num_rows`` (token, slot) pairs over ``num_experts`` experts."""
    return -(-num_rows // block_m) + num_experts


def moe_align(
    top_k_index: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return (sorted_rows, block_expert, num_rows), without a host sync.

    sorted_rows: int32 [max_blocks * block_m], indices into the flattened [T*K] pairs,
    grouped by expert, each expert's run starting on a block boundary; padding holds
    num_rows (= T*K), which kernels mask out.
    block_expert: int32 [max_blocks], the expert of each block; num_experts for the blocks
    past the last expert's (the kernel skips them).
    Indices >= num_experts (expert-parallel sentinels) are left out, as upstream.
    """
    flat = top_k_index.reshape(-1)
    num_rows = flat.numel()
    device = flat.device
    blocks = max_blocks(num_rows, num_experts, block_m)
    capacity = blocks * block_m
    # Sentinels go to a bucket of their own, after every expert.
    key = flat.clamp(max=num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    pend = torch.cumsum(padded, 0)
    # One more entry for the sentinel bucket, so indexing by it stays in range (its rows go nowhere).
    pstart = torch.nn.functional.pad(pend - padded, (0, 1))
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(key, stable=True)
    expert = key[order]
    pos = torch.arange(num_rows, device=device) - start[expert]
    # Sentinel pairs are written to one spare slot past the end, which is then dropped.
    dest = (pstart[expert] + pos).masked_fill_(expert >= num_experts, capacity)
    sorted_rows = torch.full((capacity + 1,), num_rows, dtype=torch.int32, device=device)
    sorted_rows.scatter_(0, dest, order.to(torch.int32))
    # Block b starts at row b * block_m; its expert is the number of experts that end at or before it.
    block_start = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(pend, block_start, right=True, out_int32=True)
    return sorted_rows[:capacity], block_expert, num_rows
