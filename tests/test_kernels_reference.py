"""Pure-torch kernel twins, the expert grouping, and dispatch off CUDA."""

import pytest
import torch
from transformers.activations import ACT2FN

from dgemma.kernels import moe_w4a16, use_triton, w4a16_matmul
from dgemma.kernels.moe_align import moe_align
from dgemma.kernels.reference import moe_w4a16_ref, w4a16_matmul_ref
from dgemma.quant.formats import quantize


@pytest.mark.parametrize("fmt", ["nvfp4", "nf4"])
def test_w4a16_reference_is_matmul_with_the_dequantized_weight(fmt):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 128)
    w = quantize(torch.randn(48, 128), fmt)
    torch.testing.assert_close(w4a16_matmul_ref(x, w), x @ w.dequantize().T)


def test_moe_align_groups_rows_by_expert_with_padding():
    idx = torch.tensor([[0, 2], [2, 1], [0, 2], [4, 1]])  # 4 = sentinel for 4 experts
    rows, block_expert, n = moe_align(idx, num_experts=4, block_m=2)
    assert n == 8
    flat = idx.flatten()
    # Room for ceil(8 / 2) + 4 blocks whatever the routing; the unused ones are marked with expert 4.
    assert block_expert.tolist() == [0, 1, 2, 2, 4, 4, 4, 4]
    assert rows.shape == (16,) and rows.dtype == torch.int32
    for b, e in enumerate(block_expert.tolist()):
        for r in rows[b * 2:(b + 1) * 2].tolist():
            assert r == n or flat[r] == e
    real = sorted(r for r in rows.tolist() if r < n)
    assert real == [i for i, e in enumerate(flat.tolist()) if e < 4]


@pytest.mark.parametrize("seed", range(6))
def test_moe_align_has_static_shapes_and_covers_every_routed_pair(seed):
    """Random routings, including all pairs on one expert (the most padding-free case) and every
    expert hit (the most padding): sizes depend only on (T, K, E, BLOCK_M), each routed pair appears
    exactly once in a block of its own expert, and each expert's blocks are contiguous and in order."""
    gen = torch.Generator().manual_seed(seed)
    t, k, e, bm = (37, 4, 9, 4) if seed % 2 else (64, 8, 128, 16)
    idx = torch.randint(0, e, (t, k), generator=gen)
    if seed == 2:
        idx[:] = 3
    if seed == 3:
        idx[::5, 0] = e  # expert-parallel sentinels
    rows, block_expert, n = moe_align(idx, e, bm)
    blocks = -(-t * k // bm) + e
    assert rows.shape == (blocks * bm,) and block_expert.shape == (blocks,)
    flat = idx.flatten()
    used = block_expert < e
    assert bool(used[: int(used.sum())].all()), "unused blocks come last"
    assert torch.equal(block_expert[used], torch.sort(block_expert[used]).values)
    got = rows.view(blocks, bm)
    for b in range(blocks):
        real = got[b][got[b] < n]
        assert bool((flat[real.long()] == block_expert[b]).all())
        if not used[b]:
            assert real.numel() == 0
    real = rows[rows < n].long()
    assert sorted(real.tolist()) == [i for i in range(n) if flat[i] < e]


@pytest.mark.parametrize("mode,triton", [(None, False), ("auto", False), ("", False), ("torch", False),
                                          ("Torch", False), ("triton", True)])
def test_dispatch_follows_dgemma_kernels(monkeypatch, mode, triton):
    if mode is None:
        monkeypatch.delenv("DGEMMA_KERNELS", raising=False)
    else:
        monkeypatch.setenv("DGEMMA_KERNELS", mode)
    x = torch.randn(4, 64)  # on CPU: auto means the reference
    assert use_triton(x) is triton
    if not triton:
        w = quantize(torch.randn(32, 64), "nvfp4")
        assert torch.equal(w4a16_matmul(x, w), w4a16_matmul_ref(x, w))


def test_unknown_dgemma_kernels_is_an_error(monkeypatch):
    monkeypatch.setenv("DGEMMA_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"DGEMMA_KERNELS='cuda' is not one of auto, torch, triton"):
        w4a16_matmul(torch.randn(4, 64), quantize(torch.randn(32, 64), "nvfp4"))


def test_moe_dispatch_off_cuda_is_the_reference():
    torch.manual_seed(0)
    gu = quantize(torch.randn(4, 128, 64), "nvfp4")
    dn = quantize(torch.randn(4, 64, 64), "nvfp4")
    x = torch.randn(6, 64)
    idx = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [0, 4], [1, 1]])
    w = torch.rand(6, 2)
    act = ACT2FN["gelu_pytorch_tanh"]
    torch.testing.assert_close(moe_w4a16(x, idx, w, gu, dn, act), moe_w4a16_ref(x, idx, w, gu, dn, act))
