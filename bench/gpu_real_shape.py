"""Real-shape benchmark: DiffusionGemma 26B-A4B text model with random weights, experts built
directly in 4-bit form (52 GB of bf16 is never materialized), through the real engine.

    OUT=/tmp/out python bench/gpu_real_shape.py                 # on the GPU machine, ~5 minutes
    python bench/gpu_real_shape.py --scale tiny --device cpu     # the same code at toy shape (CI)

Prints a markdown table and writes `gpu_real_shape.md` and `.json` under $OUT (or --out).
Random weights never converge, so every canvas runs a fixed number of steps.

Last, the static decoder step as the engine runs it (engine/static_step.py): an 8k-token prefix
encoded straight into its buffers, one row, and on CUDA its CUDA graph captured. The graph pool it
keeps (the caching allocator's private-pool segments) is measured beside the memory plan's estimate
of it (`graph_pool_GiB`, `plan_graph_pool_GiB`), and the peak beside the plan's total with graphs;
`--skip-graphs` leaves this out. On a CPU the step runs eager: there is no pool to measure.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer, DiffusionGemmaConfig, DynamicCache

from dgemma.engine.denoise import denoise, encode
from dgemma.engine.engine import Engine
from dgemma.engine.loading import BUNDLED_MODEL_DIR, LoadedModel
from dgemma.engine.plan import PREFILL_CHUNK_TOKENS, plan, static_capacity, static_step_terms
from dgemma.engine.prefix_cache import cache_bytes
from dgemma.engine.settings import SamplerSettings
from dgemma.engine.static_step import StaticStep
from dgemma.quant.apply import tied_groups
from dgemma.quant.checkpoint import materialize_meta
from dgemma.kernels.packed import QuantizedWeight, block_size
from dgemma.quant.meta import load_config, meta_model
from dgemma.quant.modules import QuantizedExperts

GiB = 1 << 30
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, sliding_window=64, num_experts=8, top_k_experts=2,
            moe_intermediate_size=64, vocab_size=4096,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            per_layer_config={"5": {"head_dim": 64, "num_key_value_heads": 1}})


def tiny_variant(config: DiffusionGemmaConfig) -> DiffusionGemmaConfig:
    """The same architecture at toy size, so CI runs every line of this benchmark on a CPU."""
    text = {**config.text_config.to_dict(), **TINY}
    return DiffusionGemmaConfig(text_config=text, canvas_length=32)


def random_quantized(shape: tuple[int, ...], fmt: str, device: torch.device) -> QuantizedWeight:
    """Random codes with unit block scales and a global scale that gives |w| ~ 0.02."""
    *lead, rows, cols = shape
    packed = torch.randint(0, 256, (*lead, rows, cols // 2), dtype=torch.uint8, device=device)
    ones = torch.ones((*lead, rows, cols // block_size(fmt)), device=device)
    scales = ones.to(torch.float8_e4m3fn) if fmt == "nvfp4" else ones
    global_scale = torch.full((*lead, 1), 0.008 if fmt == "nvfp4" else 0.02, device=device)
    return QuantizedWeight(fmt, packed, scales, global_scale)


def build_random_model(config, fmt: str | None, device: torch.device, dtype: torch.dtype):
    """The model with random weights; experts in ``fmt`` (4-bit) or, with None, in ``dtype``."""
    model = meta_model(config).eval()
    if fmt is not None:
        for experts, slots in tied_groups(model, "experts"):
            module = getattr(slots[0][0], slots[0][1])
            q = QuantizedExperts(random_quantized(tuple(experts.shape), fmt, device),
                                 random_quantized(tuple(module.down_proj.shape), fmt, device),
                                 module.act_fn, config.text_config.hidden_activation)
            for parent, attr, _ in slots:
                setattr(parent, attr, q)
    materialize_meta(model, device, dtype)
    with torch.no_grad():
        for module in model.modules():
            # Computed buffers (rotary frequencies, embedding scale) are already right.
            tensors = [*module._parameters.values(), *(b for k, b in module._buffers.items()
                                                       if k not in module._non_persistent_buffers_set)]
            for tensor in tensors:
                if tensor is None or not tensor.is_floating_point():
                    continue
                # Norm weights and scalars at one, matrices small: activations stay finite.
                tensor.fill_(1.0) if tensor.dim() <= 1 else tensor.normal_(0.0, 0.02)
    return model


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


class Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def median(self, fn: Callable[[], object], repeats: int) -> float:
        fn()
        self.sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / GiB if self.cuda else None


@torch.no_grad()
def floors(device: torch.device, clock: Clock) -> tuple[float, float]:
    """Measured copy bandwidth (bytes/s, read + write) and bf16 matmul rate (FLOP/s)."""
    big = 1 << (30 if device.type == "cuda" else 24)
    src = torch.empty(big // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * big / clock.median(lambda: dst.copy_(src), 5)
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    rate = 2 * n**3 / clock.median(lambda: a @ a, 5)
    return bandwidth, rate


@torch.no_grad()
def measure(label: str, config, fmt: str | None, device: torch.device, dtype: torch.dtype, args) -> dict:
    clock = Clock(device)
    if clock.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_random_model(config, fmt, device, dtype)
    row: dict = {"weights": label, "weight_GiB": weight_bytes(model) / GiB, "peak_weights_GiB": clock.peak_gib()}
    # generate() works on ids; the bundled tokenizer only supplies <pad>/<eos>/<bos>, which have
    # the same ids as Gemma's.
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR, local_files_only=True)
    engine = Engine(LoadedModel(model=model, tokenizer=tokenizer, name=label, path=Path("."), device=device,
                                dtype=dtype), settings=SamplerSettings(), prefix_cache_bytes=0)
    vocab, canvas = engine.vocab_size, engine.canvas_length
    fixed = lambda steps: SamplerSettings(max_denoising_steps=steps, confidence_threshold=1e-30)  # noqa: E731
    gen = torch.Generator(device).manual_seed(0)
    caches = {}
    for context in args.contexts:
        cache = DynamicCache(config=engine.text_config)
        prompt = torch.randint(3, vocab, (1, context), device=device, generator=gen)
        started = time.perf_counter()
        for chunk in prompt.split(2048, dim=1):  # bounded activations for long prompts
            encode(model, chunk, cache)
        clock.sync()
        row[f"prefill_{context}_s"] = time.perf_counter() - started
        row[f"peak_kv{context}_GiB"] = clock.peak_gib()
        row[f"kv{context}_GiB"] = cache_bytes(cache) / GiB
        caches[context] = cache
    noise = torch.randint(0, vocab, (1, canvas), device=device, generator=gen)
    pins = torch.zeros_like(noise, dtype=torch.bool)
    for context, cache in caches.items():
        steps = args.step_repeats
        row[f"step_{context}_ms"] = 1e3 * clock.median(
            lambda: denoise(model, cache, noise, pins, fixed(steps), gen), 3) / steps
    first = caches[args.contexts[0]]
    row["commit_ms"] = 1e3 * clock.median(lambda: encode(model, noise, copy.deepcopy(first)), 3)
    caches.clear()  # frees the long-context KV before the generation runs
    prompt = torch.randint(3, vocab, (1, 16), device=device, generator=gen)
    for steps in args.steps:
        seconds = clock.median(lambda: engine.generate(prompt, max_new_tokens=args.new_tokens, seed=0,
                                                        settings=fixed(steps)), 2)
        row[f"tok_s_{steps}"] = args.new_tokens / seconds
    row["peak_total_GiB"] = clock.peak_gib()
    if not args.skip_graphs:
        try:
            row.update(measure_static(model, config, fmt, device, args, clock))
        except Exception as exc:  # the capture has never run here: report it, keep the rest
            row["static_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def graph_pool_bytes() -> int:
    """Bytes of the caching allocator's segments in private pools, which CUDA graphs capture into."""
    return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot(include_traces=False)
               if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0))


@torch.no_grad()
def measure_static(model, config, fmt: str | None, device: torch.device, args, clock: Clock) -> dict:
    """The static step over a prefix of the planned context, encoded into its buffers (the engine's
    one copy of it), one row: the first canvas (compile and capture on CUDA), a replayed step, and on
    CUDA the graph pool and the peak, each beside the memory plan's figure."""
    graphs = device.type == "cuda"
    capacity = static_capacity(config)
    vocab, canvas = config.text_config.vocab_size, config.canvas_length
    gen = torch.Generator(device).manual_seed(1)
    fixed = lambda steps: SamplerSettings(max_denoising_steps=steps, confidence_threshold=1e-30)  # noqa: E731
    if graphs:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        pool_before = graph_pool_bytes()
    step = StaticStep(model, capacity, graphs=graphs)
    cache = step.cache()
    # The planned context (at toy scale, the longest measured above): the prefix, then one canvas.
    prompt = torch.randint(3, vocab, (1, min(capacity, args.contexts[-1]) - canvas), device=device, generator=gen)
    for chunk in prompt.split(PREFILL_CHUNK_TOKENS, dim=1):
        encode(model, chunk, cache)
    row: dict = {"static_prefix_tokens": cache.get_seq_length(), "static_prefix_in_buffers": step.holds(cache)}
    step.load(cache)
    noise = torch.randint(0, vocab, (1, canvas), device=device, generator=gen)
    pins = torch.zeros_like(noise, dtype=torch.bool)
    started = time.perf_counter()
    denoise(step, cache, noise, pins, fixed(3), gen)  # compile, warm up, capture (CUDA graph trees)
    clock.sync()
    row["static_first_canvas_s"] = time.perf_counter() - started
    steps = args.step_repeats
    row["static_step_ms"] = 1e3 * clock.median(lambda: denoise(step, cache, noise, pins, fixed(steps), gen), 3) / steps
    planned = plan(config, 0, capacity, experts_format=fmt, graphs=True)
    row["plan_graph_pool_GiB"] = static_step_terms(config)["static step: graph pool (estimate)"] / GiB
    row["plan_total_graphs_GiB"] = planned.total / GiB
    if graphs:
        row["graph_pool_GiB"] = (graph_pool_bytes() - pool_before) / GiB
        row["static_peak_GiB"] = clock.peak_gib()
        row["static_reserved_GiB"] = torch.cuda.memory_reserved() / GiB
    return row


def active_flops_per_token(config) -> float:
    """2 x the parameters one token touches in a decoder step (attention projections, dense MLP,
    top-k experts, self-conditioning, lm head)."""
    t = config.text_config
    per_layer = 0
    for i, kind in enumerate(t.layer_types):
        layer = t.per_layer_config[i] if hasattr(t, "per_layer_config") else t
        head_dim, kv = layer.head_dim, layer.num_key_value_heads
        kv_mats = 1 if kind == "full_attention" else 2  # full layers share k and v
        per_layer += t.hidden_size * head_dim * (2 * t.num_attention_heads + kv_mats * kv)
        per_layer += 3 * t.hidden_size * t.intermediate_size
        per_layer += t.top_k_experts * 3 * t.hidden_size * t.moe_intermediate_size + t.hidden_size * t.num_experts
    return 2.0 * (per_layer + 3 * t.hidden_size * t.intermediate_size + 2 * t.vocab_size * t.hidden_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="diffusiongemma-26B-A4B")
    parser.add_argument("--scale", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--format", default="nvfp4", choices=["nvfp4", "nf4"])
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--skip-graphs", action="store_true", help="leave out the static step and its graph pool")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if args.scale == "tiny":
        config = tiny_variant(config)
    args.contexts = [2048, 8192] if args.scale == "real" else [64, 128]
    args.steps = [16, 24, 32] if args.scale == "real" else [2]
    args.new_tokens = 512 if args.scale == "real" else 32
    args.step_repeats = 8 if args.scale == "real" else 1
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    clock = Clock(device)
    bandwidth, rate = floors(device, clock)
    rows = [measure(f"{args.format} experts", config, args.format, device, dtype, args)]
    if not args.skip_bf16:
        try:
            rows.append(measure("bf16", config, None, device, dtype, args))
        except torch.OutOfMemoryError:
            rows.append({"weights": "bf16", "note": "does not fit on this device"})
    canvas = config.canvas_length
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"device: {name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; scale {args.scale}",
             f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s, bf16 matmul {rate / 1e12:.1f} TFLOP/s", ""]
    for row in rows:
        if "note" in row:
            lines.append(f"{row['weights']}: {row['note']}")
            continue
        # One decoder step reads every weight (256 tokens x top-8 routing touch nearly all experts)
        # and the KV cache once.
        floor_bytes = (row["weight_GiB"] + row[f"kv{args.contexts[0]}_GiB"]) * GiB
        floor_s = max(floor_bytes / bandwidth, canvas * active_flops_per_token(config) / rate)
        row["floor_step_ms"] = floor_s * 1e3
        lines += [f"### {row['weights']}", "| measure | value |", "|---|---|"]
        for key, value in row.items():
            if key != "weights" and value is not None:
                lines.append(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
        step = row[f"step_{args.contexts[0]}_ms"]
        lines.append(f"| decoder step / floor at {args.contexts[0]} | {step / row['floor_step_ms']:.2f}x |")
        lines.append("")
    report = "\n".join(lines)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_real_shape.md").write_text(report)
        (out / "gpu_real_shape.json").write_text(json.dumps({"device": name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
