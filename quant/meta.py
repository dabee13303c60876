"""Build a DiffusionGemma on the meta device from a config, without the vision tower."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

BUILTIN_CONFIGS = {"diffusiongemma-26B-A4B": "diffusiongemma-26B-A4B-text.json"}


def load_config(model_or_config: str | Path) -> DiffusionGemmaConfig:
    """Config from a model directory, a config JSON file or a shipped config name
    (e.g. "diffusiongemma-26B-A4B"). Text-only configs are wrapped into a full one."""
    name = str(model_or_config)
    if name in BUILTIN_CONFIGS or name.removesuffix(".json") in {Path(v).stem for v in BUILTIN_CONFIGS.values()}:
        fname = BUILTIN_CONFIGS.get(name, name if name.endswith(".json") else f"{name}.json")
        text = resources.files("dgemma.quant").joinpath("configs", fname).read_text()
        return _from_dict(json.loads(text))
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config at {model_or_config} (give a model directory, a config.json "
                                f"or one of: {', '.join(BUILTIN_CONFIGS)})")
    return _from_dict(json.loads(path.read_text()))


def _from_dict(d: dict) -> DiffusionGemmaConfig:
    d = dict(d)
    d.pop("quantization_config", None)
    if d.get("model_type") == "diffusion_gemma_text" or "text_config" not in d:
        d = {"model_type": "diffusion_gemma", "text_config": d}
    return DiffusionGemmaConfig.from_dict(d)


def meta_model(config: DiffusionGemmaConfig) -> DiffusionGemmaForBlockDiffusion:
    """The model on the meta device (no memory), vision tower and its embedder removed:
    code completion never sends images, and the default tower is 167 M parameters."""
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(config)
    encoder = model.model.encoder
    encoder.vision_tower = None
    encoder.embed_vision = None
    return model


def with_meta_quantized_experts(model: DiffusionGemmaForBlockDiffusion, fmt: str = "nvfp4"
                                ) -> DiffusionGemmaForBlockDiffusion:
    """Swap every experts module of a meta model for a 4-bit QuantizedExperts of the same shape, still
    on meta (shape only, no memory), shared by encoder and decoder as quantize_model shares it. For
    counting what a forward dispatches at the real shape (tests/test_host_syncs.py, bench/engine.py)."""
    from dgemma.quant.apply import drop_expert_ties, tied_groups
    from dgemma.kernels.packed import QuantizedWeight, block_size
    from dgemma.quant.modules import QuantizedExperts

    def weight(shape: tuple[int, ...]) -> QuantizedWeight:
        *lead, rows, cols = shape
        with torch.device("meta"):
            scales = torch.empty(*lead, rows, cols // block_size(fmt),
                                 dtype=torch.float8_e4m3fn if fmt == "nvfp4" else torch.float32)
            return QuantizedWeight(fmt, torch.empty(*lead, rows, cols // 2, dtype=torch.uint8), scales,
                                   torch.empty(*lead, 1))

    for gate_up, slots in list(tied_groups(model, "experts")):
        module = getattr(slots[0][0], slots[0][1])
        q = QuantizedExperts(weight(tuple(gate_up.shape)), weight(tuple(module.down_proj.shape)), module.act_fn,
                             model.config.text_config.hidden_activation)
        for parent, attr, _ in slots:
            setattr(parent, attr, q)
    drop_expert_ties(model)
    return model
