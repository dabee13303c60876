"""Engine benchmark: loop overhead per denoising step, tokens per forward, prefix-cache speedup.

    python bench/engine.py [--model DIR] [--steps 16] [--repeats 5]

Without --model it uses the bundled model. Prints a markdown table; figures go into BENCHMARKS.md
with the machine they came from.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import DynamicCache

from dgemma.daemon.canvas import plan_rows, slot_candidates
from dgemma.daemon.denoise import denoise, encode, expand_cache
from dgemma.daemon.engine import Engine
from dgemma.daemon.loading import load_model
from dgemma.daemon.sampling import SamplerSettings


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def loop_overhead(engine: Engine, steps: int, repeats: int) -> tuple[float, float, int]:
    """Seconds per step of the full loop vs the bare decoder forward it wraps, same batch."""
    model = engine.model
    cache = DynamicCache(config=engine.text_config)
    prompt = torch.randint(3, engine.vocab_size, (1, 512))
    encode(model, prompt, cache)
    slots = slot_candidates(engine.canvas_length, engine.canvas_length)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, engine.vocab_size, (len(slots), engine.canvas_length), generator=gen)
    plan = plan_rows(noise, slots, list(range(100, 140)), engine.eos_id, engine.pad_id)
    # An unreachable confidence threshold: every run does exactly `steps` steps.
    fixed = SamplerSettings(max_denoising_steps=steps, confidence_threshold=1e-30)
    loop = median_time(lambda: denoise(model, cache, plan.tokens, plan.pinned, fixed, gen), repeats) / steps
    wide = expand_cache(cache, len(slots))
    positions = torch.arange(512, 512 + engine.canvas_length, dtype=torch.int32).unsqueeze(0)
    sc = torch.zeros(len(slots), engine.canvas_length, engine.vocab_size)

    def bare() -> None:
        for _ in range(steps):
            model(decoder_input_ids=plan.tokens, self_conditioning_logits=sc, cache=wide,
                  decoder_position_ids=positions)

    return loop, median_time(bare, repeats) / steps, len(slots)


def tokens_per_forward(engine: Engine) -> tuple[float, int, int]:
    prefix = "import os\n\n\ndef list_python_files(root):\n    result = []\n    for name in os.listdir(root):\n"
    res = engine.fill(prefix, "    return result\n", seed=0, max_tokens=engine.canvas_length)
    return res.completions[0].tokens / max(1, res.steps), res.completions[0].tokens, res.steps


def prefix_cache_speedup(engine: Engine, repeats: int) -> tuple[float, float, int]:
    """A one-line change at the end of a ~2k-token prefix (less if the model's context is
    smaller): cold prefill vs cache hit."""
    body = "".join(f"def handler_{i}(request, value={i}):\n    return process(request, value * {i})\n\n"
                   for i in range(200))
    ids = engine._encode(body)
    prefix = engine.tokenizer.decode(ids[: min(2000, engine.context_limit - engine.canvas_length - 64)])
    prefix = prefix[: prefix.rfind("\n") + 1]
    cold_engine = Engine(engine.loaded, prefix_cache_bytes=0)
    cold = median_time(lambda: cold_engine._prefill(*cold_engine._context(engine.bos_token, prefix + "x = 1")),
                       repeats)
    engine._prefill(*engine._context(engine.bos_token, prefix + "x = 1"))
    counter = iter(range(10**6))
    warm = median_time(lambda: engine._prefill(*engine._context(engine.bos_token, prefix + f"x = {next(counter)}")),
                       repeats)
    return cold, warm, len(engine._context(engine.bos_token, prefix)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    engine = Engine(load_model(args.model))
    loop, bare, rows = loop_overhead(engine, args.steps, args.repeats)
    tpf, tokens, steps = tokens_per_forward(engine)
    cold, warm, prompt = prefix_cache_speedup(engine, args.repeats)
    cfg = engine.text_config
    params = sum(p.numel() for p in engine.model.parameters()) / 1e6
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"model: {engine.loaded.name} ({params:.1f} M parameters, hidden {cfg.hidden_size}, "
          f"{cfg.num_hidden_layers} layers, canvas {engine.canvas_length}, vocab {cfg.vocab_size})\n")
    print("| measure | value |\n|---|---|")
    print(f"| decoder forward, {rows} rows x {engine.canvas_length} (bare) | {bare * 1e3:.1f} ms/step |")
    print(f"| full denoising step (forward + sampling + acceptance) | {loop * 1e3:.1f} ms/step |")
    print(f"| loop overhead | {(loop / bare - 1) * 100:+.1f}% |")
    print(f"| tokens per forward (FIM demo, {tokens} tokens in {steps} steps) | {tpf:.2f} |")
    print(f"| prefill of a {prompt}-token prefix, cold | {cold * 1e3:.1f} ms |")
    print(f"| same prefix, one-line change at the end (cache hit) | {warm * 1e3:.1f} ms |")
    print(f"| prefix-cache speedup | {cold / warm:.1f}x |")


if __name__ == "__main__":
    main()
