"""Quantize a DiffusionGemma model in place: experts to 4-bit, optionally dense Linears.

The encoder and decoder layers share (tie) every weight. Modules are grouped by the
identity of their weight tensor, quantized once, and the same quantized module is set
on every layer that shared it, so memory is never doubled.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from dgemma.kernels.packed import FORMATS
from dgemma.quant.modules import QuantizedExperts, QuantLinear

# Dense Linears that stay in high precision: the router decides which experts run
# (tiny and sensitive), the tied embedding/lm_head is shared with the input side.
DENSE_SKIP = ("router", "lm_head", "embed", "vision")


def is_experts(module: nn.Module) -> bool:
    gu = getattr(module, "gate_up_proj", None)
    dp = getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(dp, torch.Tensor) and gu.dim() == 3 and dp.dim() == 3


def tied_groups(model: nn.Module, kind: str) -> Iterator[tuple[torch.Tensor, list[tuple[nn.Module, str, str]]]]:
    """Yield (weight, [(parent, attr, full_name), ...]) for experts or dense Linears, grouped by tie.

    kind: "experts" or "linear". full_names are model-relative module names; the first
    one is the decoder's (the name transformers writes in checkpoints).
    """
    groups: dict[int, tuple[torch.Tensor, list[tuple[nn.Module, str, str]]]] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent.named_children():
            name = f"{parent_name}.{attr}" if parent_name else attr
            if kind == "experts" and is_experts(child):
                weight = child.gate_up_proj
            elif kind == "linear" and type(child) is nn.Linear:
                weight = child.weight
            else:
                continue
            entry = groups.setdefault(id(weight), (weight, []))
            entry[1].append((parent, attr, name))
    for weight, slots in groups.values():
        slots.sort(key=lambda s: (".decoder." not in f".{s[2]}", s[2]))
        yield weight, slots


def dense_candidate(name: str) -> bool:
    if any(s in name for s in DENSE_SKIP):
        return False
    return ".layers." in f".{name}" or "self_conditioning" in name


def quantize_model(
    model: nn.Module,
    fmt: str = "nvfp4",
    dense: str | None = None,
    progress: bool = False,
) -> nn.Module:
    """Replace experts with QuantizedExperts (fmt) and, if `dense` is set, the layers' nn.Linear
    with 4-bit ones ("nf4": bitsandbytes Linear4bit, "nvfp4": QuantLinear). Returns the model."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if dense not in (None, *FORMATS):
        raise ValueError(f"unknown dense format {dense!r}")
    experts = list(tied_groups(model, "experts"))
    for _, slots in tqdm(experts, desc=f"experts -> {fmt}", disable=not progress):
        q = QuantizedExperts.from_experts(slots[0][0].get_submodule(slots[0][1]), fmt)
        for parent, attr, _ in slots:
            setattr(parent, attr, q)
    if experts:
        drop_expert_ties(model)
    if dense is not None:
        linears = [g for g in tied_groups(model, "linear") if dense_candidate(g[1][0][2])]
        for _, slots in tqdm(linears, desc=f"linear -> {dense}", disable=not progress):
            lin = getattr(slots[0][0], slots[0][1])
            q = linear_to_nf4(lin) if dense == "nf4" else QuantLinear.from_linear(lin, dense)
            for parent, attr, _ in slots:
                setattr(parent, attr, q)
    return model


def drop_expert_ties(model: nn.Module) -> None:
    """Forget transformers' encoder/decoder tie rules for the 3-D expert parameters.

    Those rules name `gate_up_proj` / `down_proj` tensors, which a quantized experts module
    no longer has, so a later `model.tie_weights()` would raise. The quantized module is
    already one object shared by both sides, which is what the tie was for."""
    for module in model.modules():
        keys = getattr(module, "_tied_weights_keys", None)
        if isinstance(keys, dict) and any(k.endswith(("gate_up_proj", "down_proj")) for k in keys):
            module._tied_weights_keys = {
                k: v for k, v in keys.items() if not k.endswith(("gate_up_proj", "down_proj"))
            }


def linear_to_nf4(linear: nn.Linear) -> nn.Module:
    """bitsandbytes NF4 Linear4bit from a dense Linear (quantized on its current device)."""
    import bitsandbytes as bnb

    w = linear.weight.detach()
    out = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=w.dtype, quant_type="nf4", device="meta",
    )
    out.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4").to(w.device)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return out
