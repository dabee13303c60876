"""Infilling quality of a dgemma model on code it never saw in training.

    python bench/infill_eval.py [--model DIR] [--package click] [--single 100] [--multi 50]

The held-out set is cut (fixed seed) from the sources of an installed third-party package
(default: click) that is not part of the training corpus (the CPython standard library and the
packages listed in train/corpus.py, which leave out click and typer, a layer over click).
Each case removes one line (single-line) or 2-4 consecutive lines (multi-line) from a file;
the model gets the text before it as prefix and the text after it as suffix, through
dgemma's real engine: ``Engine(load_model()).fill(prefix, suffix).completions[0].text``.

Metrics, on the middle with leading/trailing whitespace stripped:
  exact match; edit similarity = 1 - Levenshtein / max(len) (as CrossCodeEval reports it);
  syntax validity = ``ast.parse`` of the whole file after the fill.
Baselines: an empty middle; repeating the non-blank line just before the middle (the trivial
baseline, which like the model does not know how long the middle is); and repeating as many
non-blank lines as the middle has, which reads that count from the reference and so is the
stronger one on multi-line middles. Prints a markdown table; --write-benchmarks puts it in
BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import ast
import datetime as dt
import importlib.metadata
import importlib.util
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # train/ is a folder beside the package; behind site-packages (dgemma/__init__.py)

from dgemma.engine.ranking import edit_similarity  # noqa: E402  (the engine's own measure)
from train.corpus import PACKAGES as CORPUS_PACKAGES  # noqa: E402
from bench.machine import cpu_name  # noqa: E402  (tests import this module as bench.infill_eval)


@dataclass
class Case:
    kind: str  # "single" | "multi"
    file: str
    prefix: str  # the whole file before the middle
    middle: str
    suffix: str  # the whole file after the middle
    previous: str  # the non-blank line(s) just before the middle (baseline)


def package_files(package: str) -> tuple[str, list[Path]]:
    if package in CORPUS_PACKAGES:
        raise SystemExit(f"{package!r} is in the training corpus (train/corpus.py): it cannot be a held-out set")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed")
    root = Path(list(spec.submodule_search_locations)[0])
    version = importlib.metadata.version(package)
    return version, sorted(root.rglob("*.py"))


def make_cases(package: str, n_single: int, n_multi: int, seed: int = 0) -> tuple[str, list[Case]]:
    version, files = package_files(package)
    sources = []
    for p in files:
        text = p.read_text(encoding="utf-8")
        try:
            ast.parse(text)
        except SyntaxError:
            continue
        if text.count("\n") >= 20:
            sources.append((p.name, text))
    rng = random.Random(seed)
    weights = [len(t) for _, t in sources]
    cases: list[Case] = []
    seen = set()
    for kind, want in (("single", n_single), ("multi", n_multi)):
        got = 0
        while got < want:
            name, text = rng.choices(sources, weights)[0]
            lines = text.split("\n")
            k = 1 if kind == "single" else rng.randint(2, 4)
            i = rng.randrange(5, len(lines) - k - 1)
            block = lines[i:i + k]
            if (name, i, k) in seen or not block[0].strip() or not block[-1].strip():
                continue
            if any(len(line) > 120 for line in block) or sum(bool(line.strip()) for line in block) < k:
                continue
            seen.add((name, i, k))
            prefix = "\n".join(lines[:i]) + "\n"
            middle = "\n".join(block)
            suffix = "\n" + "\n".join(lines[i + k:])
            before = [line for line in lines[:i] if line.strip()]
            previous = "\n".join(before[-k:])
            cases.append(Case(kind, name, prefix, middle, suffix, previous))
            got += 1
    return version, cases


def parses(text: str) -> bool:
    try:
        ast.parse(text)
        return True
    except (SyntaxError, ValueError):
        return False


def window(prefix: str, suffix: str, prefix_chars: int, suffix_chars: int) -> tuple[str, str]:
    """What an editor sends: the last prefix_chars before the cursor (from a line start) and the
    first suffix_chars after it (to a line end)."""
    if len(prefix) > prefix_chars:
        cut = prefix.find("\n", len(prefix) - prefix_chars)
        prefix = prefix[cut + 1:] if cut >= 0 else prefix[-prefix_chars:]
    if len(suffix) > suffix_chars:
        cut = suffix.rfind("\n", 0, suffix_chars)
        suffix = suffix[:cut] if cut > 0 else suffix[:suffix_chars]
    return prefix, suffix


def predict(engine, cases: list[Case], prefix_chars: int = 2000, suffix_chars: int = 1000
            ) -> tuple[list[str], list[float]]:
    """The engine's best middle for every case, asked for as an editor would (windowed context,
    a budget by kind, the case's index as seed), and the seconds each fill took."""
    preds, times = [], []
    for i, c in enumerate(cases):
        prefix, suffix = window(c.prefix, c.suffix, prefix_chars, suffix_chars)
        t = time.time()
        res = engine.fill(prefix, suffix, max_tokens=64 if c.kind == "single" else 160, seed=i)
        times.append(time.time() - t)
        preds.append(res.completions[0].text if res.completions else "")
    return preds, times


def score(cases: list[Case], preds: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for kind in ("single", "multi", "all"):
        idx = [i for i, c in enumerate(cases) if kind == "all" or c.kind == kind]
        if not idx:
            continue
        em = sum(preds[i].strip() == cases[i].middle.strip() for i in idx) / len(idx)
        es = sum(edit_similarity(preds[i], cases[i].middle) for i in idx) / len(idx)
        ok = sum(parses(cases[i].prefix + preds[i] + cases[i].suffix) for i in idx) / len(idx)
        out[kind] = {"n": len(idx), "em": em, "es": es, "ast": ok}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--package", default="click")
    ap.add_argument("--single", type=int, default=100)
    ap.add_argument("--multi", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0, help="case selection seed")
    ap.add_argument("--prefix-chars", type=int, default=2000)
    ap.add_argument("--suffix-chars", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--show", type=int, default=0, help="print the first N cases with predictions")
    ap.add_argument("--write-benchmarks", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from dgemma.engine.engine import Engine
    from dgemma.engine.loading import load_model

    version, cases = make_cases(args.package, args.single, args.multi, args.seed)
    t0 = time.time()
    loaded = load_model(args.model)
    load_s = time.time() - t0
    engine = Engine(loaded)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    preds, times = predict(engine, cases, args.prefix_chars, args.suffix_chars)
    for c, pred in list(zip(cases, preds))[:args.show]:
        print(f"--- {c.kind} {c.file}\nREF : {c.middle!r}\nPRED: {pred!r}")
    results = {
        "model": score(cases, preds),
        "empty middle": score(cases, [""] * len(cases)),
        "repeat previous line": score(cases, [c.previous.split("\n")[-1] for c in cases]),
        "repeat previous k lines (k from the reference)": score(cases, [c.previous for c in cases]),
    }
    times.sort()
    lines = [
        f"Held-out set: `{args.package}` {version} (site-packages; not in the training corpus), "
        f"{args.single} single-line + {args.multi} multi-line (2-4 lines) middles, case seed {args.seed}; "
        f"prefix window {args.prefix_chars} chars, suffix window {args.suffix_chars} chars.",
        "",
        "| predictor | EM single | ES single | AST-valid single | EM multi | ES multi | AST-valid multi | EM all | ES all |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s, m, a = r.get("single", {}), r.get("multi", {}), r["all"]
        f = lambda d, k: f"{d[k]:.3f}" if d else "-"  # noqa: E731
        lines.append(f"| {name} | {f(s, 'em')} | {f(s, 'es')} | {f(s, 'ast')} | {f(m, 'em')} | {f(m, 'es')} | "
                     f"{f(m, 'ast')} | {a['em']:.3f} | {a['es']:.3f} |")
    lines += [
        "",
        f"Model: `{loaded.name}` ({n_params / 1e6:.1f} M parameters loaded, {loaded.dtype}, {loaded.device}), "
        f"loaded in {load_s:.2f} s; fill latency median {times[len(times) // 2]:.2f} s, "
        f"p90 {times[int(len(times) * 0.9)]:.2f} s; sampler {engine.settings.to_dict()} (the checkpoint's generation_config.json and dgemma_sampler.json).",
        f"Machine: {torch.get_num_threads()}-thread CPU run, `{cpu_name()}` (shared with other jobs, so latency is noisy); "
        f"torch {torch.__version__}, Python {sys.version.split()[0]}; {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"Command: `python bench/infill_eval.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
    ]
    table = "\n".join(lines)
    print(table)
    if args.write_benchmarks:
        write_section(table)


SECTION = "## Bundled model quality"


def write_section(body: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{SECTION}\n\n{body}\n"
    if SECTION in text:
        # The table is replaced up to its Command: line; notes written below it stay.
        start = text.index(SECTION)
        command = text.find("\nCommand: `python bench/infill_eval.py", start)
        nxt = text.find("\n## ", start + len(SECTION))
        if command >= 0 and (nxt < 0 or command < nxt):
            end = text.find("\n", command + 1)
            rest = text[end + 1:] if end >= 0 else ""
        else:
            rest = text[nxt:] if nxt >= 0 else ""
        text = text[:start] + block + rest
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
