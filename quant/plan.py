"""Memory plan from a config alone: weights by component, KV cache, activations, fit.

Weights are counted exactly from the model built on the meta device (tied tensors once,
vision tower excluded), experts at their 4-bit storage size including scales. The KV
cache follows the config's per-layer heads and head dims, with sliding-window layers
capped at their window. Activations are an estimate of the largest live tensors of the
two passes that dominate (a canvas decode and a whole-prompt prefill); the terms are
listed in `activation_terms` so the estimate can be checked.

Not counted: the CUDA context and allocator fragmentation (driver dependent), and
attention score matrices, which fused attention (SDPA flash / memory-efficient) never
materializes.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from torch import nn
from transformers import DiffusionGemmaConfig

from dgemma.quant.formats import NF4_BLOCK, NVFP4_BLOCK
from dgemma.quant.meta import meta_model

GIB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
# Tokens per MoE kernel launch during prefill (kernels.triton_w4a16.MOE_CHUNK_TOKENS).
MOE_CHUNK = 1024


def parse_bytes(text: str) -> int:
    """'18GiB', '18 GB', '512MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size (examples: 18GiB, 24GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[unit])


def expert_bytes(numel: int, rows: int, experts: int, fmt: str | None) -> int:
    """Storage of a [experts, rows, K] expert weight with `numel` elements."""
    if fmt is None:
        return numel * 2
    if fmt == "nvfp4":
        return numel // 2 + numel // NVFP4_BLOCK + experts * 4
    return numel // 2 + numel // NF4_BLOCK * 4 + experts * 4


def nf4_linear_bytes(numel: int) -> int:
    # bitsandbytes with nested statistics: codes + 8-bit absmax per 64 + fp32 per 256 absmax.
    return numel // 2 + numel // 64 + numel // (64 * 256) * 4


@dataclass
class MemoryPlan:
    vram: int
    context: int
    canvas: int
    batch: int
    experts_format: str | None
    dense_format: str | None
    weights: dict[str, int]
    kv_cache: int
    kv_detail: dict[str, int]
    activations: int
    activation_terms: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        return self.weights_total + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.vram

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(weights_total=self.weights_total, total=self.total, fits=self.fits,
                 headroom=self.vram - self.total)
        return d


def _component(name: str) -> str:
    if ".experts." in name:
        return "experts"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings (tied lm_head)"
    if "self_conditioning" in name:
        return "self_conditioning"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "dense_mlp"
    if ".router." in name:
        return "router"
    return "norms_and_scalars"


def weight_bytes(model: nn.Module, experts_format: str | None, dense_format: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    seen: set[int] = set()
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if id(t) in seen or "vision" in name:
            continue
        seen.add(id(t))
        comp = _component(name)
        if comp == "experts":
            nbytes = expert_bytes(t.numel(), t.shape[-2], t.shape[0], experts_format)
        elif dense_format and t.dim() == 2 and comp in ("attention", "dense_mlp", "self_conditioning"):
            nbytes = nf4_linear_bytes(t.numel()) if dense_format == "nf4" else expert_bytes(t.numel(), 0, 1, "nvfp4")
        elif "inv_freq" in name or "embed_scale" in name:
            nbytes = t.numel() * 4  # small fp32 buffers
        else:
            nbytes = t.numel() * 2
        out[comp] = out.get(comp, 0) + nbytes
    return out


def kv_cache_bytes(config: DiffusionGemmaConfig, context: int, batch: int = 1) -> dict[str, int]:
    """bf16 keys + values per layer type; sliding layers hold at most `sliding_window` tokens."""
    tc = config.text_config
    out: dict[str, int] = {}
    for i, kind in enumerate(tc.layer_types):
        lc = tc.per_layer_config[i]
        tokens = min(context, tc.sliding_window) if kind == "sliding_attention" else context
        out[kind] = out.get(kind, 0) + 2 * batch * tokens * lc.num_key_value_heads * lc.head_dim * 2
    return out


def activation_terms(config: DiffusionGemmaConfig, context: int, batch: int) -> dict[str, dict[str, int]]:
    tc = config.text_config
    canvas = config.canvas_length or 256
    h, v, a = tc.hidden_size, tc.vocab_size, 2
    k, inter, dense = tc.top_k_experts or 0, tc.moe_intermediate_size or 0, tc.intermediate_size
    nq = tc.num_attention_heads
    layers = [tc.per_layer_config[i] for i in range(tc.num_hidden_layers)]
    hd = max(lc.head_dim for lc in layers)
    kv = max(lc.num_key_value_heads * lc.head_dim for lc in layers)
    rows = batch * canvas
    decode = {
        "hidden_states": 6 * rows * h * a,
        "attention_qkv_and_concat_cache": 2 * rows * nq * hd * a + 2 * batch * (context + canvas) * kv * a,
        "attention_masks": 2 * batch * canvas * (context + canvas),
        "moe": rows * k * (inter + h) * a + rows * h * 4,
        "dense_mlp": 3 * rows * dense * a,
        # lm_head output (bf16) + softcapped fp32 logits + fp32 softmax for sampling and for self-conditioning
        "logits": rows * v * (a + 3 * 4),
    }
    t = context
    prefill = {
        "hidden_states": 6 * t * h * a,
        "attention_qkv": 2 * t * nq * hd * a + 2 * t * kv * a,
        "attention_masks": 2 * t * t,
        "moe": min(t, MOE_CHUNK) * k * (inter + h) * a + t * h * 4,
        "dense_mlp": 3 * t * dense * a,
    }
    return {"canvas_decode": decode, "prompt_prefill": prefill}


def plan(
    config: DiffusionGemmaConfig,
    vram: int,
    context: int = 8192,
    batch: int = 1,
    experts_format: str | None = "nvfp4",
    dense_format: str | None = None,
) -> MemoryPlan:
    """Memory plan for serving `config` with `context` tokens of KV cache and `batch` canvas rows."""
    if context <= 0 or batch <= 0:
        raise ValueError("context and batch must be positive")
    model = meta_model(config)
    terms = activation_terms(config, context, batch)
    kv = kv_cache_bytes(config, context, batch=1)  # candidates of one request share the prompt's cache
    return MemoryPlan(
        vram=vram, context=context, canvas=config.canvas_length or 256, batch=batch,
        experts_format=experts_format, dense_format=dense_format,
        weights=weight_bytes(model, experts_format, dense_format),
        kv_cache=sum(kv.values()), kv_detail=kv,
        activations=max(sum(p.values()) for p in terms.values()), activation_terms=terms,
    )


def plan_for_checkpoint(path: str, vram: int = 0, context: int = 8192, batch: int = 1) -> MemoryPlan:
    """Plan for a checkpoint directory as it would be loaded (its own 4-bit formats, else bf16)."""
    import json
    from pathlib import Path

    from dgemma.quant.meta import load_config
    from dgemma.quant.reader import DGEMMA, quant_format

    fmt = quant_format(path)
    experts, dense = None, None
    if fmt == DGEMMA:
        qc = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
        experts = (qc.get("experts") or [None])[0]
        dense = (qc.get("dense") or [None])[0]
    elif fmt is not None:  # ModelOpt / compressed-tensors quantize every Linear of the layers
        experts, dense = "nvfp4", "nvfp4"
    return plan(load_config(path), vram, context, batch, experts, dense)


def format_plan(p: MemoryPlan) -> str:
    gib = lambda n: f"{n / GIB:8.2f} GiB"  # noqa: E731
    fmt = p.experts_format or "bf16"
    lines = [f"weights (experts {fmt}, dense {p.dense_format or 'bf16'}, vision tower excluded)"]
    for name, n in sorted(p.weights.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<28}{gib(n)}")
    lines.append(f"  {'total':<28}{gib(p.weights_total)}")
    lines.append(f"kv cache at {p.context} tokens (bf16)")
    for kind, n in p.kv_detail.items():
        lines.append(f"  {kind:<28}{gib(n)}")
    peak = max(p.activation_terms, key=lambda k: sum(p.activation_terms[k].values()))
    lines.append(f"activations (peak: {peak.replace('_', ' ')}, canvas {p.canvas} x {p.batch} rows)")
    for kind, terms in p.activation_terms.items():
        lines.append(f"  {kind:<28}{gib(sum(terms.values()))}")
    lines.append(f"total{'':<25}{gib(p.total)}  of {p.vram / GIB:.2f} GiB")
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"{verdict}: headroom {(p.vram - p.total) / GIB:.2f} GiB "
                 f"(CUDA context and allocator slack not included)")
    return "\n".join(lines)
