"""Write a quantized model as a safetensors checkpoint: our layout, ModelOpt or compressed-tensors.

Tied tensors are written once under the decoder's name (what transformers writes), so a
26B-A4B checkpoint holds one copy of the shared encoder/decoder weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from dgemma.quant.layouts import write_experts, write_linear, write_packed
from dgemma.quant.modules import QuantizedExperts, QuantLinear
from dgemma.quant.reader import COMPRESSED_TENSORS, DGEMMA, MODELOPT, CheckpointError

LAYOUTS = (DGEMMA, MODELOPT, COMPRESSED_TENSORS)
# safetensors serializes a shard through an in-memory copy: small shards bound that peak.
SHARD_BYTES = 2 << 30


def _decoder_first(names: list[str]) -> str:
    return sorted(names, key=lambda n: (".decoder." not in f".{n}", n))[0]


def checkpoint_tensors(model: nn.Module, layout: str = DGEMMA, fused_experts: bool = False) -> dict[str, torch.Tensor]:
    """Name -> tensor for the whole model in `layout`, each shared tensor once."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    quant_names: dict[int, list[str]] = {}
    quant_mods: dict[int, nn.Module] = {}
    plain: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantizedExperts) or isinstance(module, QuantLinear) or _is_bnb(module):
            quant_names.setdefault(id(module), []).append(mod_name)
            quant_mods[id(module)] = module
            continue
        if any(mod_name.startswith(f"{q}.") for names in quant_names.values() for q in names):
            continue  # children of a quantized module were written with it
        for key, t in list(module._parameters.items()) + [
            (k, b) for k, b in module._buffers.items() if k not in module._non_persistent_buffers_set
        ]:
            if t is not None:
                plain.setdefault(id(t), (t, []))[1].append(f"{mod_name}.{key}" if mod_name else key)
    out: dict[str, torch.Tensor] = {}
    for key, module in quant_mods.items():
        name = _decoder_first(quant_names[key])
        if isinstance(module, QuantizedExperts):
            if layout != DGEMMA and module.gate_up_q.fmt != "nvfp4":
                raise CheckpointError(f"{layout} checkpoints hold NVFP4 experts, not {module.gate_up_q.fmt}")
            out.update(write_experts(layout, name, module.gate_up_q.weight, module.down_q.weight, fused_experts))
        elif isinstance(module, QuantLinear):
            q = module.qweight.weight
            out.update(write_packed(f"{name}.qweight", q) if layout == DGEMMA else write_linear(layout, name, q))
            if module.bias is not None:
                out[f"{name}.bias"] = module.bias
        else:
            if layout != DGEMMA:
                raise CheckpointError(f"{layout} checkpoints cannot hold bitsandbytes NF4 layers ({name})")
            for k, v in module.state_dict().items():
                out[f"{name}.{k}"] = v
    for t, names in plain.values():
        out[_decoder_first(names)] = t
    return {k: _owned(v.detach().cpu()) for k, v in out.items()}


def _owned(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses tensors sharing storage; only per-expert slices do, so copy just those.
    t = t.contiguous()
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def _is_bnb(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


_PRODUCER = {"name": "modelopt", "version": "dgemma-writer"}
# The vision tower and its embedder are never loaded by dgemma; a serving engine builds them, and
# they stay in high precision (copied through by `dgemma quantize` when the source has them).
VISION_MODULES = ("vision_tower", "embed_vision")


def dense_linear_names(model: nn.Module) -> list[str]:
    """Every name (encoder's and decoder's) of an nn.Linear the checkpoint keeps in high precision:
    router projections, lm_head, and the layers' Linears unless they were quantized."""
    return sorted({name for name, m in model.named_modules(remove_duplicate=False) if type(m) is nn.Linear})


def _quant_config(model: nn.Module, layout: str) -> dict:
    """quantization_config for config.json, in each tool's own shape.

    For ModelOpt and compressed-tensors the config targets every Linear, so each Linear left in
    high precision must be listed as ignored: a reader (compressed-tensors, vLLM) otherwise expects
    4-bit tensors for it. Names are listed one by one, as compressed-tensors itself writes them."""
    experts = {m.gate_up_q.fmt for m in model.modules() if isinstance(m, QuantizedExperts)}
    dense = {m.qweight.fmt for m in model.modules() if isinstance(m, QuantLinear)}
    dense |= {"nf4" for m in model.modules() if _is_bnb(m)}
    if layout == DGEMMA:
        return {"quant_method": DGEMMA, "experts": sorted(experts), "dense": sorted(dense)}
    kept = dense_linear_names(model)
    nvfp4 = {"num_bits": 4, "type": "float", "group_size": 16}
    if layout == MODELOPT:
        return {
            "quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "producer": _PRODUCER,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {**nvfp4, "dynamic": False},
                                          "input_activations": {**nvfp4, "dynamic": False}}},
            "ignore": kept + [f"*{v}*" for v in VISION_MODULES], "kv_cache_quant_algo": None,
        }
    return {
        "quant_method": COMPRESSED_TENSORS,
        "format": "nvfp4-pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**nvfp4, "strategy": "tensor_group", "symmetric": True, "dynamic": False,
                            "scale_dtype": "torch.float8_e4m3fn"},
                "input_activations": None,
                "output_activations": None,
                "format": "nvfp4-pack-quantized",
            }
        },
        "ignore": kept + [f"re:.*{v}.*" for v in VISION_MODULES],
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def save_quantized(
    model: nn.Module, dst: str | Path, layout: str = DGEMMA, shard_bytes: int = SHARD_BYTES,
    fused_experts: bool = False, progress: bool = False, extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write config.json (with quantization_config) and safetensors shards to `dst`.

    `fused_experts` (ModelOpt only) writes experts as 3-D tensors instead of one Linear each;
    `progress` shows the bytes written; `extra` tensors (the source's vision tower, which the
    model here does not hold) are written as they are."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(model, layout, fused_experts)
    clash = sorted(set(extra or {}) & set(tensors))
    if clash:
        raise CheckpointError(f"extra tensors would overwrite the model's own: {', '.join(clash[:5])}")
    tensors.update({k: _owned(v.detach().cpu()) for k, v in (extra or {}).items()})
    config = model.config.to_dict()
    config["quantization_config"] = _quant_config(model, layout)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if layout == MODELOPT:
        hf = {"producer": _PRODUCER,
              "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                               "exclude_modules": config["quantization_config"]["ignore"]}}
        (dst / "hf_quant_config.json").write_text(json.dumps(hf, indent=2) + "\n")
    _write_shards(tensors, dst, shard_bytes, progress)
    return dst


def _write_shards(tensors: dict[str, torch.Tensor], dst: Path, shard_bytes: int, progress: bool) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    with tqdm(total=total, desc="writing", unit="B", unit_scale=True, disable=not progress) as bar:
        for fname, shard in zip(names, shards):
            save_file(shard, str(dst / fname), metadata={"format": "pt"})
            bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: fname for fname, shard in zip(names, shards) for n in shard}}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
