"""Engine benchmark: loop overhead per denoising step, tokens per forward, prefix-cache speedup.

    python bench/engine.py [--model DIR] [--steps 16] [--repeats 5]
    python bench/engine.py --shape 26b [--repeats 21] [--compile]   # host cost of a 26B-A4B decoder step

Without --model it uses the bundled model. `--shape 26b` measures no model at all: it counts the
operators and host syncs of one 26B-A4B decoder step and times its host cost (bench/host_cost.py).
Prints a markdown table; figures go into BENCHMARKS.md with the machine they came from.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from dgemma.engine.canvas import plan_rows, slot_candidates
from dgemma.engine.denoise import denoise, encode, expand_cache
from dgemma.engine.engine import Engine
from dgemma.engine.loading import load_model
from dgemma.engine.settings import SamplerSettings
from machine import cpu_name  # bench/ is this script's folder


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
    cold = median_time(lambda: prefill(cold_engine, prefix + "x = 1"), repeats)
    prefill(engine, prefix + "x = 1")
    counter = iter(range(10**6))
    warm = median_time(lambda: prefill(engine, prefix + f"x = {next(counter)}"), repeats)
    return cold, warm, len(engine._context(engine.bos_token, prefix, ROOM)[0])


ROOM = 256  # tokens left for the answer, as a fill with max_tokens 256 leaves


def prefill(engine: Engine, text: str) -> tuple[int, int, int]:
    """The prefill a fill at the end of ``text`` does: (prompt tokens, tokens from the cache,
    characters left out of the window)."""
    ids, stable, window = engine._context(engine.bos_token, text, ROOM)
    _, cached = engine._prefill(ids, stable)
    return len(ids), cached, window.dropped


def sliding_window(engine: Engine, lines: int = 5000) -> list[tuple[str, int, int, bool, float]]:
    """Fills at the end of a ``lines``-line file, then further down it, with a prefix cache:
    (step, prompt tokens, tokens re-encoded, whether the window's start moved, prefill ms). The
    window (engine/window.py) starts on a line that moves in steps of ALIGN_LINES, so most steps
    re-encode only the new lines."""
    body = "".join(f"def handler_{i}(request, value={i}):\n    return process(request, value * {i})\n\n"
                   for i in range(lines // 3 + 1))
    text = "\n".join(body.split("\n")[:lines]) + "\n"
    warm = Engine(engine.loaded)
    rows, last_start = [], None
    for extra in range(0, 33, 4):
        grown = text + "".join(f"x_{j} = handler_{j}(None)\n" for j in range(extra))
        start = time.perf_counter()
        prompt, cached, dropped = prefill(warm, grown)
        rows.append((f"{extra} lines further" if extra else "last line of the file (cold)", prompt,
                     prompt - cached, last_start is not None and dropped != last_start,
                     (time.perf_counter() - start) * 1e3))
        last_start = dropped
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", choices=["model", "26b"], default="model",
                        help="26b: host cost of a 26B-A4B decoder step on fake tensors (bench/host_cost.py)")
    parser.add_argument("--compile", action="store_true", help="with --shape 26b: also time torch.compile")
    args = parser.parse_args()
    if args.shape == "26b":
        from host_cost import report  # bench/ is this script's folder

        report(args.repeats, args.compile)
        return
    torch.manual_seed(0)
    engine = Engine(load_model(args.model))
    loop, bare, rows = loop_overhead(engine, args.steps, args.repeats)
    tpf, tokens, steps = tokens_per_forward(engine)
    cold, warm, prompt = prefix_cache_speedup(engine, args.repeats)
    sliding = sliding_window(engine)
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
    print("\nFills at the end of a 5,000-line file, the context window sliding (one run, in order):\n")
    print("| fill | prompt tokens | re-encoded | window start moved | prefill |\n|---|---|---|---|---|")
    for label, prompt_tokens, encoded, moved, ms in sliding:
        print(f"| {label} | {prompt_tokens} | {encoded} | {'yes' if moved else 'no'} | {ms:.1f} ms |")


if __name__ == "__main__":
    main()
