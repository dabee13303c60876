"""`dgemma quantize` and `dgemma plan`, added to the main typer app by cli/main.py.

Failures print one line `dgemma: <message>` on stderr and exit 1, like every other
dgemma command. torch and transformers are imported inside the commands so that
registering them costs the rest of the command line nothing.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer

# Files besides weights that a checkpoint directory carries and a quantized copy needs.
_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
         "generation_config.json", "tokenizer.model")


def _fail(message: str) -> None:
    print(f"dgemma: {message}", file=sys.stderr)
    raise typer.Exit(1)


def quantize_cmd(
    src: Path = typer.Argument(..., help="bf16 checkpoint directory."),
    dst: Path = typer.Argument(..., help="Output directory (created; must be empty if it exists)."),
    format: str = typer.Option("nvfp4", "--format", help="Experts format: nvfp4 or nf4."),
    dense: str = typer.Option("auto", "--dense",
                              help="Dense Linears: none, nf4 (bitsandbytes) or nvfp4; auto = nf4 with "
                                   "--format nf4, none (bf16) with nvfp4."),
    layout: str = typer.Option("dgemma", "--layout",
                               help="Tensor layout: dgemma, modelopt or compressed-tensors (NVFP4 only)."),
    device: str = typer.Option("auto", "--device",
                               help="Where to quantize: auto (CUDA if present), cpu or cuda. A GPU needs ~18 GB."),
    dtype: str = typer.Option("auto", "--dtype",
                              help="Weights kept in high precision (embeddings, norms, router, dense Linears "
                                   "unless --dense): auto (as the source stores them), bfloat16, float16 or "
                                   "float32."),
) -> None:
    """Write a pre-quantized safetensors checkpoint that loads without re-quantizing."""
    import torch

    from dgemma.quant.checkpoint import load_quantized_into
    from dgemma.kernels.packed import FORMATS
    from dgemma.quant.meta import load_config, meta_model
    from dgemma.quant.reader import TensorStore, quant_format
    from dgemma.quant.writer import LAYOUTS, VISION_MODULES, save_quantized

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

    if format not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    dense_fmt = {"auto": "nf4" if format == "nf4" else None, "none": None}.get(dense, dense)
    if dense_fmt not in (None, *FORMATS):
        _fail(f"--dense must be auto, none, nf4 or nvfp4, not {dense!r}")
    if layout not in LAYOUTS:
        _fail(f"--layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    if dtype != "auto" and dtype not in dtypes:
        _fail(f"--dtype must be auto, {', '.join(dtypes)}, not {dtype!r}")
    if layout != "dgemma" and (format != "nvfp4" or dense_fmt == "nf4"):
        _fail(f"the {layout} layout holds NVFP4 weights only")
    if device.startswith("cuda") and not torch.cuda.is_available():
        _fail("--device cuda was asked for but this machine has no usable CUDA GPU")
    if not (src / "config.json").is_file():
        _fail(f"{src} is not a checkpoint directory (no config.json)")
    try:
        if quant_format(src) is not None:
            _fail(f"{src} is already quantized")
    except ValueError as exc:
        _fail(str(exc))
    if dst.exists() and not dst.is_dir():
        _fail(f"{dst} is a file; give a directory to write the checkpoint to")
    if dst.is_dir() and any(dst.iterdir()):
        _fail(f"{dst} exists and is not empty")
    try:
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        store = TensorStore(src)
        dt = store.floating_dtype() if dtype == "auto" else dtypes[dtype]
        model = meta_model(load_config(src))
        load_quantized_into(model, src, dev, dt, quantize=format, dense=dense_fmt, progress=True)
        # dgemma never loads the vision tower, but a serving engine (vLLM) builds it and wants its
        # weights: the external layouts carry them through, in high precision and excluded from the
        # quantization config.
        vision = {k: _cast(store.get(k), dt) for k in store.keys()
                  if layout != "dgemma" and any(f".{v}." in f".{k}" for v in VISION_MODULES)}
        save_quantized(model, dst, layout, progress=True, extra=vision)
    except (ValueError, OSError, RuntimeError) as exc:
        _fail(str(exc))
    for name in _COPY:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    print(f"wrote {dst} (experts {format}, dense {dense_fmt or str(dt).removeprefix('torch.')}, layout {layout})")


def _cast(t, dtype):
    return t.to(dtype) if t.is_floating_point() else t


def plan_cmd(
    model_or_config: str = typer.Argument(
        "diffusiongemma-26B-A4B",
        help="Model directory, config.json, or a shipped config name (diffusiongemma-26B-A4B).",
    ),
    vram: str = typer.Option("18GiB", "--vram",
                             help="GPU memory for the daemon's tensors, e.g. 18GiB or 24GB; the CUDA context "
                                  "is reported on top of it."),
    context: int = typer.Option(8192, "--context", help="Tokens of KV cache (prompt plus committed canvases)."),
    batch: int = typer.Option(1, "--batch", help="Canvas rows decoded together (candidate lengths)."),
    experts: str = typer.Option("nvfp4", "--experts", help="Experts storage: nvfp4, nf4 or bf16."),
    dense: str = typer.Option("bf16", "--dense", help="Dense Linears storage: bf16, nf4 or nvfp4."),
    prefill_chunk: Optional[int] = typer.Option(
        None, "--prefill-chunk", help="Prompt tokens per encoder pass (default: the engine's); 0 = the whole "
                                      "prompt in one pass."),
    cuda_context: str = typer.Option("512MiB", "--cuda-context",
                                     help="Reserve for the CUDA context (driver dependent), outside --vram."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Bytes of weights, KV cache and each pass's peak for a config, and whether they fit."""
    from dgemma.quant.meta import load_config
    from dgemma.engine.plan import PREFILL_CHUNK_TOKENS, format_plan, parse_bytes, plan

    choice = {"bf16": None, "nvfp4": "nvfp4", "nf4": "nf4"}
    if experts not in choice or dense not in choice:
        _fail("--experts and --dense take nvfp4, nf4 or bf16")
    try:
        result = plan(load_config(model_or_config), parse_bytes(vram), context, batch, choice[experts],
                      choice[dense], prefill_chunk=PREFILL_CHUNK_TOKENS if prefill_chunk is None else prefill_chunk,
                      cuda_context=parse_bytes(cuda_context))
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    print(json.dumps(result.to_dict(), indent=2) if as_json else format_plan(result))


def register(app: typer.Typer) -> None:
    """Add `quantize` and `plan` to the dgemma command line."""
    app.command("quantize")(quantize_cmd)
    app.command("plan")(plan_cmd)
