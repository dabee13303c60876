"""Host cost of one 26B-A4B decoder step, on a CPU: operators dispatched, host syncs, host time.

    python bench/engine.py --shape 26b [--repeats 21] [--compile]
    python bench/host_cost.py [--repeats 21] [--compile]        # the same

No GPU and no memory: one decoder forward of a 256-token canvas over a 2,048-token prefix, NVFP4
experts through the dispatch a GPU uses (DGEMMA_KERNELS=triton: the sync-free expert alignment and
two fused-kernel launches per layer), built two ways:

1. **meta**: the full 26B-A4B (30 layers, hidden 2816, 128 experts top-8, vocab 262,144) on the meta
   device (shapes only). Operators and syncs are those of the real shape. Its host time is printed
   too but says little about a GPU: meta tensors run many operators through Python reference
   implementations (torch._refs), and scaled-dot-product attention decomposes into its math there
   (~870 more operators) where CUDA and CPU run one fused kernel.
2. **hollow**: the same layer structure (30 layers with their attention kinds and head shapes, 128
   experts top-8, the same code path) at toy width (16) and an 8-token canvas on real CPU tensors,
   bf16, small random weights, one thread, with the Triton launch operators replaced by a stand-in
   that returns zeros (Triton cannot run here). Every operator still goes through Python and the
   dispatcher while the kernels do next to no work, so its time per step is the eager host cost of
   this operator sequence on this CPU; what a CUDA launch adds per kernel is not in it.
   ``--compile`` also times ``torch.compile(step, fullgraph=True, dynamic=False)`` of the hollow step
   (Inductor on the CPU; several minutes to compile on 2 cores).

Operators are counted with dgemma.kernels.hostsync.SyncCounter; "aliasing" ones (views) launch no
kernel. Nothing here is a GPU figure.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from transformers import DiffusionGemmaConfig, DynamicCache

from dgemma.engine.denoise import encode
from dgemma.kernels.hostsync import SyncCounter
from dgemma.quant.checkpoint import materialize_meta
from dgemma.quant.meta import load_config, meta_model, with_meta_quantized_experts
from machine import cpu_name  # bench/ is this script's folder

PREFIX = 2048
HOLLOW_WIDTH = 16
HOLLOW_CANVAS = 8


def hollow_config(config: DiffusionGemmaConfig) -> DiffusionGemmaConfig:
    """The same layers, attention kinds, experts and top-k at toy width and an 8-token canvas."""
    text = config.text_config.to_dict()
    w = HOLLOW_WIDTH
    per_layer = {k: {"head_dim": w, "num_key_value_heads": 1} for k in text.get("per_layer_config", {})}
    text.update(hidden_size=w, intermediate_size=w, moe_intermediate_size=w, num_attention_heads=2,
                num_key_value_heads=1, head_dim=w // 2, vocab_size=64, sliding_window=8, per_layer_config=per_layer)
    return DiffusionGemmaConfig(text_config=text, canvas_length=HOLLOW_CANVAS)


@contextlib.contextmanager
def stand_in_launches() -> Iterator[None]:
    """On the CPU, the Triton launch operators return zeros of the right shape (no interpreter)."""
    from dgemma.kernels import triton_w4a16  # noqa: F401  (defines the operators)

    def moe(a, packed, scales, global_scale, lut, rows, block_expert, row_weight, num_rows, a_row_div, group,
            e4m3, fuse_gate, block_m, zero_fill):
        return a.new_zeros(num_rows, packed.shape[1] // (2 if fuse_gate else 1))

    def dense(a, packed, scales, global_scale, lut, group, e4m3):
        return a.new_zeros(a.shape[0], packed.shape[-2])

    lib = torch.library.Library("dgemma", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        lib.impl("moe_w4a16_mm", moe, "CPU")
        lib.impl("w4a16_mm", dense, "CPU")
    try:
        yield
    finally:
        lib._destroy()


def build_step(config: DiffusionGemmaConfig, device: torch.device, prefix: int) -> Callable[[], torch.Tensor]:
    """One decoder forward (batch 1) over a ``prefix``-token cache, as a closure."""
    model = with_meta_quantized_experts(meta_model(config)).eval()
    if device.type == "meta":
        model.to(torch.bfloat16)
    else:
        materialize_meta(model, device, torch.bfloat16)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for module in model.modules():
                # Computed buffers (rotary frequencies, embedding scale) are already right.
                for key, t in [*module._parameters.items(), *module._buffers.items()]:
                    if t is None or key in module._non_persistent_buffers_set:
                        continue
                    if not t.is_floating_point():
                        t.zero_()  # 4-bit codes and scales: weights of zero
                    elif t.dim() <= 1:
                        t.fill_(1.0)  # norms and scalars
                    else:
                        t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
    text = config.text_config
    cache = DynamicCache(config=text)
    canvas_length = config.canvas_length
    with torch.no_grad():
        for chunk in torch.randint(0, text.vocab_size, (1, prefix), device=device).split(1024, dim=1):
            encode(model, chunk, cache)
    canvas = torch.randint(0, text.vocab_size, (1, canvas_length), device=device)
    sc = torch.zeros(1, canvas_length, text.vocab_size, dtype=torch.bfloat16, device=device)
    positions = torch.arange(prefix, prefix + canvas_length, device=device)[None]

    def step() -> torch.Tensor:
        with torch.no_grad():
            return model(decoder_input_ids=canvas, self_conditioning_logits=sc, cache=cache,
                         decoder_position_ids=positions).logits

    return step


def count(step: Callable[[], object]) -> SyncCounter:
    with SyncCounter() as counter:
        step()
    return counter


def timed(step: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, min) seconds over ``repeats`` calls after a warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def measure(repeats: int, compile_step: bool) -> list[tuple[str, str]]:
    os.environ["DGEMMA_KERNELS"] = "triton"
    config = load_config("diffusiongemma-26B-A4B")
    text = config.text_config
    rows: list[tuple[str, str]] = []

    meta_step = build_step(config, torch.device("meta"), PREFIX)
    meta = count(meta_step)
    launches = meta.ops["dgemma.moe_w4a16_mm.default"]
    rows += [
        ("operators per decoder step, meta, full shape", f"{meta.total} ({meta.views} aliasing)"),
        ("fused MoE launches among them", f"{launches} (2 x {text.num_hidden_layers} layers)"),
        ("host syncs per decoder step", f"{sum(meta.syncs.values())}"),
    ]
    median, fastest = timed(meta_step, max(3, repeats // 5))
    rows.append(("host time per step, eager, meta tensors (Python meta kernels)",
                 f"{median * 1e3:.0f} ms (min {fastest * 1e3:.0f})"))
    del meta_step

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with stand_in_launches():
            hollow_step = build_step(hollow_config(config), torch.device("cpu"), 16)
            hollow = count(hollow_step)
            differ = sorted({*hollow.ops, *meta.ops} - {k for k in hollow.ops if hollow.ops[k] == meta.ops[k]})
            rows.append(("operators per decoder step, hollow", f"{hollow.total} ({hollow.views} aliasing)"))
            rows.append(("operators that differ, hollow/meta", ", ".join(
                f"{k.removeprefix('aten.').removesuffix('.default')} {hollow.ops[k]}/{meta.ops[k]}"
                for k in differ) or "none"))
            median, fastest = timed(hollow_step, repeats)
            rows.append(("host time per step, eager, hollow (1 thread)",
                         f"{median * 1e3:.1f} ms (min {fastest * 1e3:.1f}); "
                         f"{fastest / hollow.total * 1e6:.1f} us per operator at the min"))
            if compile_step:
                started = time.perf_counter()
                compiled = torch.compile(hollow_step, fullgraph=True, dynamic=False)
                compiled()  # fullgraph: a graph break would raise here
                rows.append(("torch.compile(fullgraph=True, dynamic=False) of the hollow step",
                             f"compiled in {time.perf_counter() - started:.0f} s, no graph break"))
                median, fastest = timed(compiled, repeats)
                rows.append(("host time per step, compiled, hollow (1 thread)",
                             f"{median * 1e3:.1f} ms (min {fastest * 1e3:.1f})"))
    finally:
        torch.set_num_threads(threads)
    return rows


def report(repeats: int = 21, compile_step: bool = False) -> None:
    rows = measure(repeats, compile_step)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, load average {load:.1f}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"26B-A4B decoder step: 1 row x 256 canvas over a {PREFIX}-token prefix, NVFP4 experts, "
          "DGEMMA_KERNELS=triton\n")
    print("| measure | value |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    args = parser.parse_args(argv)
    report(args.repeats, args.compile)


if __name__ == "__main__":
    main()
