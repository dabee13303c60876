"""Triton W4A16 kernels: dense matmul and fused MoE over NVFP4 / NF4 weights.

One kernel body serves both: it streams 4-bit codes, decodes them through a 16-entry
table, multiplies by the block scale (E4M3 decoded from its bits, so no fp8 hardware
is needed, or fp32 for NF4) and accumulates in fp32; the per-row global scale and the
router weight are applied once in the epilogue instead of per element.

Packed bytes hold elements (2j, 2j+1) in (low, high) nibbles, so the activations are
read as even and odd columns and the two halves are two dots: no interleave needed.

BLOCK_M follows the rows: a 256-token canvas gives 16..512 rows for the dense layers and ~16
rows per expert in the MoE (top-8 of 128), so small ones. BLOCK_N, BLOCK_K, warps and stages are
autotuned on a GPU, once per (row bucket, N, K, dtypes) in a process.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dgemma.kernels.moe_align import MOE_CHUNK_TOKENS, moe_align
from dgemma.kernels.packed import QuantizedWeight, code_table

# Triton 3.9's interpreter computes tl.dot on bf16/fp16 operands as garbage (checked on CPU),
# so under TRITON_INTERPRET the operands are widened to fp32 first; compiled kernels are unaffected.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_LUTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _lut(fmt: str, device: torch.device) -> torch.Tensor:
    key = (fmt, device)
    if key not in _LUTS:
        _LUTS[key] = code_table(fmt).to(device)
    return _LUTS[key]


@triton.jit
def _gelu_tanh(x):
    # tanh(u) = 2*sigmoid(2u) - 1; tl has no portable tanh across versions.
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    # Clamp: sigmoid saturates long before exp overflows, and overflow warns in the interpreter.
    u = tl.minimum(tl.maximum(u, -20.0), 20.0)
    return 0.5 * x * (2.0 * tl.sigmoid(2.0 * u))


@triton.jit
def _decode_tile(p_base, s_base, lut_ptr, rows_n, kh, mask, stride_pn, stride_sn,
                 GROUP: tl.constexpr, SCALE_E4M3: tl.constexpr):
    """Decode a [BLOCK_K/2, BLOCK_N] tile into (even, odd) fp32 weights without the global scale."""
    p = tl.load(p_base + rows_n[None, :] * stride_pn + kh[:, None], mask=mask, other=0).to(tl.int32)
    w_lo = tl.load(lut_ptr + (p & 15))
    w_hi = tl.load(lut_ptr + ((p >> 4) & 15))
    # Both nibbles of a byte sit in the same block because GROUP is even.
    s = tl.load(s_base + rows_n[None, :] * stride_sn + ((2 * kh) // GROUP)[:, None], mask=mask, other=0)
    if SCALE_E4M3:
        # float8_e4m3fn from its bits, as torch decodes it: sign, 4-bit exponent (bias 7) with
        # subnormals at exponent 0, and NaN for all-ones exponent and mantissa (no infinities).
        s = s.to(tl.int32)
        ex = (s >> 3) & 15
        man = (s & 7).to(tl.float32)
        sf = tl.where(ex == 0, man * 0.001953125, (8.0 + man) * tl.exp2(ex.to(tl.float32) - 10.0))
        sf = tl.where((s & 0x80) != 0, -sf, sf)
        sf = tl.where((s & 0x7F) == 0x7F, float("nan"), sf)
    else:
        sf = s.to(tl.float32)
    return w_lo * sf, w_hi * sf


def _configs() -> list[triton.Config]:
    """Tile and launch candidates, timed on a GPU; the earlier fixed tiles (BLOCK_N 64, BLOCK_K 64 or
    128, Triton's default 4 warps and 3 stages) are among them. The interpreter ignores warps and stages
    and would run every candidate: it gets one."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 128})]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
            for bn in (64, 128) for bk in (64, 128) for warps, stages in ((4, 3), (8, 3))]


# M_BUCKET (rows rounded up to a power of two) keys the tuning without re-timing every row count;
# it is not specialized on, so its values share one compiled kernel.
@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit(do_not_specialize=["M_BUCKET"])
def _w4a16_kernel(
    a_ptr, p_ptr, s_ptr, g_ptr, lut_ptr, c_ptr, rows_ptr, expert_ptr, tw_ptr,
    M, N, K, num_rows, seg_rows, num_experts, M_BUCKET,
    stride_am, stride_ak,
    stride_pe, stride_pn,
    stride_se, stride_sn,
    stride_ge,
    stride_cm, stride_cn,
    GROUP: tl.constexpr, SCALE_E4M3: tl.constexpr,
    MOE: tl.constexpr, A_ROW_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr, FUSE_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if MOE:
        e = tl.load(expert_ptr + pid_m).to(tl.int64)
        # The grid has room for the most blocks any routing can need; the blocks past the last
        # expert's are marked with expert num_experts and do nothing.
        if e >= num_experts:
            return
        rows = tl.load(rows_ptr + offs_m)
        row_mask = rows < num_rows
        a_rows = rows // A_ROW_DIV
    else:
        rows = offs_m
        row_mask = offs_m < M
        a_rows = offs_m
        e = 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_h = tl.arange(0, BLOCK_K // 2)
    p_base = p_ptr + e * stride_pe
    s_base = s_ptr + e * stride_se

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSE_GATE:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kh = k0 // 2 + offs_h
        k_mask = kh < K // 2
        a_off = a_rows[:, None] * stride_am + (2 * kh)[None, :] * stride_ak
        a_mask = row_mask[:, None] & k_mask[None, :]
        a_even = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)
        a_odd = tl.load(a_ptr + a_off + stride_ak, mask=a_mask, other=0.0)
        if UPCAST:
            a_even = a_even.to(tl.float32)
            a_odd = a_odd.to(tl.float32)
        w_mask = k_mask[:, None] & n_mask[None, :]
        w_lo, w_hi = _decode_tile(p_base, s_base, lut_ptr, offs_n, kh, w_mask, stride_pn, stride_sn,
                                  GROUP, SCALE_E4M3)
        acc += tl.dot(a_even, w_lo.to(a_even.dtype)) + tl.dot(a_odd, w_hi.to(a_odd.dtype))
        if FUSE_GATE:
            # The up projection is the second half of gate_up: rows N..2N.
            u_lo, u_hi = _decode_tile(p_base, s_base, lut_ptr, offs_n + N, kh, w_mask, stride_pn, stride_sn,
                                      GROUP, SCALE_E4M3)
            acc_up += tl.dot(a_even, u_lo.to(a_even.dtype)) + tl.dot(a_odd, u_hi.to(a_odd.dtype))

    g = tl.load(g_ptr + e * stride_ge + offs_n // seg_rows, mask=n_mask, other=0.0)
    acc = acc * g[None, :]
    if FUSE_GATE:
        g_up = tl.load(g_ptr + e * stride_ge + (offs_n + N) // seg_rows, mask=n_mask, other=0.0)
        # Round each projection to the activation dtype first, as the unfused module does.
        gate = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
        up = (acc_up * g_up[None, :]).to(c_ptr.dtype.element_ty).to(tl.float32)
        acc = _gelu_tanh(gate) * up
    if MUL_WEIGHT:
        tw = tl.load(tw_ptr + rows, mask=row_mask, other=0.0)
        acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32) * tw[:, None]
    c_off = rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _block_m(m: int) -> int:
    """BLOCK_M of the dense kernel by row count: little padding for 16..512 rows."""
    return 16 if m <= 16 else (32 if m <= 64 else 64)


def _moe_block_m(tokens: int, top_k: int, num_experts: int) -> int:
    """BLOCK_M of the MoE kernels from the ~T*K/E rows per expert: a 256-token canvas with top-8 of
    128 experts gives ~16; every expert's rows are padded to a multiple of it."""
    rows = tokens * top_k
    return 16 if rows <= 64 * num_experts else (32 if rows <= 256 * num_experts else 64)


def _bucket(m: int) -> int:
    return 1 << min(max(m - 1, 0).bit_length(), 12)


def _check(w: QuantizedWeight, k: int) -> None:
    if w.shape[-1] != k:
        raise ValueError(f"activation has K={k}, weight expects K={w.shape[-1]}")
    if w.packed.stride(-1) != 1 or w.scales.stride(-1) != 1:
        raise ValueError("packed weights and scales must be contiguous in the last dimension")


def _scale_arg(w: QuantizedWeight) -> tuple[torch.Tensor, bool]:
    if w.fmt == "nvfp4":
        return w.scales.view(torch.uint8), True
    return w.scales.float(), False


# The launches are torch operators (dgemma::w4a16_mm, dgemma::moe_w4a16_mm) with shape-only fake
# implementations: torch.compile traces through them as single nodes, and a step built on fake or
# meta tensors (bench/engine.py --shape 26b) runs without launching anything.
_LIB = torch.library.Library("dgemma", "FRAGMENT")
_LIB.define("w4a16_mm(Tensor a, Tensor packed, Tensor scales, Tensor global_scale, Tensor lut, "
            "int group, bool e4m3) -> Tensor")
_LIB.define("moe_w4a16_mm(Tensor a, Tensor packed, Tensor scales, Tensor global_scale, Tensor lut, "
            "Tensor sorted_rows, Tensor block_expert, Tensor? row_weight, int num_rows, int a_row_div, "
            "int group, bool e4m3, bool fuse_gate, int block_m, bool zero_fill) -> Tensor")


def _w4a16_mm(a, packed, scales, global_scale, lut, group, e4m3):
    m, k = a.shape
    n = packed.shape[-2]
    out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    bm = _block_m(m)
    seg_rows = n // global_scale.shape[-1]
    grid = lambda meta: (triton.cdiv(m, bm), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _w4a16_kernel[grid](
        a, packed, scales, global_scale, lut, out, a, a, a,
        m, n, k, m, seg_rows, 0, _bucket(m),
        a.stride(0), a.stride(1),
        0, packed.stride(-2),
        0, scales.stride(-2),
        0,
        out.stride(0), out.stride(1),
        GROUP=group, SCALE_E4M3=e4m3,
        MOE=False, A_ROW_DIV=1, MUL_WEIGHT=False, FUSE_GATE=False,
        BLOCK_M=bm, UPCAST=_INTERPRET,
    )
    return out


def _w4a16_mm_fake(a, packed, scales, global_scale, lut, group, e4m3):
    return a.new_empty(a.shape[0], packed.shape[-2])


def _moe_w4a16_mm(a, packed, scales, global_scale, lut, sorted_rows, block_expert, row_weight, num_rows,
                  a_row_div, group, e4m3, fuse_gate, block_m, zero_fill):
    k = a.shape[1]
    n = packed.shape[1] // (2 if fuse_gate else 1)
    out = (torch.zeros if zero_fill else torch.empty)(num_rows, n, dtype=a.dtype, device=a.device)
    seg_rows = packed.shape[1] // global_scale.shape[-1]
    grid = lambda meta: (block_expert.numel(), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _w4a16_kernel[grid](
        a, packed, scales, global_scale, lut, out, sorted_rows, block_expert,
        row_weight if row_weight is not None else a,
        num_rows, n, k, num_rows, seg_rows, packed.shape[0], block_m,
        a.stride(0), a.stride(1),
        packed.stride(0), packed.stride(1),
        scales.stride(0), scales.stride(1),
        global_scale.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, SCALE_E4M3=e4m3,
        MOE=True, A_ROW_DIV=a_row_div, MUL_WEIGHT=row_weight is not None, FUSE_GATE=fuse_gate,
        BLOCK_M=block_m, UPCAST=_INTERPRET,
    )
    return out


def _moe_w4a16_mm_fake(a, packed, scales, global_scale, lut, sorted_rows, block_expert, row_weight, num_rows,
                       a_row_div, group, e4m3, fuse_gate, block_m, zero_fill):
    return a.new_empty(num_rows, packed.shape[1] // (2 if fuse_gate else 1))


# CPU runs them only under TRITON_INTERPRET.
for _device in ("CPU", "CUDA"):
    _LIB.impl("w4a16_mm", _w4a16_mm, _device)
    _LIB.impl("moe_w4a16_mm", _moe_w4a16_mm, _device)
torch.library.register_fake("dgemma::w4a16_mm", _w4a16_mm_fake, lib=_LIB)
torch.library.register_fake("dgemma::moe_w4a16_mm", _moe_w4a16_mm_fake, lib=_LIB)


def w4a16_matmul_triton(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x [..., K] @ W[N, K]^T with W 2-D 4-bit; output in x's dtype."""
    k = x.shape[-1]
    _check(w, k)
    scales, e4m3 = _scale_arg(w)
    out = torch.ops.dgemma.w4a16_mm(x.reshape(-1, k), w.packed, scales, w.global_scale, _lut(w.fmt, x.device),
                                    w.block, e4m3)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _moe_gemm(a, w: QuantizedWeight, sorted_rows, block_expert, num_rows, a_row_div, tw, fuse_gate, bm, zero_fill):
    _check(w, a.shape[1])
    scales, e4m3 = _scale_arg(w)
    return torch.ops.dgemma.moe_w4a16_mm(a, w.packed, scales, w.global_scale, _lut(w.fmt, a.device), sorted_rows,
                                         block_expert, tw, num_rows, a_row_div, w.block, e4m3, fuse_gate, bm,
                                         zero_fill)


def moe_w4a16_triton(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: QuantizedWeight,
    down: QuantizedWeight,
    activation: str = "gelu_pytorch_tanh",
) -> torch.Tensor:
    """Fused MoE: grouped gate_up (+ activation) then grouped down (x router weight), summed over top-k.
    No host sync: the alignment and both launches are sized from the shapes alone."""
    if activation != "gelu_pytorch_tanh":
        raise NotImplementedError(f"fused MoE kernel supports gelu_pytorch_tanh, not {activation}")
    if hidden_states.shape[0] > MOE_CHUNK_TOKENS:
        return torch.cat([
            moe_w4a16_triton(hidden_states[i:i + MOE_CHUNK_TOKENS], top_k_index[i:i + MOE_CHUNK_TOKENS],
                             top_k_weights[i:i + MOE_CHUNK_TOKENS], gate_up, down, activation)
            for i in range(0, hidden_states.shape[0], MOE_CHUNK_TOKENS)
        ])
    t, h = hidden_states.shape
    top_k = top_k_index.shape[1]
    num_experts = gate_up.shape[0]
    bm = _moe_block_m(t, top_k, num_experts)
    sorted_rows, block_expert, num_rows = moe_align(top_k_index, num_experts, bm)
    x = hidden_states.contiguous()
    # Rows of pairs routed nowhere (expert-parallel sentinels) are never read from mid, and are zero in out.
    mid = _moe_gemm(x, gate_up, sorted_rows, block_expert, num_rows, top_k, None, True, bm, False)
    tw = top_k_weights.reshape(-1).float().contiguous()
    out = _moe_gemm(mid, down, sorted_rows, block_expert, num_rows, 1, tw, False, bm, True)
    # Sum the K slots in fp32: one rounding instead of K sequential bf16 adds.
    return out.view(t, top_k, h).float().sum(dim=1).to(x.dtype)
