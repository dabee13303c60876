"""Load a DiffusionGemma checkpoint for inference: offline, text only, on the chosen device.

The transformers class always builds a vision tower (167 M parameters even under a tiny text
config, and far more for the 26B model). We never need it for code, so the model is built on the
meta device, the vision modules are dropped, and only the text weights are materialized.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import (
    DiffusionGemmaTextRotaryEmbedding,
    DiffusionGemmaTextScaledWordEmbedding,
)

from dgemma.daemon.errors import DgemmaError

BUNDLED_MODEL_DIR = Path(__file__).parent / "bundled"
_VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


@dataclass
class LoadedModel:
    model: DiffusionGemmaForBlockDiffusion
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    name: str
    path: Path
    device: torch.device
    dtype: torch.dtype


def resolve_model_path(model: str | os.PathLike | None = None) -> Path:
    """Explicit argument > $DGEMMA_MODEL > the bundled model; a hub id is looked up offline."""
    spec = str(model) if model is not None else os.environ.get("DGEMMA_MODEL") or str(BUNDLED_MODEL_DIR)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DgemmaError("model_missing", f"Model directory {path} has no config.json: it is not a checkpoint.")
        return path
    if path.exists():
        raise DgemmaError("model_missing", f"Model path {path} is a file; give the checkpoint's directory.")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(spec, local_files_only=True))
        except Exception:
            pass
    raise DgemmaError(
        "model_missing",
        f"Model '{spec}' is not on this machine: download it where you have network "
        f"(`hf download {spec}`), copy the directory here and pass it with --model DIR or DGEMMA_MODEL.",
    )


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DgemmaError("invalid_params", f"Device '{device}' was asked for but this machine has no usable CUDA GPU.")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = dtype if isinstance(dtype, torch.dtype) else _DTYPES.get(str(dtype))
    if resolved is None:
        raise DgemmaError("invalid_params", f"Unknown dtype '{dtype}'; use one of bf16, fp16, fp32.")
    if device.type == "cpu" and resolved == torch.float16:
        raise DgemmaError("invalid_params", "fp16 is not supported on CPU; use fp32 or bf16.")
    return resolved


def build_empty_model(config: DiffusionGemmaConfig) -> DiffusionGemmaForBlockDiffusion:
    """The model on the meta device with the vision modules removed: no memory is allocated."""
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(config)
    model.model.encoder.vision_tower = None
    model.model.encoder.embed_vision = None
    return model.eval()


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DgemmaError("model_missing", f"No .safetensors weights in {path}.")
    return files


def materialize(model: DiffusionGemmaForBlockDiffusion, state: dict[str, torch.Tensor],
                device: torch.device, dtype: torch.dtype) -> DiffusionGemmaForBlockDiffusion:
    """Assign ``state`` onto a meta-built model, tie the shared encoder/decoder weights and rebuild
    the non-persistent buffers (rotary frequencies, embedding scale) that no checkpoint stores."""
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    text_config = model.config.text_config
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, DiffusionGemmaTextRotaryEmbedding):
                setattr(module, name, DiffusionGemmaTextRotaryEmbedding(text_config, device=device))
        if isinstance(module, DiffusionGemmaTextScaledWordEmbedding):
            module.embed_scale = torch.tensor(module.scalar_embed_scale, device=device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise DgemmaError("model_missing", f"Checkpoint is incomplete: {len(leftover)} tensors missing, e.g. {leftover[0]}.")
    return model


def load_model(model: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, quantize: str | None = None) -> LoadedModel:
    """Load a checkpoint directory (or an offline hub cache entry); see docs/engine.md."""
    path = resolve_model_path(model)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise DgemmaError("model_missing", f"Cannot read the model config in {path}: {exc}") from None
    if not isinstance(config, DiffusionGemmaConfig):
        raise DgemmaError("model_missing", f"{path} holds a '{config.model_type}' model, not DiffusionGemma.")
    empty = build_empty_model(config)

    # Hook: pre-quantized checkpoints (ModelOpt NVFP4, compressed-tensors, dgemma's own) and
    # on-the-fly quantization are handled by dgemma.quant.
    from dgemma.quant import checkpoint as quant_checkpoint

    try:
        quantized = quant_checkpoint.is_quantized_checkpoint(path)
        if quantized or quantize:
            loaded = quant_checkpoint.load_quantized_into(empty, path, dev, dt, quantize=quantize)
    except ValueError as exc:  # CheckpointError: unsupported format, missing or mis-shaped tensors
        raise DgemmaError("model_missing", f"Cannot load {path}: {exc}") from None
    if not (quantized or quantize):
        state = {}
        for file in _checkpoint_files(path):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.startswith(_VISION_PREFIXES):
                        continue
                    tensor = f.get_tensor(key)
                    state[key] = tensor.to(dev, dt) if tensor.is_floating_point() else tensor.to(dev)
        loaded = materialize(empty, state, dev, dt)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise DgemmaError("model_missing", f"Cannot load the tokenizer in {path}: {exc}") from None
    # The engine checks prompt length against the model's context itself, with a clearer error.
    tokenizer.model_max_length = 1 << 62
    name = path.name if path != BUNDLED_MODEL_DIR else "dgemma-bundled"
    return LoadedModel(model=loaded.eval(), tokenizer=tokenizer, name=name, path=path, device=dev, dtype=dt)
