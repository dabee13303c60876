"""Pick the bundled model's sampler defaults on the *validation* files of the training corpus
(never on the benchmark's held-out package).

    python -m train.tune_sampler --model runs/bundled/best --cases 20

Runs dgemma's engine with a few candidate settings on single-line infills cut from the
validation split and prints exact match / edit similarity / latency for each.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

# (steps, t_max, t_min, entropy_bound, stability_threshold, confidence_threshold). The rows with
# small bounds accept fewer tokens per step: a weak model's parallel guesses disagree with each other.
_GRID = [
    (16, 0.6, 0.2, 0.5, 2, 0.01),
    (16, 0.4, 0.1, 1.0, 2, 0.01),
    (24, 0.6, 0.2, 0.3, 2, 0.01),
    (12, 0.3, 0.05, 2.0, 1, 0.02),
    (24, 0.4, 0.1, 0.2, 2, 0.01),
    (32, 0.3, 0.05, 0.1, 2, 0.01),
    (32, 0.6, 0.2, 0.3, 2, 0.01),
    (48, 0.4, 0.1, 0.1, 2, 0.01),
    (48, 0.2, 0.02, 0.2, 2, 0.01),
    (12, 0.2, 0.02, 2.0, 1, 0.02),
    (8, 0.2, 0.02, 4.0, 1, 0.02),
]
CANDIDATES = {
    f"steps{n}_t{hi}-{lo}_b{bound}": dict(max_denoising_steps=n, t_max=hi, t_min=lo, entropy_bound=bound,
                                          stability_threshold=stab, confidence_threshold=conf)
    for n, hi, lo, bound, stab, conf in _GRID
}


def val_cases(n: int, seed: int = 7):
    from train.corpus import read_sources, split

    _, val = split(read_sources())
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        _, text = rng.choice(val)
        lines = text.split("\n")
        if len(lines) < 20:
            continue
        i = rng.randrange(5, len(lines) - 2)
        if not lines[i].strip() or len(lines[i]) > 100:
            continue
        cases.append(("\n".join(lines[:i]) + "\n", lines[i], "\n" + "\n".join(lines[i + 1:])))
    return cases


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "runs" / "bundled" / "best"))
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from infill_eval import edit_similarity, window

    from dgemma.daemon.engine import Engine
    from dgemma.daemon.loading import load_model
    from dgemma.daemon.sampling import SamplerSettings

    loaded = load_model(args.model, device="cpu")
    cases = val_cases(args.cases)
    for name, values in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        engine = Engine(loaded, settings=SamplerSettings.from_mapping(values))
        em = es = 0.0
        t = time.time()
        for i, (prefix, middle, suffix) in enumerate(cases):
            p, s = window(prefix, suffix, 2000, 1000)
            pred = engine.fill(p, s, max_tokens=64, seed=i).completions[0].text
            em += pred.strip() == middle.strip()
            es += edit_similarity(pred, middle)
        n = len(cases)
        print(f"{name}: EM {em / n:.3f} ES {es / n:.3f} {(time.time() - t) / n:.2f} s/case", flush=True)


if __name__ == "__main__":
    main()
