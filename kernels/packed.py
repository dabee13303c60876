"""The packed 4-bit weight the kernels compute on: `QuantizedWeight`, its code tables and block
sizes, and how it decodes (unpack, dequantize).

It lives in kernels/ because the kernels are the lowest layer and read this layout: the Triton
kernels decode it in their inner loop and the pure-torch twins dequantize it. Everything that
produces it (rounding, quantizing, packing, stacking experts: `dgemma.quant.formats`) and stores it
(`dgemma.quant` modules and checkpoints) sits above, so imports run quant -> kernels only. This
module imports nothing of dgemma's.

Both formats store two 4-bit codes per byte (first element of a pair in the low nibble), one
scale per block of consecutive input-dim elements, and decode a code through a 16-entry table.
They differ only in the table, the block size and how the block scale is stored, which is why
one `QuantizedWeight` and one kernel serve both:

* NVFP4: E2M1 table, blocks of 16, block scales in E4M3 (float8_e4m3fn) and a fp32 global
  multiplier (amax / (6 * 448)) so the block scales use E4M3's whole range.
* NF4: the QLoRA normal-float table, blocks of 64, fp32 absmax block scales (global 1).

A weight of shape [..., N, K] (out, in) packs to `packed` [..., N, K/2] uint8 and `scales`
[..., N, K/block]. `global_scale` is [..., S]: S contiguous row segments each with its own
multiplier, because checkpoints quantize gate and up projections separately and we fuse them
without re-quantizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NVFP4_BLOCK = 16
NF4_BLOCK = 64

# Code c in 0..15: bit 3 is the sign, bits 0..2 index the magnitudes.
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)
# bitsandbytes' NF4 code book (normal quantiles, exact zero at code 7).
NF4_VALUES = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

FORMATS = ("nvfp4", "nf4")


def block_size(fmt: str) -> int:
    if fmt == "nvfp4":
        return NVFP4_BLOCK
    if fmt == "nf4":
        return NF4_BLOCK
    raise ValueError(f"unknown 4-bit format {fmt!r} (expected one of {', '.join(FORMATS)})")


def code_table(fmt: str) -> torch.Tensor:
    block_size(fmt)
    return E2M1_VALUES if fmt == "nvfp4" else NF4_VALUES


@dataclass
class QuantizedWeight:
    """A 4-bit weight [..., N, K]; see the module docstring for the layout."""

    fmt: str
    packed: torch.Tensor  # uint8 [..., N, K/2]
    scales: torch.Tensor  # float8_e4m3fn (nvfp4) or float32 (nf4), [..., N, K/block]
    global_scale: torch.Tensor  # float32 [..., S]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], self.packed.shape[-1] * 2)

    @property
    def block(self) -> int:
        return block_size(self.fmt)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.global_scale))

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        return QuantizedWeight(
            self.fmt, self.packed.to(device), self.scales.to(device), self.global_scale.to(device)
        )

    def __getitem__(self, idx: int) -> "QuantizedWeight":
        """One expert of a stacked [E, N, K] weight."""
        return QuantizedWeight(self.fmt, self.packed[idx], self.scales[idx], self.global_scale[idx])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] uint8 -> [..., K] codes (int64, usable as an index)."""
    lo = (packed & 0x0F).long()
    hi = (packed >> 4).long()
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def split_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """[..., K] -> [..., K/block, block]: the scale blocks along the input dimension."""
    if w.shape[-1] % block:
        raise ValueError(f"input dimension {w.shape[-1]} is not a multiple of the block size {block}")
    return w.reshape(*w.shape[:-1], w.shape[-1] // block, block)


def dequantize(q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., N, K] weight in `dtype`, computed in fp32 as code value × (block scale × global scale).

    The effective block scale is formed first, as NVIDIA ModelOpt's NVFP4 dequantization does,
    so a ModelOpt checkpoint decodes to exactly ModelOpt's values (tests/test_quant_real_tools.py).
    compressed-tensors divides by its global scale where we (and vLLM) multiply by the stored
    reciprocal: the two can differ in the last bits of fp32 (~1e-7 relative), not beyond."""
    table = code_table(q.fmt).to(q.packed.device)
    vals = table[unpack_codes(q.packed)]  # [..., N, K]
    n = q.packed.shape[-2]
    segs = q.global_scale.shape[-1]
    g_rows = q.global_scale.float().repeat_interleave(n // segs, dim=-1)[..., None]  # [..., N, 1]
    block_scale = q.scales.float() * g_rows  # [..., N, K/block]
    return (split_blocks(vals, q.block) * block_scale[..., None]).flatten(-2).to(dtype)
