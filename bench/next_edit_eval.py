"""Next-edit suggestions on real history: does the model propose the edit a programmer made next?

    python bench/next_edit_eval.py --repo PATH [--limit 40] [--seed 0] [--strength 0.1 ...]
                                   [--model DIR] [--write]

Cases come from a git repository's history (one the bundled model never saw, e.g. a clone of
pallets/click): in a commit that changed a Python file in two hunks at most CLOSE lines apart
(each of at most SMALL lines), the first hunk is applied as the user's recent edit and the second
is the reference. Each case goes to a private daemon's `next_edit` as the language server sends
it (the cursor at the end of the first hunk, the default region). Scores, per strength: exact
match (the suggestion makes the region what the commit made it), edit similarity of the region
to the commit's, the share of cases with any suggestion, latency p50/p90; and the baseline
"no edit" (the region as it is). --write puts the section into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench/ is a folder beside the package; behind site-packages

from bench.machine import cpu_name  # noqa: E402
from bench.report import pct, write_section  # noqa: E402
from bench.private_daemon import private_daemon  # noqa: E402
from dgemma.engine.next_edit import (DEFAULT_REGION_LINES, LineEdit, RecentEdit, apply_edits, line_hunks,  # noqa: E402
                                     lines_of, pick_region)
from dgemma.engine.ranking import edit_similarity  # noqa: E402

CLOSE = 8  # lines between the two hunks, at most
SMALL = 6  # lines a hunk replaces or adds, at most
MAX_FILE_CHARS = 60_000


@dataclass(frozen=True)
class Case:
    commit: str
    path: str
    text: str  # the file with the first hunk applied
    recent: RecentEdit  # the first hunk, in text's lines
    expected: str  # the file as the commit left it
    cursor: int


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=True).stdout.decode(
        "utf-8", "replace")


def cut_cases(repo: Path, limit: int, seed: int) -> list[Case]:
    """Up to ``limit`` cases, one per commit at most, from a shuffled sample of the history."""
    commits = git(repo, "log", "--no-merges", "--format=%H", "-n", "3000", "--", "*.py").split()
    random.Random(seed).shuffle(commits)
    cases = []
    for sha in commits:
        if len(cases) == limit:
            break
        for path in git(repo, "show", "--format=", "--name-only", sha, "--", "*.py").split():
            try:
                old, new = git(repo, "show", f"{sha}^:{path}"), git(repo, "show", f"{sha}:{path}")
            except subprocess.CalledProcessError:
                continue  # added or deleted by the commit
            if len(new) > MAX_FILE_CHARS or "\r" in old + new:
                continue
            case = _case(sha, path, old, new)
            if case:
                cases.append(case)
                break
    return cases


def _case(sha: str, path: str, old: str, new: str) -> Case | None:
    hunks = line_hunks(old, new)
    if len(hunks) != 2:
        return None
    (i1, i2, j1, j2), (k1, k2, l1, l2) = hunks
    if k1 - i2 > CLOSE or max(i2 - i1, j2 - j1, k2 - k1, l2 - l1) > SMALL:
        return None
    a, b = lines_of(old), lines_of(new)
    middle = a[:i1] + b[j1:j2] + a[i2:]
    return Case(sha[:10], path, "".join(middle), RecentEdit(i1, "".join(a[i1:i2]), "".join(b[j1:j2])), new,
                cursor=max(i1, i1 + (j2 - j1) - 1))


def score(case: Case, edits: list[LineEdit]) -> tuple[bool, float, float]:
    """(exact, edit similarity, the same for "no edit") over the region the daemon would choose."""
    lines = lines_of(case.text)
    start, end = pick_region(len(lines), case.cursor, case.recent, DEFAULT_REGION_LINES)
    # The commit's region: the same lines, plus what the second hunk added or removed in them.
    growth = len(lines_of(case.expected)) - len(lines)
    want = "".join(lines_of(case.expected)[start:end + growth])
    suggested = apply_edits(lines, edits)  # inside the region: it grows or shrinks by the difference
    got = "".join(suggested[start:end + len(suggested) - len(lines)])
    now = "".join(lines[start:end])
    return got == want, edit_similarity(got, want), edit_similarity(now, want)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True, type=Path, help="a git repository (work tree or bare)")
    ap.add_argument("--limit", type=int, default=40, help="cases, one per commit")
    ap.add_argument("--seed", type=int, default=0, help="which commits are sampled")
    ap.add_argument("--strength", type=float, action="append", help="renoised share of the region (repeatable)")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    args = ap.parse_args()
    strengths = args.strength or [0.1]
    cases = cut_cases(args.repo, args.limit, args.seed)
    if not cases:
        sys.exit(f"no cases in {args.repo}: no commit changes a Python file in two close, small hunks")
    head = git(args.repo, "rev-parse", "--short", "HEAD").strip()
    rows: dict[float, list[dict]] = {s: [] for s in strengths}
    model = args.model or "bundled"
    with private_daemon(args.model) as client:
        for i, case in enumerate(cases):
            for strength in strengths:
                t0 = time.perf_counter()
                res = client.request("next_edit", {
                    "text": case.text, "path": case.path, "cursor": {"line": case.cursor, "character": 0},
                    "recent_edits": [vars(case.recent)], "strength": strength, "seed": i, "stream": False})
                seconds = time.perf_counter() - t0
                model = res.get("model") or model
                edits = [LineEdit(**e) for e in res["edits"]]
                exact, es, baseline = score(case, edits)
                rows[strength].append({"s": seconds, "exact": exact, "es": es, "base": baseline,
                                       "suggested": bool(edits)})
            print(f"case {i + 1}/{len(cases)}", file=sys.stderr, end="\r", flush=True)

    import torch

    machine = (f"{cpu_name()}, torch {torch.__version__}, "
               f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}")
    first = rows[strengths[0]]
    table = [f"| no edit (baseline) | {len(first)} | 0% | {statistics.mean(r['base'] for r in first):.3f} | 0% | - | - |"]
    for strength, r in rows.items():
        s = [x["s"] for x in r]
        table.append(f"| strength {strength} | {len(r)} | {sum(x['exact'] for x in r) / len(r):.0%} | "
                     f"{statistics.mean(x['es'] for x in r):.3f} | {sum(x['suggested'] for x in r) / len(r):.0%} | "
                     f"{pct(s, 0.5):.2f} | {pct(s, 0.9):.2f} |")
    command = "python bench/next_edit_eval.py" + "".join(f" {a}" for a in sys.argv[1:])
    section = f"""## Next edit

`{command}` on {time.strftime('%Y-%m-%d')}: {machine}; model `{model}`; {len(cases)} cases from the
history of `{args.repo}` (at {head}, seed {args.seed}): commits that changed a Python
file in two hunks at most {CLOSE} lines apart, each of at most {SMALL} lines; the first hunk is the
recent edit, the second the reference. Through a private daemon's `next_edit`, the default region
({DEFAULT_REGION_LINES} lines). Exact: the suggestion makes the region what the commit made it; edit
similarity of the region after the suggestion to the commit's; suggested: cases with any edit.

| | cases | exact | edit similarity | suggested | p50 s | p90 s |
|---|---|---|---|---|---|---|
{chr(10).join(table)}
"""
    print(section)
    if args.write:
        write_section(section)


if __name__ == "__main__":
    main()
