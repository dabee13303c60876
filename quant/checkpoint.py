"""Materialize a meta-device DiffusionGemma from a checkpoint, keeping 4-bit weights 4-bit.

Reads our own format, NVIDIA ModelOpt NVFP4 and compressed-tensors nvfp4-pack-quantized;
with `quantize=` it also quantizes a bf16 checkpoint's experts while streaming it, so
the bf16 experts (~45 GB for 26B-A4B) never exist in memory all at once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from dgemma.kernels.packed import FORMATS
from dgemma.quant.apply import dense_candidate, drop_expert_ties, linear_to_nf4, tied_groups
from dgemma.quant.formats import quantize as quantize_weight, stack_weights
from dgemma.quant.layouts import bnb_state, has_bnb_nf4, read_experts, read_linear
from dgemma.quant.modules import Packed4bit, QuantizedExperts, QuantLinear
from dgemma.quant.reader import CheckpointError, TensorStore, quant_format

__all__ = ["is_quantized_checkpoint", "load_quantized_into", "materialize_meta", "CheckpointError"]


def is_quantized_checkpoint(path: str | Path) -> bool:
    """True for a directory holding a dgemma, ModelOpt NVFP4 or compressed-tensors NVFP4 checkpoint."""
    return quant_format(path) is not None


def load_quantized_into(
    model: nn.Module,
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    quantize: str | None = None,
    dense: str | None = "auto",
    progress: bool = False,
) -> nn.Module:
    """Fill `model` (built on the meta device, vision tower dropped) from the checkpoint at `path`.

    4-bit tensors in the checkpoint become QuantizedExperts / QuantLinear / bitsandbytes
    Linear4bit modules on `device`; everything else is loaded in `dtype`. For an
    unquantized checkpoint, `quantize` ("nvfp4" | "nf4") quantizes the experts while
    loading and `dense` ("nf4" | "nvfp4") the layers' Linears afterwards; "auto" means
    NF4 Linears with NF4 experts and bf16 Linears with NVFP4 experts.
    """
    if dense == "auto":
        dense = "nf4" if quantize == "nf4" else None
    if quantize not in (None, *FORMATS) or dense not in (None, *FORMATS):
        raise ValueError(f"quantize/dense must be one of {', '.join(FORMATS)} or None")
    fmt = quant_format(path)
    store = TensorStore(path)
    device = torch.device(device)
    with torch.no_grad():
        _load_experts(model, store, fmt, device, quantize, progress)
        _load_linears(model, store, fmt, device, dtype)
        materialize_meta(model, device, dtype)
        _load_dense_tensors(model, store, dtype, progress)
        if dense is not None and fmt is None:
            _quantize_linears(model, dense, progress)
    return model


# ---------------------------------------------------------------------------


def _first(store: TensorStore, names: list[str], suffix: str) -> str | None:
    return next((n for n in names if f"{n}{suffix}" in store), None)


def _load_experts(model, store, fmt, device, quantize, progress) -> None:
    groups = list(tied_groups(model, "experts"))
    for _, slots in tqdm(groups, desc="experts", disable=not progress):
        names = [s[2] for s in slots]
        experts = getattr(slots[0][0], slots[0][1])
        got = None
        for name in names if fmt else []:
            got = read_experts(store, fmt, name, (tuple(experts.gate_up_proj.shape), tuple(experts.down_proj.shape)))
            if got is not None:
                break
        if got is None and quantize is not None:
            name = _first(store, names, ".gate_up_proj")
            if name is None:
                raise CheckpointError(f"{names[0]}.gate_up_proj is missing from the checkpoint")
            got = tuple(
                stack_weights([quantize_weight(w[e], quantize) for e in range(w.shape[0])])
                for w in (store.get(f"{name}.{p}").to(device) for p in ("gate_up_proj", "down_proj"))
            )
        if got is None:
            continue  # stored dense: loaded with the other tensors
        gate_up, down = (q.to(device) for q in got)
        activation = getattr(getattr(experts, "config", None), "hidden_activation", "gelu_pytorch_tanh")
        q = QuantizedExperts(gate_up, down, experts.act_fn, activation)
        for parent, attr, _ in slots:
            setattr(parent, attr, q)
        drop_expert_ties(model)


def _load_linears(model, store, fmt, device, dtype) -> None:
    if fmt is None:
        return
    for _, slots in list(tied_groups(model, "linear")):
        lin = getattr(slots[0][0], slots[0][1])
        new = None
        for name in (s[2] for s in slots):
            qw = read_linear(store, fmt, name)
            if qw is not None:
                bias = store.get(f"{name}.bias") if lin.bias is not None else None
                new = QuantLinear(qw.to(device), bias.to(device) if bias is not None else None)
                break
            if has_bnb_nf4(store, name):
                new = _bnb_from_state(lin, *bnb_state(store, name), store, name, device, dtype)
                break
        if new is not None:
            for parent, attr, _ in slots:
                setattr(parent, attr, new)


def _bnb_from_state(lin: nn.Linear, data, stats, store, name, device, dtype) -> nn.Module:
    import bitsandbytes as bnb

    out = bnb.nn.Linear4bit(
        lin.in_features, lin.out_features, bias=lin.bias is not None,
        compute_dtype=dtype, quant_type="nf4", device="meta",
    )
    out.weight = bnb.nn.Params4bit.from_prequantized(
        data=data, quantized_stats=stats, requires_grad=False, device=device
    )
    if lin.bias is not None:
        out.bias = nn.Parameter(store.get(f"{name}.bias").to(device), requires_grad=False)
    return out


def materialize_meta(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Allocate every tensor still on meta (tied tensors stay tied), then compute the
    non-persistent buffers (rotary frequencies, embedding scale) that no checkpoint holds.

    Those buffers keep the dtype the model was built with (fp32), as from_pretrained keeps them:
    rotary frequencies rounded to bf16 are off by up to 0.4%, which turns into whole radians of
    phase error a few thousand positions in. Only the embedding scale follows `dtype`."""
    new: dict[int, torch.Tensor] = {}
    needs_init: list[nn.Module] = []
    for module in model.modules():
        for store_name in ("_parameters", "_buffers"):
            tensors = getattr(module, store_name)
            for key, t in list(tensors.items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) not in new:
                    computed = store_name == "_buffers" and key in module._non_persistent_buffers_set
                    dt = dtype if t.is_floating_point() and not computed else t.dtype
                    fresh = torch.empty(t.shape, dtype=dt, device=device)
                    new[id(t)] = nn.Parameter(fresh, requires_grad=False) if store_name == "_parameters" else fresh
                tensors[key] = new[id(t)]
                if store_name == "_buffers" and key in module._non_persistent_buffers_set:
                    needs_init.append(module)
    init = getattr(model, "_init_weights", None)
    for module in dict.fromkeys(needs_init):
        if init is None:
            raise CheckpointError(f"cannot initialize buffers of {type(module).__name__}")
        init(module)
        # _init_weights computes in fp32; keep the buffers in the model's dtype like from_pretrained.
        for key, b in module._buffers.items():
            if b is not None and b.is_floating_point() and key.endswith("embed_scale"):
                module._buffers[key] = b.to(dtype)


def _load_dense_tensors(model: nn.Module, store: TensorStore, dtype: torch.dtype, progress: bool = False) -> None:
    slots: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (QuantizedExperts, QuantLinear, Packed4bit)) or type(module).__name__ == "Linear4bit":
            continue  # already filled from their 4-bit tensors
        persistent = [
            (k, t) for k, t in module._parameters.items()
        ] + [(k, t) for k, t in module._buffers.items() if k not in module._non_persistent_buffers_set]
        for key, t in persistent:
            if t is None:
                continue
            full = f"{mod_name}.{key}" if mod_name else key
            slots.setdefault(id(t), (t, []))[1].append(full)
    missing = []
    for t, names in tqdm(list(slots.values()), desc="dense tensors", disable=not progress):
        names.sort(key=lambda n: (".decoder." not in f".{n}", n))
        name = next((n for n in names if n in store), None)
        if name is None:
            missing.append(names[0])
            continue
        src = store.get(name)
        if src.shape != t.shape:
            raise CheckpointError(f"{name}: checkpoint shape {tuple(src.shape)} != model {tuple(t.shape)}")
        t.copy_(src.to(t.dtype))
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors the model needs: {shown}")


def _quantize_linears(model: nn.Module, dense: str, progress: bool = False) -> None:
    groups = [g for g in tied_groups(model, "linear") if dense_candidate(g[1][0][2])]
    for _, slots in tqdm(groups, desc=f"linear -> {dense}", disable=not progress):
        lin = getattr(slots[0][0], slots[0][1])
        q = linear_to_nf4(lin) if dense == "nf4" else QuantLinear.from_linear(lin, dense)
        for parent, attr, _ in slots:
            setattr(parent, attr, q)
