"""Pre-quantized checkpoints written by the real tools load bit-exactly, and ours load in theirs.

Our own writer cannot check our readers: a misreading of a format (nibble order, which scale is
a reciprocal, scale dtype, tensor names of the 3-D experts) would be written and read back the
same way. Here the writers and the references are the real libraries, from the `test` extra:

* compressed-tensors (vLLM's checkpoint library): its NVFP4 compressor packs the weights and its
  decompressor is the reference;
* NVIDIA ModelOpt: `mtq.quantize` + `export_hf_checkpoint` on the CPU write the checkpoint, and
  ModelOpt's own NVFP4QTensor decodes it.

Each test is skipped when its library is not installed.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import typer
from safetensors import safe_open
from torch import nn
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts
from typer.testing import CliRunner

from dgemma.quant.apply import tied_groups
from dgemma.quant.checkpoint import load_quantized_into
from dgemma.cli.quant import register
from dgemma.quant.meta import meta_model
from dgemma.quant.modules import QuantizedExperts, QuantLinear
from tiny import build_tiny_checkpoint

IDS = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
CANVAS = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(1))
# Published checkpoints quantize bf16 weights; so do these.
DTYPE = torch.bfloat16


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny DiffusionGemma checkpoint (fp32, vision tower included, bundled tokenizer)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("src"), vocab_size=512, moe_intermediate_size=64)


@pytest.fixture(scope="module")
def model(src):
    """The tiny model as transformers loads it in bf16: what the real tools quantize, and the
    reference dgemma's loaded models must equal."""
    return DiffusionGemmaForBlockDiffusion.from_pretrained(src, dtype=DTYPE).eval()


def _logits(m):
    with torch.no_grad():
        return m(input_ids=IDS, decoder_input_ids=CANVAS).logits


def _load(path):
    config = DiffusionGemmaForBlockDiffusion.config_class.from_pretrained(path)
    return load_quantized_into(meta_model(config), path, "cpu", DTYPE).eval()


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _dequantized(model: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """Our fp32 dequantization of every 4-bit weight of a loaded model, under the per-Linear names
    the tools use (`<experts>.<e>.{gate,up,down}_proj`), restricted to `names`. Checks that every
    4-bit module we loaded is among them."""
    out, seen = {}, set()
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, QuantLinear):
            weights = {name: mod.qweight.weight.dequantize()}
        elif isinstance(mod, QuantizedExperts):
            gate_up, down, inter = mod.gate_up_q.weight, mod.down_q.weight, mod.intermediate_dim
            weights = {}
            for e in range(mod.num_experts):
                gu = gate_up[e].dequantize()
                weights.update({f"{name}.{e}.gate_proj": gu[:inter], f"{name}.{e}.up_proj": gu[inter:],
                                f"{name}.{e}.down_proj": down[e].dequantize()})
        else:
            continue
        kept = {k: v for k, v in weights.items() if k in names}
        if kept:
            seen.add(id(mod))
        out.update(kept)
    quantized = {id(m) for m in model.modules() if isinstance(m, (QuantLinear, QuantizedExperts))}
    assert seen == quantized, "a 4-bit module was loaded that the checkpoint does not name"
    return out


def _with_weights(base: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A plain transformers model: `base` with the named Linear weights (per-expert names fused back
    into the 3-D experts) replaced, so it runs the tool's own decoded weights. Its experts run the
    eager per-expert loop, the order of operations of dgemma's CPU path, so logits compare exactly."""
    ref = copy.deepcopy(base)
    ref.set_experts_implementation("eager")
    used = set()
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, DiffusionGemmaTextExperts):
                inter = mod.intermediate_dim
                for e in range(mod.num_experts):
                    parts = [f"{name}.{e}.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
                    if all(p in weights for p in parts):
                        mod.gate_up_proj[e, :inter] = weights[parts[0]]
                        mod.gate_up_proj[e, inter:] = weights[parts[1]]
                        mod.down_proj[e] = weights[parts[2]]
                        used.update(parts)
            elif type(mod) is nn.Linear and name in weights:
                mod.weight.copy_(weights[name])
                used.add(name)
    assert used == set(weights)
    return ref


class _LinearExperts(nn.Module):
    """llm-compressor's layout for DiffusionGemma's experts (CalibrationDiffusionGemma4TextExperts,
    like its Gemma-4 one): numbered children `<e>` with gate_proj / up_proj / down_proj Linears,
    which is how published compressed-tensors MoE checkpoints name them. Layout only: no forward."""

    def __init__(self, experts: DiffusionGemmaTextExperts) -> None:
        super().__init__()
        inter, hidden = experts.intermediate_dim, experts.hidden_dim
        for e in range(experts.num_experts):
            mlp = nn.Module()
            mlp.gate_proj = nn.Linear(hidden, inter, bias=False, dtype=experts.gate_up_proj.dtype)
            mlp.up_proj = nn.Linear(hidden, inter, bias=False, dtype=experts.gate_up_proj.dtype)
            mlp.down_proj = nn.Linear(inter, hidden, bias=False, dtype=experts.down_proj.dtype)
            with torch.no_grad():
                mlp.gate_proj.weight.copy_(experts.gate_up_proj[e, :inter])
                mlp.up_proj.weight.copy_(experts.gate_up_proj[e, inter:])
                mlp.down_proj.weight.copy_(experts.down_proj[e])
            self.add_module(str(e), mlp)


def _linearize_experts(model: nn.Module) -> None:
    done: dict[int, nn.Module] = {}
    for _, parent in list(model.named_modules(remove_duplicate=False)):
        for attr, child in list(parent.named_children()):
            if isinstance(child, DiffusionGemmaTextExperts):
                setattr(parent, attr, done.setdefault(id(child), _LinearExperts(child)))


# ------------------------------------------------------------------ compressed-tensors writes


@pytest.fixture(scope="module", params=["NVFP4A16", "NVFP4"])
def ct_dir(request, model, tmp_path_factory):
    """An NVFP4 checkpoint written the way llm-compressor writes one: experts linearized, the preset
    scheme (weight-only NVFP4A16, or NVFP4 with activation scales as most published ones) on every
    Linear but lm_head, router and vision tower, weight scales from compressed-tensors' own helpers
    (what llm-compressor's min-max observer calls), packed by compressed-tensors'
    NVFP4PackedCompressor (ModelCompressor.compress_model), saved by save_pretrained with the
    quantization config compressed-tensors writes (ModelCompressor.update_config). The activation
    scales stay at their initial value: no calibration data, and dgemma does not read them."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig, QuantizationScheme, apply_quantization_config,
    )
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    m = copy.deepcopy(model)
    _linearize_experts(m)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[request.param])},
        ignore=["lm_head", "re:.*router.*", "re:.*vision_tower.*", "re:.*embed_vision.*"],
    )
    apply_quantization_config(m, config, show_progress=False)
    with torch.no_grad():
        for mod in m.modules():
            scheme = getattr(mod, "quantization_scheme", None)
            if scheme is None:
                continue
            w = mod.weight.float()
            g = generate_gparam(w.min(), w.max())
            groups = w.unflatten(-1, (-1, scheme.weights.group_size))
            scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights, global_scale=g)
            mod.weight_global_scale.copy_(g)
            mod.weight_scale.copy_(scale)
    compressor = ModelCompressor.from_pretrained_model(m, "nvfp4-pack-quantized")
    compressor.compress_model(m)
    path = tmp_path_factory.mktemp("ct")
    m.save_pretrained(path)
    compressor.update_config(str(path))
    return path


def test_compressed_tensors_checkpoint_loads_bit_exactly(model, ct_dir):
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    qc = QuantizationConfig.model_validate(json.loads((ct_dir / "config.json").read_text())["quantization_config"])
    assert qc.format == "nvfp4-pack-quantized"
    scheme = qc.config_groups["group_0"]
    tensors = _tensors(ct_dir)
    quantized = {k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")}
    assert "model.decoder.layers.1.experts.3.up_proj" in quantized  # the published expert naming
    activations = any(k.endswith(".input_global_scale") for k in tensors)
    assert activations == (scheme.input_activations is not None)  # NVFP4 holds them; we ignore them

    loaded = _load(ct_dir)
    dec = loaded.model.decoder.layers[1]
    assert isinstance(dec.experts, QuantizedExperts) and isinstance(dec.self_attn.q_proj, QuantLinear)
    ours = _dequantized(loaded, quantized)
    assert set(ours) == quantized  # every 4-bit tensor of the file was read, the encoder's copies too

    decoded = {}
    for name in sorted(quantized):
        sd = {p: tensors[f"{name}.{p}"] for p in ("weight_packed", "weight_scale", "weight_global_scale")}
        ref = NVFP4PackedCompressor.decompress(sd, scheme)["weight"]  # what compressed-tensors serves
        assert ref.dtype == torch.bfloat16
        assert torch.equal(ours[name].to(ref.dtype), ref), name
        # In fp32: same codes and E4M3 block scales; compressed-tensors divides by its global scale
        # where we multiply by the reciprocal (as vLLM does), so only the last bit may differ.
        packed = sd["weight_packed"]
        codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
        ref32 = dequantize(codes, sd["weight_scale"].float(), args=scheme.weights,
                           global_scale=sd["weight_global_scale"], dtype=torch.float32)
        torch.testing.assert_close(ours[name], ref32, rtol=2.5e-7, atol=0, msg=name)
        decoded[name] = ref
    torch.testing.assert_close(_logits(loaded), _logits(_with_weights(model, decoded)), rtol=0, atol=0)


# ------------------------------------------------------------------ ModelOpt writes


@pytest.fixture(scope="module")
def modelopt_dir(model, tmp_path_factory):
    """An NVFP4 checkpoint written by NVIDIA ModelOpt itself, on the CPU: `mtq.quantize` with
    NVFP4_DEFAULT_CFG (weights and activations, as NVIDIA publishes), max calibration on one batch,
    then `export_hf_checkpoint`, which splits the fused 3-D experts into per-expert Linears and
    writes hf_quant_config.json."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.export import export_hf_checkpoint

    m = mtq.quantize(copy.deepcopy(model), mtq.NVFP4_DEFAULT_CFG, forward_loop=_logits)
    path = tmp_path_factory.mktemp("modelopt")
    export_hf_checkpoint(m, export_dir=str(path))
    return path


# Calibration on one batch never reaches the self-conditioning MLP's inputs; ModelOpt says so.
@pytest.mark.filterwarnings("ignore:.*amax entries of this TensorQuantizer are zero:UserWarning")
def test_modelopt_checkpoint_loads_bit_exactly(model, modelopt_dir):
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    hf = json.loads((modelopt_dir / "hf_quant_config.json").read_text())
    assert hf["producer"]["name"] == "modelopt" and hf["quantization"]["quant_algo"] == "NVFP4"
    tensors = _tensors(modelopt_dir)
    quantized = {k.removesuffix(".weight_scale_2") for k in tensors if k.endswith(".weight_scale_2")}
    assert "model.decoder.layers.1.experts.3.up_proj" in quantized  # ModelOpt's split of the 3-D experts

    loaded = _load(modelopt_dir)
    dec = loaded.model.decoder.layers[1]
    assert isinstance(dec.experts, QuantizedExperts) and isinstance(dec.self_attn.q_proj, QuantLinear)
    assert loaded.model.encoder.language_model.layers[1].experts is dec.experts
    ours = _dequantized(loaded, quantized)
    assert set(ours) == quantized

    decoded = {}
    for name in sorted(quantized):
        packed = tensors[f"{name}.weight"]
        assert packed.dtype == torch.uint8 and tensors[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn
        q = NVFP4QTensor(torch.Size((packed.shape[0], packed.shape[1] * 2)), torch.float32, packed)
        ref = q.dequantize(dtype=torch.float32, scale=tensors[f"{name}.weight_scale"],
                           double_scale=tensors[f"{name}.weight_scale_2"], block_sizes={-1: 16})
        assert torch.equal(ours[name], ref), name  # fp32, bit for bit (±0 aside)
        decoded[name] = ref.to(DTYPE)
    torch.testing.assert_close(_logits(loaded), _logits(_with_weights(model, decoded)), rtol=0, atol=0)


# ------------------------------------------------------------------ compressed-tensors reads ours


def _share_tied_modules(model: nn.Module) -> None:
    """One module object per tied encoder/decoder pair (a checkpoint holds a tied tensor once)."""
    for kind in ("linear", "experts"):
        for _, slots in list(tied_groups(model, kind)):
            first = getattr(slots[0][0], slots[0][1])
            for parent, attr, _ in slots[1:]:
                setattr(parent, attr, first)


def _cli_quantize(src, dst, *args):
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer in multi-command mode
    res = CliRunner().invoke(app, ["quantize", str(src), str(dst), *args])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("dense", ["none", "nvfp4"])
def test_dgemma_quantize_output_is_served_by_compressed_tensors(src, model, tmp_path, dense):
    """`dgemma quantize --layout compressed-tensors` through compressed-tensors' own loading path
    (transformers' CompressedTensorsHfQuantizer does the same): parse the quantization config,
    apply it to the model with the experts laid out as vLLM and llm-compressor lay them out,
    compress, load the checkpoint's tensors with no unexpected and no missing one (tied aliases
    aside), decompress. Its weights and logits equal dgemma's."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.base import decompress_module
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config
    from compressed_tensors.quantization.utils.helpers import is_module_quantized

    dst = tmp_path / "q"
    _cli_quantize(src, dst, "--layout", "compressed-tensors", "--dense", dense, "--dtype", "bfloat16")

    qc = QuantizationConfig.model_validate(json.loads((dst / "config.json").read_text())["quantization_config"])
    assert qc.quantization_status == QuantizationStatus.COMPRESSED and qc.format == "nvfp4-pack-quantized"
    tensors = _tensors(dst)
    assert any(".vision_tower." in k for k in tensors)  # carried through for the serving engine

    served = copy.deepcopy(model)
    _share_tied_modules(served)
    _linearize_experts(served)
    apply_quantization_config(served, qc, show_progress=False)
    compressor = ModelCompressor(quantization_config=qc)
    compressor.compress_model(served)
    missing, unexpected = served.load_state_dict(tensors, strict=False)
    assert not unexpected
    state = served.state_dict(keep_vars=True)
    loaded_ids = {id(state[k]) for k in tensors}
    assert all(id(state[k]) in loaded_ids for k in missing), [k for k in missing if id(state[k]) not in loaded_ids]
    quantized = {k.removesuffix(".weight_packed") for k in state if k.endswith(".weight_packed")}
    assert any(".experts.0.gate_proj" in n for n in quantized)
    assert any(".self_attn.q_proj" in n for n in quantized) == (dense == "nvfp4")
    for mod in served.modules():  # decompress_model, less its offloading set-up (which refuses
        if is_module_quantized(mod):  # a module shared by encoder and decoder)
            decompress_module(mod)

    ours = _load(dst)
    names = {n for n in quantized if f"{n}.weight_packed" in tensors}  # the decoder's, as written
    mine = _dequantized(ours, names)
    decoded = {n: served.get_submodule(n).weight.detach() for n in names}
    for n in names:
        assert torch.equal(mine[n].to(decoded[n].dtype), decoded[n]), n
    reference = _with_weights(model, decoded)
    reference.load_state_dict({k: v for k, v in tensors.items() if not k.endswith(
        ("weight_packed", "weight_scale", "weight_global_scale"))}, strict=False)
    torch.testing.assert_close(_logits(ours), _logits(reference), rtol=0, atol=0)


def test_dgemma_modelopt_layout_converts_with_compressed_tensors(src, tmp_path):
    """`dgemma quantize --layout modelopt` as the ModelOpt readers take it: compressed-tensors'
    ModelOpt converter (which mirrors vLLM's reading: both scales inverted) validates and converts
    it, and compressed-tensors decodes every weight to dgemma's values; hf_quant_config.json
    excludes exactly the Linears kept in high precision."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter
    from fnmatch import fnmatch

    dst = tmp_path / "q"
    _cli_quantize(src, dst, "--layout", "modelopt", "--dense", "none", "--dtype", "bfloat16")
    exclude = json.loads((dst / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    tensors = _tensors(dst)
    quantized = {k.removesuffix(".weight_scale_2") for k in tensors if k.endswith(".weight_scale_2")}
    dense = {k.removesuffix(".weight") for k, t in tensors.items()
             if k.endswith("proj.weight") and t.dim() == 2 and t.dtype != torch.uint8}
    assert dense and not any(fnmatch(n, p) for n in quantized for p in exclude)
    assert all(any(fnmatch(n, p) for p in exclude) for n in dense)

    converter = ModelOptNvfp4Converter(ignore=[f"re:{n}$" for n in dense], targets=["Linear"])
    converted = converter.validate(dict(tensors))
    scheme = converter._build_quant_config().config_groups["config_group_0"]
    mine = _dequantized(_load(dst), quantized)
    for name in quantized:
        sd = {p: converted[f"{name}.{p}"] for p in ("weight_packed", "weight_scale", "weight_global_scale")}
        assert sd["weight_global_scale"].dim() == 0  # ModelOpt's (and our) scalar weight_scale_2, inverted
        # compressed-tensors' own checkpoints hold it as [1]; a 0-d one would make its decompressor
        # divide in bf16 (0-d tensors do not promote), which is its quirk, not the checkpoint's.
        sd["weight_global_scale"] = sd["weight_global_scale"].reshape(1)
        ref = NVFP4PackedCompressor.decompress(sd, scheme)["weight"]
        assert torch.equal(mine[name].to(ref.dtype), ref), name
