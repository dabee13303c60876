"""Quantized experts against transformers' DiffusionGemmaTextExperts, and in-place model quantization."""

import copy

import pytest
import torch
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts
from transformers import DiffusionGemmaForBlockDiffusion

from dgemma.quant.apply import quantize_model
from dgemma.quant.modules import Packed4bit, QuantizedExperts, QuantLinear
from tiny import tiny_config


@pytest.fixture(scope="module")
def config():
    # Widths multiple of 64 so NF4 (blocks of 64) applies everywhere.
    return tiny_config(vocab_size=512, moe_intermediate_size=64)


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return DiffusionGemmaForBlockDiffusion(config).eval()


def _routing(tokens, experts, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g)
    return idx, w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("fmt", ["nvfp4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_experts_match_the_module_on_dequantized_weights(config, fmt, dtype):
    torch.manual_seed(0)
    ref = DiffusionGemmaTextExperts(config.text_config)
    with torch.no_grad():
        ref.gate_up_proj.normal_(0, 0.05)
        ref.down_proj.normal_(0, 0.05)
    q = QuantizedExperts.from_experts(ref, fmt)
    gate_up, down = q.dequantized(dtype)
    with torch.no_grad():
        ref.gate_up_proj.copy_(gate_up.float())
        ref.down_proj.copy_(down.float())
    ref = ref.to(dtype)
    x = torch.randn(40, config.text_config.hidden_size, dtype=dtype)
    idx, w = _routing(40, config.text_config.num_experts, config.text_config.top_k_experts)
    idx[3, 1] = config.text_config.num_experts  # expert-parallel sentinel: skipped by both
    with torch.no_grad():
        expected = ref(x, idx, w)
        got = q(x, idx, w)
    assert got.dtype == expected.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_quantize_model_shares_one_module_between_encoder_and_decoder(model):
    q = quantize_model(copy.deepcopy(model), "nvfp4", dense="nvfp4")
    enc = q.model.encoder.language_model.layers
    dec = q.model.decoder.layers
    for e, d in zip(enc, dec):
        assert isinstance(d.experts, QuantizedExperts) and e.experts is d.experts
        assert isinstance(d.self_attn.q_proj, QuantLinear) and e.self_attn.q_proj is d.self_attn.q_proj
        assert type(d.router.proj) is torch.nn.Linear  # routing stays in high precision
    buffers = {id(b) for m in q.modules() if isinstance(m, Packed4bit) for b in m.buffers()}
    per_layer = sum(1 for m in dec.modules() if isinstance(m, Packed4bit)) * 3
    assert len(buffers) == per_layer + 3 * 3  # + self_conditioning's 3 linears, never doubled


@pytest.mark.parametrize("fmt", ["nvfp4", "nf4"])
def test_quantized_model_logits_track_the_original(model, fmt):
    torch.manual_seed(1)
    ids = torch.randint(3, 512, (2, 12))
    canvas = torch.randint(3, 512, (2, 16))
    q = quantize_model(copy.deepcopy(model), fmt)
    with torch.no_grad():
        ref = model(input_ids=ids, decoder_input_ids=canvas).logits
        out = q(input_ids=ids, decoder_input_ids=canvas).logits
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    # Random-init weights make small logits; the error is what 4-bit experts alone cost.
    assert ((out - ref).norm() / ref.norm()).item() < 0.6


def test_model_dtype_cast_keeps_scales(model):
    q = quantize_model(copy.deepcopy(model), "nvfp4")
    before = q.model.decoder.layers[0].experts.gate_up_q.weight.dequantize()
    q.to(torch.bfloat16)
    experts = q.model.decoder.layers[0].experts
    assert experts.gate_up_q.weight.scales.dtype == torch.float8_e4m3fn
    assert torch.equal(experts.gate_up_q.weight.dequantize(), before)


def test_nf4_dense_linears_use_bitsandbytes(model):
    bnb = pytest.importorskip("bitsandbytes")
    q = quantize_model(copy.deepcopy(model), "nvfp4", dense="nf4")
    lin = q.model.decoder.layers[0].mlp.gate_proj
    assert isinstance(lin, bnb.nn.Linear4bit)
    assert lin is q.model.encoder.language_model.layers[0].mlp.gate_proj
    ref = model.model.decoder.layers[0].mlp.gate_proj
    x = torch.randn(5, ref.in_features)
    q.train()  # bitsandbytes' plain dequantize path (eval on CPU switches to a repacked kernel)
    with torch.no_grad():
        err = (lin(x) - ref(x)).norm() / ref(x).norm()
    assert err < 0.15


@pytest.mark.parametrize("dense", [None, "nvfp4", "nf4"])
def test_tie_weights_after_quantization_is_harmless(model, dense):
    q = quantize_model(copy.deepcopy(model), "nvfp4", dense=dense).train()
    ids, canvas = torch.randint(3, 512, (1, 8)), torch.randint(3, 512, (1, 16))
    with torch.no_grad():
        before = q(input_ids=ids, decoder_input_ids=canvas).logits
        q.tie_weights()  # transformers' rules name the 3-D expert tensors the quantized module lacks
        after = q(input_ids=ids, decoder_input_ids=canvas).logits
    assert q.model.decoder.layers[1].experts is q.model.encoder.language_model.layers[1].experts
    torch.testing.assert_close(after, before)
