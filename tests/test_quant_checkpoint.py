"""Quantized checkpoints: our layout, ModelOpt NVFP4, compressed-tensors; loading onto a meta model; CLI."""

import copy
import json

import pytest
import torch
import typer
from safetensors import safe_open
from transformers import DiffusionGemmaForBlockDiffusion
from typer.testing import CliRunner

from dgemma.quant.apply import quantize_model
from dgemma.quant.checkpoint import CheckpointError, is_quantized_checkpoint, load_quantized_into
from dgemma.cli.quant import register
from dgemma.quant.meta import meta_model
from dgemma.quant.modules import QuantizedExperts, QuantLinear
from dgemma.quant.writer import save_quantized
from tiny import build_tiny_checkpoint

IDS = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
CANVAS = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("bf16"), vocab_size=512, moe_intermediate_size=64)


@pytest.fixture(scope="module")
def model(bf16_dir):
    return DiffusionGemmaForBlockDiffusion.from_pretrained(bf16_dir, dtype=torch.float32).eval()


def _logits(m):
    with torch.no_grad():
        return m(input_ids=IDS, decoder_input_ids=CANVAS).logits


def _load(path, **kw):
    m = load_quantized_into(meta_model(DiffusionGemmaForBlockDiffusion.config_class.from_pretrained(path)),
                            path, "cpu", torch.float32, **kw)
    return m.eval()


@pytest.mark.parametrize("layout,dense,fused", [
    ("dgemma", None, False), ("modelopt", "nvfp4", False), ("modelopt", None, True),
    ("compressed-tensors", "nvfp4", False),
])
def test_layouts_round_trip_bit_exactly(model, tmp_path, layout, dense, fused):
    q = quantize_model(copy.deepcopy(model), "nvfp4", dense=dense)
    save_quantized(q, tmp_path, layout, fused_experts=fused)
    assert is_quantized_checkpoint(tmp_path)
    loaded = _load(tmp_path)
    dec, enc = loaded.model.decoder.layers[0], loaded.model.encoder.language_model.layers[0]
    assert isinstance(dec.experts, QuantizedExperts) and enc.experts is dec.experts
    if dense:
        assert isinstance(dec.self_attn.o_proj, QuantLinear) and enc.self_attn.o_proj is dec.self_attn.o_proj
    torch.testing.assert_close(_logits(loaded), _logits(q), rtol=1e-5, atol=1e-5)


def test_modelopt_and_compressed_tensors_tensor_layout(model, tmp_path):
    q = quantize_model(copy.deepcopy(model), "nvfp4", dense="nvfp4")
    save_quantized(q, tmp_path / "mo", "modelopt")
    save_quantized(q, tmp_path / "ct", "compressed-tensors")
    hf = json.loads((tmp_path / "mo" / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "NVFP4" and hf["quantization"]["group_size"] == 16
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "nvfp4-pack-quantized"
    name = "model.decoder.layers.0.experts.1.up_proj"
    with safe_open(str(tmp_path / "mo" / "model.safetensors"), "pt") as mo, \
            safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as ct:
        w = mo.get_tensor(f"{name}.weight")
        assert w.dtype == torch.uint8 and w.shape == (64, 32)  # [I, H/2]
        assert mo.get_tensor(f"{name}.weight_scale").dtype == torch.float8_e4m3fn
        assert mo.get_tensor(f"{name}.weight_scale_2").dtype == torch.float32
        assert f"{name}.input_scale" in mo.keys()
        assert torch.equal(ct.get_tensor(f"{name}.weight_packed"), w)
        # compressed-tensors stores the reciprocal of ModelOpt's dequant multiplier.
        torch.testing.assert_close(ct.get_tensor(f"{name}.weight_global_scale").reshape(()),
                                   1 / mo.get_tensor(f"{name}.weight_scale_2"))
        assert not any(k.startswith("model.encoder.language_model.layers.0.experts") for k in mo.keys())


def test_modelopt_fused_experts_in_transposed_layout(model, tmp_path):
    from safetensors.torch import save_file

    q = quantize_model(copy.deepcopy(model), "nvfp4")
    save_quantized(q, tmp_path, "modelopt", fused_experts=True)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = "model.decoder.layers.0.experts.gate_up_proj"
    assert tensors[name].shape == (4, 128, 32) and tensors[f"{name}_weight_scale"].shape == (4, 128, 4)
    assert tensors[f"{name}_weight_scale_2"].shape == (4,)
    for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj",
                                                  "proj_weight_scale"))]:
        tensors[key] = tensors[key].transpose(-1, -2).contiguous()  # Llama-4 style [E, in/2, out]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    torch.testing.assert_close(_logits(_load(tmp_path)), _logits(q), rtol=1e-5, atol=1e-5)


def test_nf4_checkpoint_with_bitsandbytes_linears(model, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    q = quantize_model(copy.deepcopy(model), "nf4", dense="nf4")
    save_quantized(q, tmp_path, "dgemma")
    loaded = _load(tmp_path)
    lin = loaded.model.decoder.layers[1].mlp.down_proj
    assert isinstance(lin, bnb.nn.Linear4bit)
    ref = q.model.decoder.layers[1].mlp.down_proj
    torch.testing.assert_close(
        bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state),
        bnb.functional.dequantize_4bit(ref.weight.data, ref.weight.quant_state),
    )
    loaded.train(), q.train()  # same bitsandbytes code path on both sides
    torch.testing.assert_close(_logits(loaded), _logits(q), rtol=1e-5, atol=1e-5)


def test_on_the_fly_quantization_of_a_bf16_checkpoint(model, bf16_dir):
    assert not is_quantized_checkpoint(bf16_dir)
    loaded = _load(bf16_dir, quantize="nvfp4")
    assert isinstance(loaded.model.decoder.layers[0].experts, QuantizedExperts)
    torch.testing.assert_close(_logits(loaded), _logits(quantize_model(copy.deepcopy(model), "nvfp4")))
    plain = _load(bf16_dir)
    torch.testing.assert_close(_logits(plain), _logits(model))


def test_bf16_load_equals_from_pretrained_rotary_frequencies_included(bf16_dir):
    """Buffers no checkpoint holds are computed as transformers computes them: the rotary
    frequencies stay fp32 in a bf16 model (bf16 ones are off by up to 0.4%, whole radians of phase
    thousands of positions in), the embedding scale follows the model's dtype."""
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(bf16_dir, dtype=torch.bfloat16).eval()
    loaded = load_quantized_into(meta_model(ref.config), bf16_dir, "cpu", torch.bfloat16).eval()
    ref_buffers = dict(ref.named_buffers())
    assert loaded.model.decoder.rotary_emb.sliding_attention_inv_freq.dtype == torch.float32
    for name, buf in loaded.named_buffers():
        assert buf.dtype == ref_buffers[name].dtype and torch.equal(buf, ref_buffers[name]), name
    torch.testing.assert_close(_logits(loaded), _logits(ref), rtol=0, atol=0)


def test_incomplete_checkpoint_is_an_error(model, tmp_path):
    from safetensors.torch import save_file

    q = quantize_model(copy.deepcopy(model), "nvfp4")
    save_quantized(q, tmp_path, "dgemma")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if "decoder.norm" not in k}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="decoder.norm.weight"):
        _load(tmp_path)


def _cli():
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer in multi-command mode
    return app, CliRunner()


def _refuse(*args, **kwargs):
    raise AssertionError("a pre-quantized checkpoint was quantized again while loading")


@pytest.mark.parametrize("fmt", ["nvfp4", "nf4"])
def test_cli_quantize_writes_a_loadable_checkpoint(bf16_dir, tmp_path, monkeypatch, fmt):
    loading = pytest.importorskip("dgemma.engine.loading")
    if fmt == "nf4":
        pytest.importorskip("bitsandbytes")
    if not (bf16_dir / "tokenizer.json").exists():
        pytest.skip("no bundled tokenizer to build a loadable checkpoint with")
    app, runner = _cli()
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", str(bf16_dir), str(out), "--format", fmt])
    assert res.exit_code == 0, res.output
    assert (out / "tokenizer.json").exists() and is_quantized_checkpoint(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # --dtype auto keeps the source's fp32
        assert f.get_slice("model.decoder.embed_tokens.weight").get_dtype() == "F32"
    expected = loading.load_model(str(bf16_dir), device="cpu", quantize=fmt).model
    for target in ("dgemma.quant.checkpoint.quantize_weight", "dgemma.quant.checkpoint.linear_to_nf4",
                   "dgemma.quant.apply.linear_to_nf4", "dgemma.quant.formats.quantize",
                   "dgemma.quant.modules.quantize", "bitsandbytes.functional.quantize_4bit"):
        monkeypatch.setattr(target, _refuse)
    loaded = loading.load_model(str(out), device="cpu").model
    experts = loaded.model.decoder.layers[1].experts
    assert isinstance(experts, QuantizedExperts) and experts.gate_up_q.fmt == fmt
    if fmt == "nf4":  # NF4 experts bring bitsandbytes NF4 dense layers (--dense auto)
        assert type(loaded.model.decoder.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    loaded.train(), expected.train()  # the same bitsandbytes code path on both sides
    torch.testing.assert_close(_logits(loaded), _logits(expected), rtol=1e-5, atol=1e-5)


def test_cli_quantize_dtype_and_errors(bf16_dir, tmp_path):
    app, runner = _cli()
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", str(bf16_dir), str(out), "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.decoder.embed_tokens.weight").get_dtype() == "BF16"
    for args, message in [
        (["--format", "int3"], "dgemma: --format"),
        (["--dtype", "fp8"], "dgemma: --dtype must be auto, bfloat16, float16, float32"),
    ]:
        res = runner.invoke(app, ["quantize", str(bf16_dir), str(tmp_path / "x"), *args])
        assert res.exit_code == 1 and message in res.output, res.output
    res = runner.invoke(app, ["quantize", str(bf16_dir), str(out)])
    assert res.exit_code == 1 and "exists and is not empty" in res.output
    a_file = tmp_path / "file.safetensors"
    a_file.write_text("")
    res = runner.invoke(app, ["quantize", str(bf16_dir), str(a_file)])
    assert res.exit_code == 1 and res.output.strip() == f"dgemma: {a_file} is a file; give a directory to write " \
        "the checkpoint to"


def test_daemon_loader_uses_the_quantized_path(bf16_dir, model, tmp_path):
    import shutil

    loading = pytest.importorskip("dgemma.engine.loading")
    if not (bf16_dir / "tokenizer.json").exists():
        pytest.skip("no bundled tokenizer to build a loadable checkpoint with")
    save_quantized(quantize_model(copy.deepcopy(model), "nvfp4"), tmp_path, "dgemma")
    for f in bf16_dir.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, tmp_path / f.name)
    loaded = loading.load_model(str(tmp_path), device="cpu", dtype="fp32")
    experts = loaded.model.model.decoder.layers[0].experts
    assert isinstance(experts, QuantizedExperts)
    assert loaded.model.model.encoder.language_model.layers[0].experts is experts
