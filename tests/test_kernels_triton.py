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
    import torch
    from transformers.activations import ACT2FN
    from dgemma.quant.formats import quantize
    from dgemma.kernels.triton_w4a16 import moe_w4a16_triton, w4a16_matmul_triton
    from dgemma.kernels.reference import moe_w4a16_ref, w4a16_matmul_ref
    from dgemma.kernels import moe_w4a16, w4a16_matmul

    torch.manual_seed(0)
    act = ACT2FN["gelu_pytorch_tanh"]
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
    # Dispatch forced to Triton goes through the kernels too.
    assert w4a16_matmul(x, quantize(torch.randn(32, 64), "nvfp4")).shape == (t, 32)
    assert moe_w4a16(x, idx, tw, gu, dn, act).shape == (t, h)
    print("TRITON-INTERPRET-OK")
    """
)


def test_triton_kernels_match_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", DGEMMA_KERNELS="triton")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "TRITON-INTERPRET-OK" in res.stdout
