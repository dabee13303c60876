"""NVFP4 / NF4 formats in plain torch: exact values, packing order, rounding, error bounds."""

import pytest
import torch

from dgemma.kernels.packed import E2M1_VALUES, NF4_VALUES, QuantizedWeight, dequantize, unpack_codes
from dgemma.quant.formats import e2m1_codes, pack_codes, quantize


def test_packing_puts_first_element_in_low_nibble():
    codes = torch.tensor([[1, 2, 15, 0]])
    packed = pack_codes(codes)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x21, 0x0F]]
    assert unpack_codes(packed).tolist() == codes.tolist()


def test_e2m1_codes_of_representable_values_and_ties_to_even():
    values = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6])
    assert E2M1_VALUES[e2m1_codes(values).long()].tolist() == values.tolist()
    # Midpoints round to the neighbour with the even code: 0, 1, 1, 2, 2, 4, 4.
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert E2M1_VALUES[e2m1_codes(mids).long()].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert E2M1_VALUES[e2m1_codes(-mids).long()].tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    # Beyond the largest value everything saturates to 6.
    assert E2M1_VALUES[e2m1_codes(torch.tensor([6.5, 100.0])).long()].tolist() == [6.0, 6.0]


def test_nvfp4_round_trips_representable_values_exactly():
    torch.manual_seed(0)
    # w = code * e4m3 block scale * global, with a 6 in every block (so the block scale is
    # recovered exactly) and a block at scale 448 (so the global scale is too).
    g = 2.0**-10
    block_scales = torch.tensor([448.0, 1.0, 0.5, 3.5, 96.0, 0.015625, 13.0, 240.0])
    vals = E2M1_VALUES[torch.randint(0, 16, (2, 64))]
    vals[:, ::16] = -6.0
    w = vals * block_scales.reshape(2, 4).repeat_interleave(16, dim=1) * g
    q = quantize(w, "nvfp4")
    assert q.packed.shape == (2, 32) and q.scales.shape == (2, 4)
    assert q.scales.dtype == torch.float8_e4m3fn and q.global_scale.dtype == torch.float32
    assert q.global_scale.item() == g
    assert q.scales.float().flatten().tolist() == block_scales.tolist()
    assert torch.equal(dequantize(q), w)
    assert torch.equal(E2M1_VALUES[unpack_codes(q.packed)], vals)


def test_nvfp4_global_scale_is_amax_over_6_times_448():
    w = torch.randn(4, 32) * 3
    q = quantize(w, "nvfp4")
    assert torch.allclose(q.global_scale, w.abs().max() / (6 * 448))
    # The largest block scale uses the top of E4M3's range.
    assert q.scales.float().max().item() == 448.0


def test_nvfp4_matches_a_hand_computed_block():
    w = torch.tensor([[0.0, 0.3, -0.6, 1.2, 3.0, -2.4, 0.9, 1.5, 2.1, -3.0, 0.45, 0.75, 2.7, 1.8, -1.05, 0.15]])
    q = quantize(w, "nvfp4")
    scale = q.scales.float().item() * q.global_scale.item()
    expected = E2M1_VALUES[e2m1_codes(w / scale).long()] * scale
    assert torch.allclose(dequantize(q), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt,bound", [("nvfp4", 0.12), ("nf4", 0.12)])
def test_error_bound_on_random_weights(fmt, bound):
    torch.manual_seed(1)
    w = torch.randn(3, 64, 256)
    q = quantize(w, fmt)
    d = dequantize(q)
    rel = ((d - w).norm() / w.norm()).item()
    assert rel < bound
    # Per element: at most half the largest code step of the block's scale.
    if fmt == "nvfp4":
        step = q.scales.float().repeat_interleave(16, -1) * q.global_scale[..., None]
        assert ((d - w).abs() <= step + 1e-6).all()


def test_nf4_round_trips_code_book_values():
    vals = NF4_VALUES[torch.arange(64) % 16].reshape(1, 64) * 0.25
    vals[0, 0] = 0.25  # block absmax must equal the scale for exactness
    q = quantize(vals, "nf4")
    assert torch.allclose(dequantize(q), vals, atol=1e-7)


def test_segments_keep_separate_global_scales():
    w = torch.cat([torch.randn(8, 32) * 100, torch.randn(8, 32) * 0.01])
    q = quantize(w, "nvfp4", segments=2)
    assert q.global_scale.shape == (2,)
    d = dequantize(q)
    # The small half keeps its precision instead of underflowing against the large half's scale.
    assert ((d[8:] - w[8:]).norm() / w[8:].norm()) < 0.15


def test_zero_weight_and_bad_shapes():
    q = quantize(torch.zeros(2, 16), "nvfp4")
    assert torch.equal(dequantize(q), torch.zeros(2, 16))
    with pytest.raises(ValueError, match="block size"):
        quantize(torch.zeros(2, 24), "nvfp4")
    with pytest.raises(ValueError, match="unknown"):
        quantize(torch.zeros(2, 16), "int4")


def test_stacked_weight_indexing():
    w = torch.randn(3, 8, 32)
    q = quantize(w, "nvfp4")
    assert isinstance(q[1], QuantizedWeight)
    assert torch.equal(q[1].dequantize(), dequantize(q)[1])
