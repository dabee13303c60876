"""Time the 4-bit Triton kernels on a GPU at the 26B-A4B's real shapes.

    python bench/kernels.py [--iters 50]

For each shape: check the Triton result against the torch reference, then time
  * bf16 cuBLAS (x @ W^T with W in bf16),
  * dequantize-then-matmul (what a naive 4-bit path does every call),
  * the Triton W4A16 kernel (autotuned by its first call, the correctness check; the tile it
    chose is printed),
  * the floor: bytes the kernel must read / measured device copy bandwidth.
The MoE line runs one layer's experts (128 x [1408, 2816] + [2816, 704]) for a
256-token canvas routed top-8, against the bf16 experts loop of transformers.
Without CUDA it says so and exits 0: nothing here is meaningful on a CPU.
"""

from __future__ import annotations

import argparse
import sys

import torch

# (label, N, K): per-expert projections and the dense layers of the 26B-A4B.
DENSE_SHAPES = [
    ("expert gate_up [1408 x 2816]", 1408, 2816),
    ("expert down [2816 x 704]", 2816, 704),
    ("q_proj sliding [4096 x 2816]", 4096, 2816),
    ("dense mlp up [2112 x 2816]", 2112, 2816),
]
ROWS = (16, 64, 256, 512)


def _time(fn, iters: int) -> float:
    """Median milliseconds of fn() over iters runs, after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device memory bandwidth in bytes/s from a large copy (one read + one write per byte)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _time(lambda: dst.copy_(src), 20)
    return 2 * nbytes / (ms / 1e3)


def _tuned() -> str:
    """The tile the autotuner chose for the last launch: BLOCK_N x BLOCK_K, warps, stages."""
    from dgemma.kernels.triton_w4a16 import _w4a16_kernel

    c = _w4a16_kernel.best_config
    return f"{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']} w{c.num_warps} s{c.num_stages}"


def bench_dense(iters: int, bandwidth: float) -> list[str]:
    from dgemma.kernels.reference import w4a16_matmul_ref
    from dgemma.kernels.triton_w4a16 import w4a16_matmul_triton
    from dgemma.quant.formats import quantize

    lines = ["| shape | fmt | rows | bf16 cuBLAS ms | dequant+matmul ms | Triton W4A16 ms | tile | floor ms |",
             "|---|---|---|---|---|---|---|---|"]
    for label, n, k in DENSE_SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for fmt in ("nvfp4", "nf4"):
            q = quantize(w, fmt)
            for m in ROWS:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                torch.testing.assert_close(w4a16_matmul_triton(x, q), w4a16_matmul_ref(x, q), rtol=2e-2, atol=2e-2)
                tile = _tuned()
                t_bf16 = _time(lambda: x @ w.T, iters)
                t_deq = _time(lambda: w4a16_matmul_ref(x, q), iters)
                t_tri = _time(lambda: w4a16_matmul_triton(x, q), iters)
                floor = (q.nbytes() + x.numel() * 2 + m * n * 2) / bandwidth * 1e3
                lines.append(f"| {label} | {fmt} | {m} | {t_bf16:.4f} | {t_deq:.4f} | {t_tri:.4f} | {tile} | {floor:.4f} |")
    return lines


def bench_moe(iters: int, bandwidth: float) -> list[str]:
    from transformers.activations import ACT2FN

    from dgemma.kernels.reference import moe_w4a16_ref
    from dgemma.kernels.triton_w4a16 import moe_w4a16_triton
    from dgemma.quant.formats import quantize

    e, h, i, tokens, top_k = 128, 2816, 704, 256, 8
    act = ACT2FN["gelu_pytorch_tanh"]
    gate_up = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16) * 0.02
    down = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16)
    scores = torch.randn(tokens, e, device="cuda").softmax(-1)
    tw, idx = scores.topk(top_k, dim=-1)

    def bf16_loop():
        out = torch.zeros_like(x)
        for ex in idx.unique().tolist():
            tok, pos = torch.where(idx == ex)
            g, u = torch.nn.functional.linear(x[tok], gate_up[ex]).chunk(2, -1)
            y = torch.nn.functional.linear(act(g) * u, down[ex]) * tw[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    lines = ["| MoE layer, 256 tokens top-8 of 128 | fmt | bf16 experts loop ms | dequant loop ms | "
             "Triton fused ms | floor ms |", "|---|---|---|---|---|---|"]
    for fmt in ("nvfp4", "nf4"):
        gq, dq = quantize(gate_up, fmt), quantize(down, fmt)
        torch.testing.assert_close(moe_w4a16_triton(x, idx, tw, gq, dq), moe_w4a16_ref(x, idx, tw, gq, dq, act),
                                   rtol=3e-2, atol=3e-2)
        hit = idx.unique().numel()
        floor = (gq.nbytes() + dq.nbytes()) * hit / e / bandwidth * 1e3
        lines.append(
            f"| gate_up + down | {fmt} | {_time(bf16_loop, iters):.3f} | "
            f"{_time(lambda: moe_w4a16_ref(x, idx, tw, gq, dq, act), iters):.3f} | "
            f"{_time(lambda: moe_w4a16_triton(x, idx, tw, gq, dq), iters):.3f} | {floor:.3f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: the kernel benchmarks need one; nothing was measured.")
        return 0
    bandwidth = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    for line in bench_dense(args.iters, bandwidth) + [""] + bench_moe(args.iters, bandwidth):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
