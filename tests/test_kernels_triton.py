"""The Triton kernels themselves, run by Triton's interpreter on CPU against the torch twins.

TRITON_INTERPRET must be set before triton is first imported, and other tests in this
process may already have imported it, so the checks run in a fresh subprocess.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import os
    import torch
    from transformers.activations import ACT2FN
    from dgemma.kernels.packed import QuantizedWeight
    from dgemma.quant.formats import quantize
    from dgemma.kernels import triton_w4a16
    from dgemma.kernels.triton_w4a16 import _moe_block_m, moe_w4a16_triton, w4a16_matmul_triton
    from dgemma.kernels.reference import moe_w4a16_ref, w4a16_matmul_ref
    from dgemma.kernels import moe_w4a16, w4a16_matmul

    torch.manual_seed(0)
    act = ACT2FN["gelu_pytorch_tanh"]


    def moe_case(fmt, t, e, h=64, i=64, segments=1, dtype=torch.float32):
        # gate and up at different scales, so two global-scale segments really differ
        gu = torch.randn(e, 2 * i, h) * torch.cat([torch.full((i, 1), 0.02), torch.full((i, 1), 0.2)])
        gu = quantize(gu, fmt, segments=segments)
        dn = quantize(torch.randn(e, h, i) * 0.1, fmt)
        x = torch.randn(t, h, dtype=dtype)
        idx = torch.stack([torch.randperm(e)[:2] for _ in range(t)])
        tw = torch.rand(t, 2)
        got = moe_w4a16_triton(x, idx, tw, gu, dn)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got, moe_w4a16_ref(x, idx, tw, gu, dn, act), rtol=tol, atol=tol)
        assert got.dtype == dtype and got.abs().max() > 0
        return gu


    for fmt in ("nvfp4", "nf4"):
        # rows straddling the BLOCK_M choices, K not a multiple of BLOCK_K, N not of BLOCK_N
        for m, n, k, segs in ((3, 48, 128, 2), (20, 80, 192, 1), (70, 40, 320, 2)):
            x = torch.randn(m, k)
            w = quantize(torch.randn(n, k) * 0.1, fmt, segments=segs)
            got, ref = w4a16_matmul_triton(x, w), w4a16_matmul_ref(x, w)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        x = torch.randn(2, 5, 128, dtype=torch.bfloat16)
        w = quantize(torch.randn(64, 128) * 0.1, fmt)
        torch.testing.assert_close(w4a16_matmul_triton(x, w), w4a16_matmul_ref(x, w), rtol=2e-2, atol=2e-2)
        # MoE: 4 experts, top-2, with an expert-parallel sentinel and an expert nobody picked.
        t, h, i, e = 19, 64, 64, 5
        gu = quantize(torch.randn(e, 2 * i, h) * 0.1, fmt)
        dn = quantize(torch.randn(e, h, i) * 0.1, fmt)
        x = torch.randn(t, h)
        idx = torch.stack([torch.randperm(e - 1)[:2] for _ in range(t)])
        idx[4, 0] = e
        tw = torch.rand(t, 2)
        got = moe_w4a16_triton(x, idx, tw, gu, dn)
        ref = moe_w4a16_ref(x, idx, tw, gu, dn, act)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert got.abs().max() > 0
        xb = x.bfloat16()
        got = moe_w4a16_triton(xb, idx, tw, gu, dn)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, moe_w4a16_ref(xb, idx, tw, gu, dn, act), rtol=3e-2, atol=3e-2)
        # Larger per-expert row blocks (2 experts, top-2: every token visits both), gate and up with
        # their own global scale ([E, 2]) as fused ModelOpt checkpoints load.
        assert _moe_block_m(100, 2, 2) == 32 and _moe_block_m(300, 2, 2) == 64
        assert moe_case(fmt, 100, 2, segments=2).global_scale.shape == (2, 2)
        moe_case(fmt, 300, 2, segments=2, dtype=torch.bfloat16)

    # Prompts longer than a MoE chunk run chunk by chunk (a small chunk keeps the interpreter quick).
    triton_w4a16.MOE_CHUNK_TOKENS = 128
    moe_case("nvfp4", 300, 2)

    # E4M3 block scales decoded from their bits as torch decodes them: subnormals (blocks far below the
    # tensor's largest), a negative sign and NaN.
    w = torch.randn(32, 256) * 0.1
    w[0, :16] = 50.0  # sets the global scale; other rows land on subnormal block scales
    w[1:] *= torch.logspace(-5, -3, 16).repeat_interleave(16)
    q = quantize(w, "nvfp4")
    bits = q.scales.view(torch.uint8)
    assert ((bits & 0x78) == 0).logical_and((bits & 7) != 0).sum() > 50, "expected subnormal scales"
    x = torch.randn(6, 256)
    torch.testing.assert_close(w4a16_matmul_triton(x, q), w4a16_matmul_ref(x, q), rtol=1e-4, atol=1e-8)
    odd = q.scales.float()
    odd[::2] *= -1
    odd[3, 2] = float("nan")
    signed = QuantizedWeight("nvfp4", q.packed, odd.to(torch.float8_e4m3fn), q.global_scale)
    got, ref = w4a16_matmul_triton(x, signed), w4a16_matmul_ref(x, signed)
    assert got[:, 3].isnan().all() and ref[:, 3].isnan().all()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-8, equal_nan=True)

    # Dispatch: forced Triton runs the kernels; DGEMMA_KERNELS=torch the reference, even here.
    x, w = torch.randn(7, 64), quantize(torch.randn(32, 64), "nvfp4")
    idx, tw = torch.tensor([[0, 1]] * 7), torch.rand(7, 2)
    gu, dn = quantize(torch.randn(2, 64, 64) * 0.1, "nvfp4"), quantize(torch.randn(2, 64, 32) * 0.1, "nvfp4")
    tri = w4a16_matmul_triton(x, w), moe_w4a16_triton(x, idx, tw, gu, dn)
    ref = w4a16_matmul_ref(x, w), moe_w4a16_ref(x, idx, tw, gu, dn, act)
    assert not any(map(torch.equal, tri, ref))  # fp32 sums in another order tell the paths apart
    assert all(map(torch.equal, (w4a16_matmul(x, w), moe_w4a16(x, idx, tw, gu, dn, act)), tri))
    os.environ["DGEMMA_KERNELS"] = "torch"
    assert all(map(torch.equal, (w4a16_matmul(x, w), moe_w4a16(x, idx, tw, gu, dn, act)), ref))
    print("TRITON-INTERPRET-OK")
    """
)


def test_triton_kernels_match_reference_under_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", DGEMMA_KERNELS="triton")
    # `python -c` puts its working directory first on sys.path: not the checkout, whose kernels/
    # would shadow the package transformers imports.
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "TRITON-INTERPRET-OK" in res.stdout
