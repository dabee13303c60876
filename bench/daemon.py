"""Daemon benchmark: `ping` round trip, and what the daemon adds to a fill.

    python bench/daemon.py [--model DIR] [--pings 2000] [--repeats 7] [--steps N] [--write]

Starts a private daemon (temporary runtime and config dirs, so a running user daemon is
not touched), then
  * ping round trip over the Unix socket, p50 / p99;
  * the same fill (same prompt, seed and settings) through the daemon and in this process
    on the same model, interleaved so load drift hits both; the difference is the cost
    of the daemon (framing, socket, queue hand-off, drafts).
Without --model it uses the bundled model. Prints a markdown section; --write puts it
into BENCHMARKS.md in place of the existing "## Daemon" section.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from machine import cpu_name  # bench/ is this script's folder
from private_daemon import private_daemon
from report import pct, write_section


PREFIX = '''import json
from pathlib import Path


def load_settings(path: Path) -> dict:
    """Read the settings file; missing keys fall back to the defaults."""
    with open(path) as f:
        data = json.load(f)
'''
SUFFIX = '''
    return {**DEFAULTS, **data}


def save_settings(path: Path, settings: dict) -> None:
    path.write_text(json.dumps(settings, indent=2))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=None, help="max_denoising_steps (default: the model's)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--write", action="store_true", help="update the Daemon section of BENCHMARKS.md")
    args = ap.parse_args()

    import torch

    from dgemma.engine.engine import Engine
    from dgemma.engine.loading import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    params = {"prefix": PREFIX, "suffix": SUFFIX, "max_tokens": args.max_tokens, "seed": 0}
    settings = {"max_denoising_steps": args.steps} if args.steps else {}
    if settings:
        params["settings"] = settings
    with private_daemon(args.model) as client:
        # ping
        for _ in range(100):
            client.request("ping")
        rtt = []
        for _ in range(args.pings):
            t0 = time.perf_counter()
            client.request("ping")
            rtt.append((time.perf_counter() - t0) * 1e6)

        # fill: daemon vs in-process, interleaved
        loaded = load_model(args.model)
        engine = Engine(loaded)

        def in_process() -> tuple[float, int]:
            t0 = time.perf_counter()
            res = engine.fill(PREFIX, SUFFIX, max_tokens=args.max_tokens, seed=0, settings=settings or None)
            return time.perf_counter() - t0, res.steps

        def via_daemon(stream: bool) -> tuple[float, int]:
            t0 = time.perf_counter()
            res = client.request("fill", dict(params, stream=stream), on_draft=lambda d: None)
            return time.perf_counter() - t0, res["steps"]

        for fn in (in_process, lambda: via_daemon(True), lambda: via_daemon(False)):
            fn()  # warm-up (first-call costs, prefix cache)
        local, remote, remote_nodraft = [], [], []
        steps = set()
        for _ in range(args.repeats):
            for fn, out in ((in_process, local), (lambda: via_daemon(True), remote),
                            (lambda: via_daemon(False), remote_nodraft)):
                dt, n = fn()
                out.append(dt)
                steps.add(n)

    med_l, med_r, med_n = (statistics.median(x) * 1000 for x in (local, remote, remote_nodraft))
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}; "
               f"model `{loaded.name}` on {loaded.device}")
    section = f"""## Daemon

`python bench/daemon.py{' --model ' + Path(args.model).name if args.model else ''}{' --steps ' + str(args.steps) if args.steps else ''}` \
on {time.strftime('%Y-%m-%d')}: {machine}.

| measure | value |
|---|---|
| ping round trip, p50 | {pct(rtt, 0.5):.0f} µs |
| ping round trip, p99 | {pct(rtt, 0.99):.0f} µs |
| fill in-process (median of {args.repeats}) | {med_l:.1f} ms |
| same fill through the daemon, drafts streamed | {med_r:.1f} ms ({(med_r / med_l - 1) * 100:+.1f} %) |
| same fill through the daemon, no drafts | {med_n:.1f} ms ({(med_n / med_l - 1) * 100:+.1f} %) |

Fill: {args.max_tokens}-token budget, seed 0, {sorted(steps)} denoising steps per request, a ~200-character
prefix and suffix. The goal is ≤ 5 % added by the daemon; the runs are interleaved so
drifting load (this machine is shared) hits all three alike.
"""
    print(section)
    if args.write:
        write_section(section)


if __name__ == "__main__":
    main()
