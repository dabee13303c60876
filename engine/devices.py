"""What to load, decided without importing torch (the config and the command line read these on
paths that must start fast): which model, and the device and dtype names it can be loaded with."""
from __future__ import annotations

import os

from dgemma.errors import DgemmaError


def model_spec(flag: str | None, configured: str | None) -> str | None:
    """The one precedence of a model: the command line's --model, then $DGEMMA_MODEL, then the
    config file's `model`; None means the bundled model."""
    return flag or os.environ.get("DGEMMA_MODEL") or configured or None

# Device types dgemma can run a model on (torch.device names). "meta" and the like hold no
# data: a model "loaded" there fails on every request. Whether this machine has the device is
# checked when the model loads (dgemma.engine.loading.pick_device), where torch is imported.
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def check_device(device: str, source: str = "device") -> str:
    """`device` when it names a device dgemma can run on (`auto`, `cpu`, `cuda`, `cuda:1`, `mps`,
    `xpu`); DgemmaError(invalid_params) naming `source` otherwise. No torch import."""
    kind, _, index = device.partition(":")
    if device == "auto" or (kind in DEVICE_TYPES and (not _ or index.isdigit() and index.isascii())):
        return device
    raise DgemmaError("invalid_params", f"{source}: {device!r:.60} is not a device dgemma can run on; use auto, "
                                        f"{', '.join(DEVICE_TYPES)}, or an indexed one such as cuda:1")


# Names, not torch dtypes: dgemma.engine.loading resolves them; dgemma.quant's formats are kept in
# step by a test.
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "fp32": "float32", "float32": "float32"}
