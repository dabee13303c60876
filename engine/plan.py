"""Memory plan from a config alone: weights by component, KV cache, the peak of each pass, fit.

Weights are counted exactly from the model built on the meta device (tied tensors once, vision
tower excluded), experts at their 4-bit storage size including scales. Everything else is what
the daemon holds besides the weights at the peak of its two passes, term by term in `passes`:

* canvas decode, one denoising step of `dgemma.engine.denoise` (sampling in `dgemma.engine.sampler`) (bf16 model): across the step the
  loop holds one fp32 logits tensor (canvas x vocabulary; the previous step's while the model runs)
  and the self-conditioning logits in bf16; on top comes the largest transient, which at a 262k
  vocabulary is transformers' softcap (`logits / cap`, `tanh`, `* cap`, each a new fp32 tensor, so
  two exist at once) or, as large, the fp32 softmax of the self-conditioning logits. The sampler and
  the canvas's final log-probabilities (`sampler.token_logprobs`) work a chunk of positions at a
  time. Checked against the CPU allocator's record of real steps in tests/test_quant_plan.py, on the
  dynamic cache and through the static step. One request with one alternative: each further
  alternative continued past its first canvas copies the KV cache.
* prompt prefill, the last chunk of `prefill_chunk` prompt tokens: attention over the whole context
  with the key/value heads repeated to the query heads (transformers does that whenever a mask is
  passed or the head dimension is over 256) and the masks, or the feed-forward block, whichever is
  larger. An estimate: attention kernels differ by device and none is measured here.

The KV cache follows the per-layer heads and head dims. transformers keeps a sliding-window layer's
last `window - 1` tokens as a view into the keys of its last encoder pass, so such a layer really
holds `window - 1` plus that pass's tokens: a canvas commit (decode) or a prefill chunk.

With the static decoder step (engine/static_step.py; on a GPU unless `DGEMMA_GRAPHS=0`, which the
plan reads as the engine does) come its buffers, which hold for good (`static_step_terms`): the KV
buffers at the step's capacity (`static_capacity`: `PLANNED_CONTEXT`, or the model's context if
smaller) with their masks, the inputs of the row bucket the engine uses, and the pool of the captured
CUDA graphs. The buffers are the prefix's only copy: the engine's cache is a `BufferCache` over them,
into which the encoder writes its passes, so there is no "kv cache" term beside them while the context
fits the capacity (beyond it the engine decodes on the dynamic cache, and both count). The pool is an
estimate until measured on a GPU (bench/gpu_real_shape.py measures it there): the largest live set
inside the step at the bucket's rows (the softcap's two fp32 logits, the self-conditioning softmax or
a decoder layer), which the graph keeps reserved between replays and the buckets' graphs share.
Outside the graph the step's logits are a clone (fp32, the step's rows). All of it counts in both
passes, since it stays allocated while the encoder runs.

Outside `total`, and stated in the output: the CUDA context (`cuda_context`, a driver-dependent
reserve; `--vram` is what the daemon's tensors may use, i.e. what a GPU has free once a context
exists, as `torch.cuda.mem_get_info` and `dgemma doctor` see it), allocator fragmentation, and the
prefix cache, whose entries live in host memory (`prefix_cache_host`). Its most recent entry also
stays on the GPU when the headroom, less `FRAGMENTATION_RESERVE`, holds it (`prefix_cache_device`,
`resident_prefix_budget`): that budget comes out of the headroom, so it is not in `total` either.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import DiffusionGemmaConfig

from dgemma.engine import sampler
from dgemma.engine.prefix_cache import default_budget
from dgemma.engine.static_step import BUCKETS, bucket, static_mode
from dgemma.kernels.moe_align import MOE_CHUNK_TOKENS
from dgemma.quant.formats import NF4_BLOCK, NVFP4_BLOCK
from dgemma.quant.meta import meta_model

GIB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
# What a CUDA context with PyTorch's kernels and cuBLAS workspace typically takes on a recent GPU
# (driver and CUDA version dependent; not measurable without one).
CUDA_CONTEXT_BYTES = 512 << 20
# Prompt tokens per encoder pass that the plan assumes of the engine. At most the 26B's sliding
# window (1024), so a sliding layer's cache never holds more than two windows of keys.
PREFILL_CHUNK_TOKENS = 1024
# The context the plan assumes by default, and so the KV capacity of the engine's static decoder
# step: a longer prefix decodes on the dynamic cache, which no plan at this context counts.
PLANNED_CONTEXT = 8192
# Headroom kept free for allocator fragmentation before any is lent to a resident prefix-cache entry.
FRAGMENTATION_RESERVE = 512 << 20
# What the printed plan says of the graph pool.
POOL_NOTE = "graph pool: an estimate until measured on a GPU (bench/gpu_real_shape.py measures it)"
BF16 = 2
FP32 = 4


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
    prefill_chunk: int
    experts_format: str | None
    dense_format: str | None
    weights: dict[str, int]
    kv_detail: dict[str, int]  # while decoding, by layer type (with graphs: the static step's buffers)
    passes: dict[str, dict[str, int]]  # bytes besides the weights at each pass's peak, KV cache included
    cuda_context: int
    prefix_cache_host: int
    graphs: bool  # the static decoder step with CUDA graphs (its buffers and pool are in `passes`)
    static_capacity: int = 0  # with graphs: the KV capacity of the step's buffers, which hold the prefix

    @property
    def prefix_cache_device(self) -> int:
        """What the headroom, less the fragmentation reserve, lends the resident prefix entry."""
        return max(0, self.vram - self.total - FRAGMENTATION_RESERVE)

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def kv_cache(self) -> int:
        return sum(self.kv_detail.values())

    @property
    def peak_pass(self) -> str:
        return max(self.passes, key=lambda k: sum(self.passes[k].values()))

    @property
    def total(self) -> int:
        """GPU memory the daemon's tensors need at their peak (the CUDA context comes on top)."""
        return self.weights_total + sum(self.passes[self.peak_pass].values())

    @property
    def gpu_total(self) -> int:
        return self.total + self.cuda_context

    @property
    def fits(self) -> bool:
        return self.total <= self.vram

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(weights_total=self.weights_total, kv_cache=self.kv_cache, peak_pass=self.peak_pass,
                 total=self.total, gpu_total=self.gpu_total, fits=self.fits, headroom=self.vram - self.total,
                 prefix_cache_device=self.prefix_cache_device)
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


def _cached_tokens(config: DiffusionGemmaConfig, kind: str, context: int, last_pass: int) -> int:
    """Tokens a layer's cache holds: sliding layers keep `window - 1` as a view into their last pass."""
    if kind != "sliding_attention":
        return context
    return min(context, config.text_config.sliding_window - 1 + last_pass)


def kv_cache_bytes(config: DiffusionGemmaConfig, context: int, batch: int = 1, last_pass: int = 0) -> dict[str, int]:
    """bf16 keys + values per layer type after `context` tokens, the last `last_pass` of them encoded
    in one encoder pass (their keys stay alive behind the sliding layers' window views)."""
    tc = config.text_config
    out: dict[str, int] = {}
    for i, kind in enumerate(tc.layer_types):
        lc = tc.per_layer_config[i]
        tokens = _cached_tokens(config, kind, context, last_pass)
        out[kind] = out.get(kind, 0) + 2 * batch * tokens * lc.num_key_value_heads * lc.head_dim * BF16
    return out


def _layer_peak(config: DiffusionGemmaConfig, batch: int, queries: int, context: int) -> int:
    """Largest live set inside one layer for `queries` tokens per row attending to `context` cached
    tokens (a sliding layer sees its window's) plus themselves. The residual stream and the masks
    live through the whole pass, the attention and feed-forward temporaries one after the other."""
    tc = config.text_config
    h, rows = tc.hidden_size, batch * queries
    heads = tc.num_attention_heads
    attention, masks, seen = 0, 0, set()
    for i, kind in enumerate(tc.layer_types):
        lc = tc.per_layer_config[i]
        keys = _cached_tokens(config, kind, context, 0) + queries
        attention = max(attention, (
            3 * rows * heads * lc.head_dim * BF16  # queries, normed/rotated queries, attention output
            + 2 * batch * keys * lc.num_key_value_heads * lc.head_dim * BF16  # cache + new keys/values
            + 2 * batch * keys * heads * lc.head_dim * BF16  # ... repeated to the query heads
            + rows * keys * BF16  # SDPA's additive copy of the boolean mask
        ))
        if kind not in seen:
            seen.add(kind)
            masks += rows * keys  # one boolean mask per layer type
    k, inter = tc.top_k_experts or 0, tc.moe_intermediate_size or 0
    moe = min(rows, MOE_CHUNK_TOKENS) * k * (inter + h) * BF16 + rows * h * FP32
    feed_forward = moe + 3 * rows * tc.intermediate_size * BF16
    return 6 * rows * h * BF16 + masks + max(attention, feed_forward)


def static_capacity(config: DiffusionGemmaConfig) -> int:
    """The static decoder step's KV capacity, as the engine makes it: a longer prefix decodes on the
    dynamic cache."""
    return min(config.text_config.max_position_embeddings, PLANNED_CONTEXT)


def _step_transients(config: DiffusionGemmaConfig, context: int, batch: int) -> dict[str, int]:
    """The largest temporaries of one decoder forward for `batch` canvas rows."""
    tc = config.text_config
    canvas = config.canvas_length or 256
    rows = batch * canvas
    logits = rows * tc.vocab_size * FP32
    return {
        "softcap, 2 fp32 logits": 2 * logits + rows * tc.hidden_size * BF16,
        # softmax(dtype=float32) of the bf16 logits: an fp32 copy, then the softmax itself.
        "self-conditioning softmax": 2 * logits,
        "decoder layer": _layer_peak(config, batch, canvas, context),
    }


def static_step_terms(config: DiffusionGemmaConfig, batch: int = 1) -> dict[str, int]:
    """What the static decoder step with CUDA graphs holds for good (see the module docstring): its
    buffers at `static_capacity`, whatever the context, since the engine makes them so."""
    tc = config.text_config
    canvas = config.canvas_length or 256
    capacity = static_capacity(config)
    size = bucket(min(batch, BUCKETS[-1]))
    # The step attends to every slot of its buffers (the masks hide the empty ones).
    transients = _step_transients(config, capacity, size)
    held = {kind: min(capacity, tc.sliding_window - 1) if kind == "sliding_attention" else capacity
            for kind in set(tc.layer_types)}
    masks = sum(canvas * (slots + canvas) for slots in held.values())  # one boolean mask per kind
    return {
        "static step: kv buffers": sum(kv_cache_bytes(config, capacity).values()) + masks,
        f"static step: inputs (bucket {size})": size * canvas * (tc.vocab_size * BF16 + 8 + 1),
        "static step: graph pool (estimate)": max(transients.values()),
    }


def pass_terms(config: DiffusionGemmaConfig, context: int, batch: int = 1,
               prefill_chunk: int = PREFILL_CHUNK_TOKENS, graphs: bool = False) -> dict[str, dict[str, int]]:
    """Bytes besides the weights at the peak of a canvas decode and of a prompt prefill, by term;
    `graphs`: with the static decoder step and its CUDA graphs."""
    tc = config.text_config
    canvas = config.canvas_length or 256
    rows, vocab = batch * canvas, tc.vocab_size
    logits = rows * vocab * FP32
    # The sampler works on SAMPLE_CHUNK_BYTES of positions x vocabulary at a time; it holds four such
    # temporaries at once: gathered rows, softmax, log-softmax and their product. The final
    # log-probabilities (sampler.token_logprobs) take the same chunks, two at once.
    chunk_rows = min(rows, sampler.chunk_positions(vocab))
    # With graphs the prefix lives in the static step's buffers while it fits them, and the
    # forward's temporaries are in the graph's pool (static_step_terms); beyond the capacity the
    # engine decodes on the dynamic cache, beside the buffers it keeps.
    in_step = graphs and context <= static_capacity(config)
    transients = {} if in_step else _step_transients(config, context, batch)
    transients.update({
        "sampler, 4 fp32 chunks": 4 * chunk_rows * vocab * FP32,
        "next self-conditioning logits (bf16)": rows * vocab * BF16,
        "final log-probs, 2 fp32 chunks": 2 * chunk_rows * vocab * FP32,
    })
    # A step's fp32 logits (with graphs, their clone) live from its forward's end to its own end
    # (denoise_step), so they sit beside the sampler's temporaries and the bf16 copy the step hands
    # the next one, but not beside the next forward's, nor the final log-probs.
    held = {name: logits if name.startswith(("sampler", "next")) else 0 for name in transients}
    largest = max(transients, key=lambda name: held[name] + transients[name])
    static = static_step_terms(config, batch) if graphs else {}
    kv = {} if in_step else {"kv cache": sum(kv_cache_bytes(config, context, last_pass=canvas).values())}
    decode = {
        **kv,
        **static,
        # The canvas rows of one request read one cache through an expanded view (no copy).
        **({"logits (fp32, this step's)": logits} if held[largest] else {}),
        "self-conditioning logits (bf16)": rows * vocab * BF16,
        f"transient: {largest}": transients[largest],
    }
    chunk = min(prefill_chunk or context, context)
    prefill = {
        # Into the static step's buffers a sliding layer keeps its window, not a view of the pass;
        # the pass's own keys are the layer's (below).
        **({} if in_step else {"kv cache": sum(kv_cache_bytes(config, context, last_pass=chunk).values())}),
        **static,
        f"largest layer for {chunk} tokens": _layer_peak(config, 1, chunk, context - chunk),
    }
    return {"canvas_decode": decode, "prompt_prefill": prefill}


def headroom(config: DiffusionGemmaConfig, free: int, batch: int = 1, graphs: bool = False) -> int:
    """What the peak pass at `PLANNED_CONTEXT` leaves of `free` bytes (the GPU's, once the weights are
    loaded), less `FRAGMENTATION_RESERVE`; negative when that pass may not fit."""
    passes = pass_terms(config, PLANNED_CONTEXT, batch, graphs=graphs)
    return free - max(sum(terms.values()) for terms in passes.values()) - FRAGMENTATION_RESERVE


def resident_prefix_budget(config: DiffusionGemmaConfig, free: int, batch: int = 1, graphs: bool = False) -> int:
    """Bytes a resident prefix-cache entry may take: the headroom, if any."""
    return max(0, headroom(config, free, batch, graphs))


def plan(
    config: DiffusionGemmaConfig,
    vram: int,
    context: int = PLANNED_CONTEXT,
    batch: int = 1,
    experts_format: str | None = "nvfp4",
    dense_format: str | None = None,
    prefill_chunk: int = PREFILL_CHUNK_TOKENS,
    cuda_context: int = CUDA_CONTEXT_BYTES,
    graphs: bool | None = None,
) -> MemoryPlan:
    """Memory plan for serving `config` with `context` tokens of KV cache and `batch` canvas rows;
    `prefill_chunk` prompt tokens per encoder pass (0: the whole prompt in one pass); `graphs`: the
    static decoder step with CUDA graphs (None: as an engine on a GPU would run, from DGEMMA_GRAPHS)."""
    if context <= 0 or batch <= 0 or prefill_chunk < 0:
        raise ValueError("context and batch must be positive, prefill_chunk not negative")
    if graphs is None:
        graphs = static_mode(torch.device("cuda")) == "graphs"
    canvas = config.canvas_length or 256
    capacity = static_capacity(config) if graphs else 0
    in_step = graphs and context <= capacity
    return MemoryPlan(
        vram=vram, context=context, canvas=canvas, batch=batch,
        prefill_chunk=min(prefill_chunk or context, context),
        experts_format=experts_format, dense_format=dense_format,
        weights=weight_bytes(meta_model(config), experts_format, dense_format),
        kv_detail=kv_cache_bytes(config, capacity) if in_step else kv_cache_bytes(config, context, last_pass=canvas),
        passes=pass_terms(config, context, batch, prefill_chunk, graphs),
        cuda_context=cuda_context, prefix_cache_host=default_budget(torch.device("cuda")), graphs=graphs,
        static_capacity=capacity,
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
    lines = [f"weights (experts {p.experts_format or 'bf16'}, dense {p.dense_format or 'bf16'}, "
             "vision tower excluded)"]
    for name, n in sorted(p.weights.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<44}{gib(n)}")
    lines.append(f"  {'total':<44}{gib(p.weights_total)}")
    if p.graphs and p.context <= p.static_capacity:
        room = "" if p.context == p.static_capacity else f", which hold {p.static_capacity}"
        lines.append(f"kv cache at {p.context} tokens (bf16): its one copy, in the static step's buffers{room}")
    else:
        lines.append(f"kv cache at {p.context} tokens while decoding (bf16)")
    for kind, n in p.kv_detail.items():
        lines.append(f"  {kind:<44}{gib(n)}")
    lines.append(f"peak of each pass besides the weights (canvas {p.canvas} x {p.batch} rows, "
                 f"prefill in {p.prefill_chunk}-token chunks)")
    for name, terms in p.passes.items():
        mark = "  <- peak" if name == p.peak_pass else ""
        lines.append(f"  {name.replace('_', ' '):<44}{gib(sum(terms.values()))}{mark}")
        for term, n in terms.items():
            lines.append(f"    {term:<42}{gib(n)}")
    step = ("static decoder step with CUDA graphs (its buffers and graph pool above; DGEMMA_GRAPHS=0: "
            "dynamic cache)" if p.graphs else "dynamic cache, no CUDA graphs (DGEMMA_GRAPHS=0)")
    lines.append(f"decoder: {step}")
    if p.graphs:
        lines.append(f"  {POOL_NOTE}")
    resident = (f"the most recent entry also on the GPU within {p.prefix_cache_device / GIB:.2f} GiB of the headroom"
                if p.prefix_cache_device else "none on the GPU")
    lines.append(f"prefix cache: in host memory ({p.prefix_cache_host / GIB:.2f} GiB budget), {resident}")
    lines.append(f"total{'':<41}{gib(p.total)}  of {p.vram / GIB:.2f} GiB")
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"{verdict}: headroom {(p.vram - p.total) / GIB:.2f} GiB for allocator fragmentation. "
                 f"Not in the total: the CUDA context (~{p.cuda_context / GIB:.2f} GiB, driver dependent), "
                 f"so the GPU needs ~{p.gpu_total / GIB:.2f} GiB free before the daemon starts.")
    return "\n".join(lines)
