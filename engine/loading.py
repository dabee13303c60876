"""Load a DiffusionGemma checkpoint for inference: offline, text only, on the chosen device.

The transformers class always builds a vision tower (167 M parameters even under a tiny text
config, and far more for the 26B model). We never need it for code, so the model is built on the
meta device, the vision modules are dropped, and only the text weights are materialized.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

import dgemma
from dgemma.engine.devices import DTYPE_NAMES, check_device, model_spec
from dgemma.errors import DgemmaError
from dgemma.quant import checkpoint as quant_checkpoint
from dgemma.quant.meta import meta_model

BUNDLED_MODEL_DIR = Path(dgemma.__file__).parent / "bundled"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# dgemma's own sampler defaults for a checkpoint (SamplerSettings keys, e.g. how rows are ranked),
# which transformers' DiffusionGemmaGenerationConfig would reject as unknown keys.
SAMPLER_FILE = "dgemma_sampler.json"


@dataclass
class LoadedModel:
    model: DiffusionGemmaForBlockDiffusion
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    name: str
    path: Path
    device: torch.device
    dtype: torch.dtype
    sampler: dict = field(default_factory=dict)  # SAMPLER_FILE's settings, over generation_config.json's


def resolve_model_path(model: str | os.PathLike | None = None) -> Path:
    """The checkpoint directory of ``model`` (devices.model_spec's precedence; None: the bundled
    model); a hub id is looked up offline."""
    spec = str(model_spec(None if model is None else str(model), None) or BUNDLED_MODEL_DIR)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DgemmaError("model_missing", f"Model directory {path} has no config.json: it is not a checkpoint.")
        return path
    if path.exists():
        raise DgemmaError("model_missing", f"Model path {path} is a file; give the checkpoint's directory.")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        cached = _hub_snapshot(spec)
        if cached is not None:
            return cached
    raise DgemmaError(
        "model_missing",
        f"Model '{spec}' is not on this machine: download it where you have network "
        f"(`hf download {spec}`), copy the directory here and pass it with --model DIR or DGEMMA_MODEL.",
    )


def _hub_snapshot(spec: str) -> Path | None:
    """The offline Hugging Face cache's snapshot of model ``spec``; None when the cache holds
    nothing of it (or ``spec`` is no model id). A model the cache holds only part of, or cannot
    read, is an error that says so, not "not on this machine"."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.file_download import repo_folder_name

    try:
        path = Path(snapshot_download(spec, local_files_only=True))
    except HFValidationError:
        return None  # not a model id: a directory that is not there
    except LocalEntryNotFoundError as exc:
        folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=spec, repo_type="model")
        if not folder.exists():
            return None
        raise DgemmaError("model_missing", f"Model '{spec}' is only partly in the Hugging Face cache ({folder}): "
                                           f"{exc} Download it again (`hf download {spec}`).") from None
    except (OSError, ValueError) as exc:  # in the cache but unreadable
        raise DgemmaError("model_missing", f"Model '{spec}' is in the Hugging Face cache but cannot be read: "
                                           f"{type(exc).__name__}: {exc}") from None
    if not (path / "config.json").is_file():
        raise DgemmaError("model_missing", f"Model '{spec}' is in the Hugging Face cache ({path}) but its download "
                                           f"is incomplete: there is no config.json. Download it again "
                                           f"(`hf download {spec}`).")
    return path


def pick_device(device: str | torch.device | None) -> torch.device:
    """The torch device to run on: `auto` (or None) picks CUDA when there is one. A device this
    torch cannot run a model on here (`meta`, a missing GPU or index) is refused up front, so a
    bad config fails at load time with a reason instead of on every request."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(str(device), "device")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DgemmaError("invalid_params", f"Device {str(device)!r:.60} is not a torch device.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DgemmaError("invalid_params", f"Device '{device}' was asked for but this machine has no usable CUDA GPU.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DgemmaError("invalid_params", f"Device '{device}' was asked for but this machine has "
                                            f"{torch.cuda.device_count()} CUDA GPU(s).")
    if dev.type in ("mps", "xpu"):
        backend = getattr(torch.backends, "mps", None) if dev.type == "mps" else getattr(torch, "xpu", None)
        if backend is None or not backend.is_available():
            raise DgemmaError("invalid_params", f"Device '{device}' was asked for but this torch cannot use it here.")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    name = DTYPE_NAMES.get(str(dtype))
    resolved = dtype if isinstance(dtype, torch.dtype) else getattr(torch, name) if name else None
    if resolved is None:
        raise DgemmaError("invalid_params", f"Unknown dtype '{dtype}'; use one of bf16, fp16, fp32.")
    if device.type == "cpu" and resolved == torch.float16:
        raise DgemmaError("invalid_params", "fp16 is not supported on CPU; use fp32 or bf16.")
    return resolved


def load_model(model: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, quantize: str | None = None,
               progress: bool = False) -> LoadedModel:
    """Load a checkpoint directory (or an offline hub cache entry); see docs/engine.md.
    ``progress`` draws progress bars on stderr while the weights load."""
    path = resolve_model_path(model)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # a broken config.json fails in any of transformers' config classes, any way
        raise DgemmaError("model_missing", f"Cannot read the model config in {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(config, DiffusionGemmaConfig):
        raise DgemmaError("model_missing", f"{path} holds a '{config.model_type}' model, not DiffusionGemma.")
    empty = meta_model(config).eval()

    # dgemma.quant materializes the meta model from any checkpoint: plain bf16/fp32 safetensors,
    # pre-quantized (ModelOpt NVFP4, compressed-tensors, dgemma's own), or bf16 quantized while it
    # streams in (`quantize=`). Vision weights in the files are never read.
    try:
        loaded = quant_checkpoint.load_quantized_into(empty, path, dev, dt, quantize=quantize, progress=progress)
    except ValueError as exc:  # CheckpointError: unsupported format, missing or mis-shaped tensors
        raise DgemmaError("model_missing", f"Cannot load {path}: {exc}") from None
    if (path / "generation_config.json").is_file():
        # The checkpoint's own sampler defaults (steps, temperatures, entropy bound) for the engine.
        loaded.generation_config = DiffusionGemmaGenerationConfig.from_pretrained(path, local_files_only=True)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise DgemmaError("model_missing", f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); "
                          "copy the tokenizer files next to the weights.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # the tokenizers library raises plain Exception for a file it cannot parse
        raise DgemmaError("model_missing", f"Cannot load the tokenizer in {path}: {type(exc).__name__}: {exc}") from None
    # The engine checks prompt length against the model's context itself, with a clearer error.
    tokenizer.model_max_length = 1 << 62
    name = path.name if path != BUNDLED_MODEL_DIR else "dgemma-bundled"
    return LoadedModel(model=loaded.eval(), tokenizer=tokenizer, name=name, path=path, device=dev, dtype=dt,
                       sampler=read_sampler_file(path))


def read_sampler_file(path: Path) -> dict:
    """The checkpoint's SAMPLER_FILE as a mapping ({} when there is none); the engine validates it."""
    file = path / SAMPLER_FILE
    if not file.is_file():
        return {}
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DgemmaError("model_missing", f"Cannot read {file}: {exc}") from None
    if not isinstance(values, dict):
        raise DgemmaError("model_missing", f"{file} must hold a JSON object of sampler settings.")
    return values
