"""4-bit weights for DiffusionGemma: NVFP4 / NF4 formats, quantized experts, checkpoints, memory plan.

Modules (each one job):
  formats     NVFP4 and NF4 rounding / quantize / pack in plain torch, producing the packed weight
              that dgemma.kernels.packed defines (QuantizedWeight, code tables, dequantize): the
              kernels compute on it and sit below this package
  modules     QuantizedExperts (drop-in for DiffusionGemmaTextExperts), QuantLinear
  apply       quantize_model: in-place quantization, tied encoder/decoder weights shared
  reader      safetensors access and checkpoint format detection
  layouts     tensor names of each checkpoint format (dgemma, ModelOpt, compressed-tensors)
  checkpoint  is_quantized_checkpoint / load_quantized_into (used by dgemma.engine.loading)
  writer      save_quantized
  meta        config loading and meta-device model construction
  plan        memory plan from a config
  cli         `dgemma quantize` and `dgemma plan`

Nothing heavy is imported here, so `dgemma.cli.quant` registers its commands cheaply.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "quantize_model": "dgemma.quant.apply",
    "is_quantized_checkpoint": "dgemma.quant.checkpoint",
    "load_quantized_into": "dgemma.quant.checkpoint",
    "save_quantized": "dgemma.quant.writer",
    "QuantizedExperts": "dgemma.quant.modules",
    "QuantLinear": "dgemma.quant.modules",
    "quantize": "dgemma.quant.formats",
    # The packed weight and its decoding are defined with the kernels (one definition, one layer down).
    "dequantize": "dgemma.kernels.packed",
    "QuantizedWeight": "dgemma.kernels.packed",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dgemma.quant' has no attribute {name!r}")
