"""Producing NVFP4 and NF4 weights in plain torch: rounding to the codes, quantizing, packing.

The layout they produce, `QuantizedWeight` with its code tables, block sizes and decoding
(`dequantize`), is `dgemma.kernels.packed`: the kernels compute on it and sit below quant/, so it
is defined there and this module builds on it. Block scales use E4M3's whole range for NVFP4
(a fp32 global multiplier of amax / (6 * 448)) and the block absmax for NF4.
"""

from __future__ import annotations

import torch

# NVFP4_BLOCK and NF4_BLOCK are not used here: dgemma.engine.plan still reads them from this module
# (it may import dgemma.kernels.packed directly; then they can go).
from dgemma.kernels.packed import NF4_BLOCK, NF4_VALUES, NVFP4_BLOCK, QuantizedWeight, block_size, split_blocks

__all__ = ["E4M3_MAX", "E2M1_MAX", "NF4_BLOCK", "NVFP4_BLOCK", "stack_weights", "pack_codes", "e2m1_codes",
           "nf4_codes", "nvfp4_global_scale", "quantize"]

E4M3_MAX = 448.0
E2M1_MAX = 6.0


def stack_weights(qs: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack per-expert weights [N, K] into one [E, N, K]."""
    return QuantizedWeight(
        qs[0].fmt,
        torch.stack([q.packed for q in qs]),
        torch.stack([q.scales for q in qs]),
        torch.stack([q.global_scale for q in qs]),
    )


# ---------------------------------------------------------------------------
# packing


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes 0..15 -> [..., K/2] uint8, element 2j in the low nibble (the inverse of
    dgemma.kernels.packed.unpack_codes)."""
    if codes.shape[-1] % 2:
        raise ValueError("the input dimension must be even to pack two codes per byte")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


# ---------------------------------------------------------------------------
# rounding

# Midpoints between consecutive E2M1 magnitudes. At a tie the result must be the
# neighbour with the even code (round half to even), so the comparison is strict
# where the lower neighbour's code is even and inclusive where it is odd.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round x (already divided by its scale) to the nearest E2M1 code, ties to even."""
    mag = x.abs()
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for lower_code, mid in enumerate(_E2M1_MIDPOINTS):
        up = mag >= mid if lower_code % 2 else mag > mid
        code += up.to(torch.uint8)
    # NaN inputs compare false everywhere and land on code 0 rather than poison a block.
    return code | ((x < 0).to(torch.uint8) << 3)


def nf4_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 code of x in [-1, 1] (ties resolved towards the even code)."""
    table = NF4_VALUES.to(x.device)
    mids = (table[1:] + table[:-1]) / 2
    code = torch.bucketize(x.float().clamp(-1, 1), mids, right=False)
    # bucketize puts an exact midpoint in the lower bucket; move odd results up to even.
    at_mid = (code < 15) & (x.float() == mids[code.clamp(max=14)])
    code = torch.where(at_mid & (code % 2 == 1), code + 1, code)
    return code.to(torch.uint8)


# ---------------------------------------------------------------------------
# quantize


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """Dequant multiplier that maps the largest block scale onto E4M3's max (448)."""
    g = amax.float() / (E2M1_MAX * E4M3_MAX)
    # An all-zero tensor would divide by zero; any positive scale quantizes it exactly.
    return torch.where(g > 0, g, torch.ones_like(g))


def quantize(w: torch.Tensor, fmt: str = "nvfp4", segments: int = 1) -> QuantizedWeight:
    """Quantize a [..., N, K] weight along K. `segments` row groups get their own global scale."""
    block = block_size(fmt)
    wf = w.detach().float()
    n = wf.shape[-2]
    if n % segments:
        raise ValueError(f"{n} rows do not split into {segments} segments")
    blocks = split_blocks(wf, block)  # [..., N, K/b, b]
    block_amax = blocks.abs().amax(dim=-1)  # [..., N, K/b]
    if fmt == "nvfp4":
        seg_amax = block_amax.reshape(*block_amax.shape[:-2], segments, -1).amax(dim=-1)  # [..., S]
        g = nvfp4_global_scale(seg_amax)
        g_rows = g.repeat_interleave(n // segments, dim=-1)[..., None]  # [..., N, 1]
        scales = (block_amax / E2M1_MAX / g_rows).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
        # Divide by the scale as it will be decoded, so rounding sees the real grid.
        denom = scales.float() * g_rows
        scaled = blocks / torch.where(denom > 0, denom, torch.ones_like(denom))[..., None]
        codes = e2m1_codes(scaled)
    else:
        g = torch.ones(*wf.shape[:-2], segments, dtype=torch.float32, device=wf.device)
        scales = block_amax
        denom = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = nf4_codes(blocks / denom[..., None])
    packed = pack_codes(codes.flatten(-2))
    return QuantizedWeight(fmt, packed.contiguous(), scales.contiguous(), g.float().contiguous())
