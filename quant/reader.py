"""Read safetensors checkpoints (single file or sharded) lazily, and detect their 4-bit format."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

DGEMMA = "dgemma"
MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"
_FLOAT_TAGS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def quant_format(path: str | Path) -> str | None:
    """"dgemma", "modelopt", "compressed-tensors" or None for an unquantized checkpoint."""
    root = Path(path)
    if not root.is_dir():
        return None
    qc = _read_json(root / "config.json").get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower()
    if method == DGEMMA:
        return DGEMMA
    if method == COMPRESSED_TENSORS:
        fmt = str(qc.get("format", ""))
        if "nvfp4" not in fmt:
            raise CheckpointError(f"compressed-tensors format {fmt!r} is not supported (only nvfp4-pack-quantized)")
        return COMPRESSED_TENSORS
    hf_quant = _read_json(root / "hf_quant_config.json")
    if method == MODELOPT or hf_quant:
        algo = str((hf_quant.get("quantization") or qc).get("quant_algo", "NVFP4")).upper()
        if algo != "NVFP4":
            raise CheckpointError(f"ModelOpt quant_algo {algo!r} is not supported (only NVFP4)")
        return MODELOPT
    return None


class TensorStore:
    """Name -> tensor access over the checkpoint's safetensors files, opened lazily."""

    def __init__(self, path: str | Path) -> None:
        root = Path(path)
        files = sorted(root.glob("*.safetensors")) if root.is_dir() else [root]
        if not files:
            raise CheckpointError(f"no .safetensors files in {root}")
        self._where: dict[str, Path] = {}
        index = root / "model.safetensors.index.json" if root.is_dir() else None
        if index is not None and index.exists():
            for name, fname in _read_json(index).get("weight_map", {}).items():
                self._where[name] = root / fname
        else:
            for f in files:
                with safe_open(str(f), "pt") as h:
                    for name in h.keys():
                        self._where[name] = f
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def _handle(self, name: str):
        f = self._where[name]
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), "pt")
        return self._handles[f]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def floating_dtype(self) -> torch.dtype:
        """The dtype that holds most of the checkpoint's floating-point elements (headers only)."""
        elements: Counter[str] = Counter()
        for name in self._where:
            info = self._handle(name).get_slice(name)
            if info.get_dtype() in _FLOAT_TAGS:
                elements[info.get_dtype()] += math.prod(info.get_shape())
        if not elements:
            raise CheckpointError("the checkpoint holds no bf16, fp16 or fp32 tensors")
        return _FLOAT_TAGS[elements.most_common(1)[0][0]]
