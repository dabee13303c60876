"""Pick the bundled model's sampler defaults on a *development* package: installed Python code
that is neither in the training corpus (train/corpus.py) nor the benchmark's held-out package.

    python -m train.tune_sampler --model runs/v6/best [--package werkzeug] [--single 40] [--multi 20]

Validation files of the corpus are a poor guide: the model has seen code much like them (and, on
the standard-library-only corpus, memorised it), so they favour greedy, few-step settings. The
cases are cut exactly as bench/infill_eval.py cuts its held-out set, and each candidate runs
through dgemma's engine; prints exact match / edit similarity / latency per candidate.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))

# (steps, t_max, t_min, entropy_bound, stability_threshold, confidence_threshold). The rows with
# small bounds accept fewer tokens per step: a weak model's parallel guesses disagree with each other.
_GRID = [
    (12, 0.2, 0.02, 2.0, 1, 0.02),
    (24, 0.2, 0.02, 0.5, 1, 0.02),
    (48, 0.2, 0.02, 0.3, 1, 0.02),
    (64, 0.2, 0.02, 0.05, 2, 0.01),
    (24, 0.4, 0.1, 0.2, 2, 0.01),
]
CANDIDATES = {
    f"steps{n}_t{hi}-{lo}_b{bound}_s{stab}": dict(max_denoising_steps=n, t_max=hi, t_min=lo, entropy_bound=bound,
                                                  stability_threshold=stab, confidence_threshold=conf)
    for n, hi, lo, bound, stab, conf in _GRID
}
BENCHMARK_PACKAGE = "click"  # bench/infill_eval.py's default held-out set: never tuned on


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "dgemma" / "bundled"))
    ap.add_argument("--package", default="werkzeug")
    ap.add_argument("--single", type=int, default=40)
    ap.add_argument("--multi", type=int, default=20)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args(argv)
    if args.package == BENCHMARK_PACKAGE:
        raise SystemExit(f"{args.package!r} is the benchmark's held-out set: tune on another package")
    import torch

    torch.set_num_threads(2)
    from infill_eval import make_cases, predict, score

    from dgemma.engine.engine import Engine
    from dgemma.engine.loading import load_model
    from dgemma.engine.settings import SamplerSettings

    loaded = load_model(args.model, device="cpu")
    _, cases = make_cases(args.package, args.single, args.multi)  # refuses a corpus package
    for name, values in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        preds, times = predict(Engine(loaded, settings=SamplerSettings.from_mapping(values)), cases)
        result = score(cases, preds)["all"]
        print(f"{name}: EM {result['em']:.3f} ES {result['es']:.3f} {sum(times) / len(times):.2f} s/case", flush=True)


if __name__ == "__main__":
    main()
