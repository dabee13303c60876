"""Latency of the fills a user waits on, old defaults against new ones, through a warm daemon.

    python bench/latency.py [--model DIR] [--package click] [--single 60] [--multi 20]
                            [--variant NAME=JSON ...] [--write]

Held-out cases as bench/infill_eval.py cuts them (a third-party package the bundled model never
saw): one line, or 2-4 lines, removed from a file. Each goes to a private daemon (temporary
runtime and config folders; a user's daemon is not touched) as the language server sends
ghost text: the prompt from lsp/context.build_prompt, the automatic token budget, and
``max_lines`` 1 for a single line (the engine's line plan) or the automatic limit for more.
Before a case is timed, one untimed fill at the line above primes the daemon's prefix cache, as
typing in an open file does; the variants then take turns on each case (order alternating), so
drifting load hits all alike. Per variant and kind: p50/p90 seconds, denoising steps and canvas
rows per request, edit similarity to the removed text, and the share of empty answers.

Variants: ``old`` is the plan before the line plan (``line_canvas`` 0: every fill decodes
the model's whole canvas with every middle length and draw), ``new`` the defaults; --variant adds
sampler settings of your own (e.g. ``--variant 'two draws={"line_draws": 2}'``).

It also prints, for the shipped 26B-A4B config, the decoder tokens one denoising step of a
single-line fill runs under each variant (rows x canvas positions), from the engine's own plan
(engine/canvas.FillPlan), with the real checkpoint's sampler defaults and with the bundled
model's (draws and line drafts on). --write puts the section into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench/ and train/ are folders beside the package; behind site-packages

from bench.infill_eval import Case, make_cases  # noqa: E402
from bench.machine import cpu_name  # noqa: E402
from bench.report import pct, write_section  # noqa: E402
from bench.private_daemon import private_daemon  # noqa: E402
from dgemma.engine.canvas import FillPlan, line_drafts  # noqa: E402
from dgemma.engine.ranking import edit_similarity  # noqa: E402
from dgemma.engine.settings import SamplerSettings  # noqa: E402
from dgemma.lsp.context import RingBuffer, build_prompt  # noqa: E402
from dgemma.lsp.settings import Settings as LspSettings  # noqa: E402

VARIANTS = {"old": {"line_canvas": 0}, "new": {}}
BUNDLED_SAMPLER = ROOT / "dgemma" / "bundled" / "dgemma_sampler.json"


def request(case: Case, lsp: LspSettings, seed: int, settings: dict, prefix: str | None = None) -> dict:
    """The fill the language server sends for ``case`` (or at the end of ``prefix``, for priming)."""
    text = case.prefix + case.suffix
    offset = len(case.prefix if prefix is None else prefix)
    prompt = build_prompt(text, offset, uri=f"file:///{case.file}", language="python", ring=RingBuffer(),
                          open_texts={}, budget=lsp.budget)
    lines = 1 if case.kind == "single" else lsp.max_lines_automatic
    return {"prefix": prompt.prefix, "suffix": prompt.suffix, "max_tokens": lsp.max_tokens_automatic,
            "max_lines": lines, "seed": seed, "stream": False, "settings": settings}


def paired_gain(es: list[float], base: list[float], rounds: int = 2000) -> tuple[float, float, float]:
    """Mean edit-similarity gain over ``base`` on the same cases, with a 95% bootstrap interval:
    at a few dozen cases a difference of 0.01-0.02 is usually inside it."""
    import random

    diffs = [a - b for a, b in zip(es, base)]
    rng = random.Random(0)
    means = sorted(statistics.mean(rng.choices(diffs, k=len(diffs))) for _ in range(rounds))
    return statistics.mean(diffs), means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def decoder_tokens(variants: dict[str, dict], budget: int) -> list[tuple[str, str, int, int]]:
    """(variant, sampler, rows, tokens) of one step of a single-line fill on the 26B-A4B config."""
    from dgemma.quant.meta import load_config

    canvas_length = load_config("diffusiongemma-26B-A4B").canvas_length or 256
    samplers = {"checkpoint defaults": {}, "bundled sampler": json.loads(BUNDLED_SAMPLER.read_text())}
    drafts = [[0]] * len(line_drafts("def f(x):\n    y = x\n    z = y\n"))  # a line start: both drafts
    out = []
    for name, overrides in variants.items():
        for sampler_name, sampler in samplers.items():
            s = SamplerSettings.from_mapping({**sampler, **overrides})
            plan = FillPlan.of(canvas_length, s.line_canvas, 1, s.draws, s.line_draws,
                               drafts=drafts if s.draft_strength else [])
            rows = len(plan.rows(0, budget))
            out.append((name, sampler_name, rows, rows * plan.canvas))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--package", default="click", help="installed package the held-out cases come from")
    ap.add_argument("--single", type=int, default=60, help="single-line cases")
    ap.add_argument("--multi", type=int, default=20, help="multi-line cases")
    ap.add_argument("--seed", type=int, default=0, help="which cases are cut")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="sampler settings to compare besides old and new")
    ap.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    args = ap.parse_args()
    variants = dict(VARIANTS)
    for spec in args.variant:
        name, _, settings = spec.partition("=")
        variants[name] = json.loads(settings)

    version, cases = make_cases(args.package, args.single, args.multi, args.seed)
    lsp = LspSettings()
    import torch

    model = args.model or "bundled"
    results: dict[tuple[str, str], list[dict]] = {(v, c.kind): [] for v in variants for c in cases}
    with private_daemon(args.model) as client:
        for i, case in enumerate(cases):
            above = case.prefix[:case.prefix.rstrip("\n").rfind("\n") + 1]
            client.request("fill", request(case, lsp, 10_000 + i, {}, prefix=above))  # primes the cache
            order = list(variants) if i % 2 == 0 else list(reversed(variants))
            for name in order:
                t0 = time.perf_counter()
                res = client.request("fill", request(case, lsp, i, variants[name]))
                seconds = time.perf_counter() - t0
                model = res.get("model") or model
                text = res["completions"][0]["text"] if res.get("completions") else ""
                results[(name, case.kind)].append({"s": seconds, "steps": res["steps"], "rows": res["rows"],
                                                   "es": edit_similarity(text, case.middle), "empty": not text})
            print(f"case {i + 1}/{len(cases)}", file=sys.stderr, end="\r", flush=True)

    machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}")
    command = "python bench/latency.py" + "".join(f" {a}" for a in sys.argv[1:])
    rows = []
    for kind in ("single", "multi"):
        for name in variants:
            r = results.get((name, kind)) or []
            if not r:
                continue
            s = [x["s"] for x in r]
            gain, low, high = paired_gain([x["es"] for x in r], [x["es"] for x in results[("old", kind)]])
            rows.append(f"| {kind} | {name} | {len(r)} | {pct(s, 0.5):.3f} | {pct(s, 0.9):.3f} | "
                        f"{statistics.mean(x['steps'] for x in r):.1f} | {statistics.mean(x['rows'] for x in r):.1f} | "
                        f"{statistics.mean(x['es'] for x in r):.3f} | {gain:+.3f} [{low:+.3f}, {high:+.3f}] | {sum(x['empty'] for x in r) / len(r):.0%} |")
    tokens = decoder_tokens(variants, lsp.max_tokens_automatic)
    token_rows = [f"| {name} | {sampler} | {n} | {t} |" for name, sampler, n, t in tokens]
    settings = "; ".join(f"`{name}` = {json.dumps(v)}" for name, v in variants.items())
    section = f"""## Latency

`{command}` on {time.strftime('%Y-%m-%d')}: {machine}; model `{model}`; held-out cases from
`{args.package}` {version} (seed {args.seed}). Through a warm daemon, as the language server asks for
ghost text ({lsp.max_tokens_automatic}-token budget; `max_lines` 1 for one line, {lsp.max_lines_automatic} for
more), the prefix cache primed by a fill at the line above. Variants: {settings} (a line canvas
longer than the model's canvas is the model's canvas). "vs old": the mean difference in edit
similarity to `old` on the same cases, with its 95% bootstrap interval.

| kind | variant | cases | p50 s | p90 s | steps | rows | edit similarity | vs old, same cases (95% CI) | empty |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

One denoising step of a single-line fill on the shipped 26B-A4B config (engine/canvas.FillPlan):

| variant | sampler | rows | decoder tokens per step |
|---|---|---|---|
{chr(10).join(token_rows)}
"""
    print(section)
    if args.write:
        write_section(section)


if __name__ == "__main__":
    main()
