"""Tensor naming of 4-bit weights in each checkpoint format, both directions.

* dgemma (ours): experts fused as in the model, `<experts>.gate_up_q.{packed,block_scale,global_scale}`
  and `<experts>.down_q.*`; NVFP4 dense layers `<linear>.qweight.*`; NF4 dense layers in
  bitsandbytes' own serialization (`<linear>.weight`, `<linear>.weight.absmax`, ...).
* ModelOpt NVFP4: `<linear>.weight` uint8, `.weight_scale` E4M3, `.weight_scale_2` fp32 (the
  dequant multiplier), `.input_scale` (activation scale; unused by our W4A16 kernels).
* compressed-tensors nvfp4-pack-quantized: `<linear>.weight_packed`, `.weight_scale` E4M3,
  `.weight_global_scale` = 1 / dequant multiplier (fp32 [1]).

Both packings put the first element of a pair in the low nibble. Both external tools write
DiffusionGemma's fused 3-D experts as one Linear per expert and projection
(`<experts>.<e>.{gate,up,down}_proj`): ModelOpt 0.47's `export_hf_checkpoint` splits them
so, and llm-compressor linearizes them so before compressed-tensors compresses them
(tests/test_quant_real_tools.py writes both with the real libraries). We fuse gate and up
back into gate_up, keeping each half's global scale as its own row segment so nothing is
re-quantized.
"""

from __future__ import annotations

import torch

from dgemma.kernels.packed import QuantizedWeight
from dgemma.quant.formats import stack_weights
from dgemma.quant.reader import COMPRESSED_TENSORS, DGEMMA, MODELOPT, CheckpointError, TensorStore

E4M3 = torch.float8_e4m3fn


def _nvfp4(packed: torch.Tensor, scales: torch.Tensor, global_mult: torch.Tensor) -> QuantizedWeight:
    return QuantizedWeight("nvfp4", packed.to(torch.uint8), scales.to(E4M3), global_mult.float().reshape(1))


# ---------------------------------------------------------------------------- read


def read_linear(store: TensorStore, fmt: str, name: str) -> QuantizedWeight | None:
    """A 4-bit NVFP4/NF4 weight stored for module `name`, or None if it is stored dense."""
    if fmt == DGEMMA and f"{name}.qweight.packed" in store:
        return read_packed(store, f"{name}.qweight")
    if fmt == MODELOPT and f"{name}.weight_scale" in store and f"{name}.weight_scale_2" in store:
        return _nvfp4(store.get(f"{name}.weight"), store.get(f"{name}.weight_scale"),
                      store.get(f"{name}.weight_scale_2"))
    if fmt == COMPRESSED_TENSORS and f"{name}.weight_packed" in store:
        return _nvfp4(store.get(f"{name}.weight_packed"), store.get(f"{name}.weight_scale"),
                      1.0 / store.get(f"{name}.weight_global_scale").float())
    return None


def read_packed(store: TensorStore, prefix: str) -> QuantizedWeight:
    scales = store.get(f"{prefix}.block_scale")
    fmt = "nvfp4" if scales.dtype == E4M3 else "nf4"
    return QuantizedWeight(fmt, store.get(f"{prefix}.packed"), scales, store.get(f"{prefix}.global_scale").float())


def has_bnb_nf4(store: TensorStore, name: str) -> bool:
    return f"{name}.weight.quant_state.bitsandbytes__nf4" in store


def bnb_state(store: TensorStore, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    prefix = f"{name}.weight."
    stats = {k[len(prefix):]: store.get(k) for k in store.keys() if k.startswith(prefix)}
    return store.get(f"{name}.weight"), stats


def read_experts(
    store: TensorStore, fmt: str, name: str, shapes: tuple[tuple[int, ...], tuple[int, ...]]
) -> tuple[QuantizedWeight, QuantizedWeight] | None:
    """(gate_up [E, 2I, H], down [E, H, I]) for the experts module `name`, or None if stored dense.

    `shapes` are the model's (gate_up_proj, down_proj) shapes."""
    num_experts = shapes[0][0]
    if fmt == DGEMMA:
        if f"{name}.gate_up_q.packed" not in store:
            return None
        return read_packed(store, f"{name}.gate_up_q"), read_packed(store, f"{name}.down_q")
    if fmt == MODELOPT and f"{name}.gate_up_proj_weight_scale" in store:
        return _read_fused_modelopt(store, name, shapes)
    if fmt not in (MODELOPT, COMPRESSED_TENSORS) or read_linear(store, fmt, f"{name}.0.gate_proj") is None:
        return None
    gate_up, down = [], []
    for e in range(num_experts):
        parts = [read_linear(store, fmt, f"{name}.{e}.{p}") for p in ("gate_proj", "up_proj", "down_proj")]
        if any(p is None for p in parts):
            raise CheckpointError(f"expert {e} of {name} is missing or not NVFP4 in the checkpoint")
        g, u, d = parts
        gate_up.append(QuantizedWeight(
            "nvfp4", torch.cat([g.packed, u.packed]), torch.cat([g.scales, u.scales]),
            torch.cat([g.global_scale, u.global_scale]),
        ))
        down.append(d)
    return stack_weights(gate_up), stack_weights(down)


def _read_fused_modelopt(
    store: TensorStore, name: str, shapes: tuple[tuple[int, ...], tuple[int, ...]]
) -> tuple[QuantizedWeight, QuantizedWeight]:
    """ModelOpt's export of fused 3-D experts: `<experts>.gate_up_proj` uint8 [E, 2I, H/2] with
    `_weight_scale` E4M3 [E, 2I, H/16] and `_weight_scale_2` per expert ([E], or [E, 2] for gate/up).
    Llama-4-style exports store [E, in/2, out]; transposing bytes keeps nibble pairs intact."""
    out = []
    for proj, (e, n, k) in zip(("gate_up_proj", "down_proj"), shapes):
        packed = store.get(f"{name}.{proj}")
        scales = store.get(f"{name}.{proj}_weight_scale")
        if tuple(packed.shape) == (e, k // 2, n):
            packed, scales = packed.transpose(-1, -2).contiguous(), scales.transpose(-1, -2).contiguous()
        if tuple(packed.shape) != (e, n, k // 2) or tuple(scales.shape) != (e, n, k // 16):
            raise CheckpointError(f"{name}.{proj}: packed {tuple(packed.shape)} / scales {tuple(scales.shape)} "
                                  f"do not hold an NVFP4 [{e}, {n}, {k}] weight")
        g = store.get(f"{name}.{proj}_weight_scale_2").float().reshape(-1)
        g = g.expand(e) if g.numel() == 1 else g
        if g.numel() % e:
            raise CheckpointError(f"{name}.{proj}_weight_scale_2 has {g.numel()} values for {e} experts")
        out.append(QuantizedWeight("nvfp4", packed.to(torch.uint8), scales.to(E4M3), g.reshape(e, -1).contiguous()))
    return out[0], out[1]


# ---------------------------------------------------------------------------- write


def write_packed(prefix: str, q: QuantizedWeight) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.packed": q.packed,
        f"{prefix}.block_scale": q.scales,
        f"{prefix}.global_scale": q.global_scale.float(),
    }


def write_linear(fmt: str, name: str, q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Tensors of one NVFP4 linear weight in the ModelOpt or compressed-tensors layout."""
    if q.fmt != "nvfp4" or q.global_scale.numel() != 1:
        raise CheckpointError(f"{name}: {fmt} stores NVFP4 weights with one global scale")
    g = q.global_scale.float().reshape(())
    if fmt == MODELOPT:
        return {
            f"{name}.weight": q.packed, f"{name}.weight_scale": q.scales,
            f"{name}.weight_scale_2": g, f"{name}.input_scale": torch.tensor(1.0),
        }
    # Weight-only (NVFP4A16) scheme: compressed-tensors expects exactly these three tensors and
    # reports any other (an activation scale) as an unexpected key.
    return {
        f"{name}.weight_packed": q.packed, f"{name}.weight_scale": q.scales,
        f"{name}.weight_global_scale": (1.0 / g).reshape(1),
    }


def write_experts(
    fmt: str, name: str, gate_up: QuantizedWeight, down: QuantizedWeight, fused: bool = False
) -> dict[str, torch.Tensor]:
    """Experts in `fmt`; `fused` writes ModelOpt's 3-D layout instead of one Linear per expert."""
    if fmt == DGEMMA:
        return {**write_packed(f"{name}.gate_up_q", gate_up), **write_packed(f"{name}.down_q", down)}
    if fused:
        if fmt != MODELOPT:
            raise CheckpointError("only the ModelOpt layout has fused 3-D experts")
        out = {}
        for proj, q in (("gate_up_proj", gate_up), ("down_proj", down)):
            g = q.global_scale.float()
            out.update({f"{name}.{proj}": q.packed, f"{name}.{proj}_weight_scale": q.scales,
                        f"{name}.{proj}_weight_scale_2": g.reshape(-1) if g.shape[-1] == 1 else g,
                        f"{name}.{proj}_input_scale": torch.ones(q.packed.shape[0])})
        return out
    out: dict[str, torch.Tensor] = {}
    inter = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        ge, de = gate_up[e], down[e]
        segs = ge.global_scale.numel()
        for half, proj in enumerate(("gate_proj", "up_proj")):
            rows = slice(half * inter, (half + 1) * inter)
            g = ge.global_scale[half if segs == 2 else 0].reshape(1)
            part = QuantizedWeight("nvfp4", ge.packed[rows], ge.scales[rows], g)
            out.update(write_linear(fmt, f"{name}.{e}.{proj}", part))
        out.update(write_linear(fmt, f"{name}.{e}.down_proj", de))
    return out
