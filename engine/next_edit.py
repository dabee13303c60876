"""Next-edit suggestions: after the user's recent edits, the edit that follows, anywhere in a region
of whole lines around the cursor and the last edit (docs/protocol.md, `next_edit`).

The region's current text seeds the canvas, partly renoised (`FillEngine.edit`), the recent edits
are in the prompt as a unified diff, and the text around the region is pinned as prefix and suffix.
The answer is diffed against the region into the smallest line hunks, so nothing outside the region
can change; a region that comes back unchanged, or changed only back to what it was before the
user's last edit, is no suggestion.
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dgemma.engine.api import FillEngine, Result
from dgemma.engine.answers import regeneration_minimum
from dgemma.engine.postprocess import clean_replacement

DEFAULT_REGION_LINES = 20
MAX_REGION_LINES = 60
# Share of the region's tokens put back to noise. The model rewrites every position of the canvas
# anyway; a little noise lets it leave the seed where it disagrees, and more makes it start over
# (bench/next_edit_eval.py measures the choice).
DEFAULT_STRENGTH = 0.1
MAX_RECENT_EDITS = 16
PROMPT_EDIT_CHARS = 2000  # per recent edit in the prompt: a pasted file is not a pattern to follow
# A next edit is small (a renamed use, an added argument): an answer that rewrites more of the
# region than this is the model starting over, not a suggestion, and is dropped.
MAX_CHANGED_SHARE = 0.5


@dataclass(frozen=True)
class LineEdit:
    """Lines ``start_line`` to ``end_line`` (0-based, end exclusive) replaced by ``text`` (whole
    lines with their line ends; "" deletes them, and start == end inserts before start)."""

    start_line: int
    end_line: int
    text: str


@dataclass(frozen=True)
class RecentEdit:
    """One of the user's edits: the whole lines ``old`` became ``new``, which starts at 0-based line
    ``line`` of the text as it was right after the edit (for the last edit: the text as sent)."""

    line: int
    old: str
    new: str


@dataclass
class Suggestion:
    edits: list[LineEdit]
    region: tuple[int, int]  # the lines the model could change (0-based, end exclusive)
    result: Result | None  # None when there was nothing to decode (an empty document)


def lines_of(text: str) -> list[str]:
    """The text's lines, each with its line end (a last line without one stays so). Split at "\n"
    only, as editors and git count lines (str.splitlines also splits at a lone \r, U+2028...)."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    return lines + [parts[-1]] if parts[-1] else lines


def line_hunks(old: str, new: str) -> list[tuple[int, int, int, int]]:
    """Where ``new`` differs from ``old``, line by line: (i1, i2, j1, j2) with old lines i1:i2
    replaced by new lines j1:j2, the smallest hunks first to last. Common leading and trailing
    lines are cut before the matcher runs, so a keystroke in a long file costs one pass."""
    a, b = lines_of(old), lines_of(new)
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    matcher = difflib.SequenceMatcher(None, a[head:len(a) - tail], b[head:len(b) - tail], autojunk=False)
    return [(i1 + head, i2 + head, j1 + head, j2 + head)
            for op, i1, i2, j1, j2 in matcher.get_opcodes() if op != "equal"]


def recent_edits_between(old: str, new: str) -> list[RecentEdit]:
    """The edits that turned ``old`` into ``new``, as `RecentEdit`s in ``new``'s lines."""
    a, b = lines_of(old), lines_of(new)
    return [RecentEdit(j1, "".join(a[i1:i2]), "".join(b[j1:j2])) for i1, i2, j1, j2 in line_hunks(old, new)]


def pick_region(line_count: int, cursor_line: int, last: RecentEdit | None, size: int) -> tuple[int, int]:
    """``size`` whole lines around the cursor, stretched to hold the last edit's lines when both fit;
    the rest split above and below."""
    cursor_line = max(0, min(cursor_line, line_count - 1))
    low, high = cursor_line, cursor_line + 1
    if last is not None:
        start = max(0, min(last.line, line_count - 1))
        end = max(start + 1, min(line_count, last.line + len(lines_of(last.new))))
        if max(high, end) - min(low, start) <= size:
            low, high = min(low, start), max(high, end)
    spare = max(0, size - (high - low))
    low = max(0, low - spare // 2)
    high = min(line_count, low + max(size, high - low))
    low = max(0, min(low, high - size))
    return low, high


def edits_prompt(recent: list[RecentEdit], path: str | None) -> str:
    """The instruction the model reads: the recent edits as a unified diff, oldest first."""
    name = path or "the file"
    parts = [f"Recent edits to {name}:", "```diff"]
    for edit in recent:
        old, new = lines_of(edit.old), lines_of(edit.new)
        parts.append(f"@@ -{edit.line + 1},{len(old)} +{edit.line + 1},{len(new)} @@")
        body = [f"-{line.rstrip()}" for line in old] + [f"+{line.rstrip()}" for line in new]
        parts.append("\n".join(body)[:PROMPT_EDIT_CHARS])
    parts += ["```", "Rewrite the code with the next edit that these edits call for; keep what needs no change."]
    return "\n".join(parts)


def region_edits(lines: list[str], region: tuple[int, int], answer: str) -> list[LineEdit]:
    """The smallest line edits that turn the region's lines into ``answer``, in document lines."""
    start, end = region
    return [LineEdit(start + i1, start + i2, "".join(lines_of(answer)[j1:j2]))
            for i1, i2, j1, j2 in line_hunks("".join(lines[start:end]), answer)]


def apply_edits(lines: list[str], edits: list[LineEdit]) -> list[str]:
    """``lines`` with ``edits`` (sorted, not overlapping) applied."""
    out, at = [], 0
    for e in edits:
        out += lines[at:e.start_line] + lines_of(e.text)
        at = e.end_line
    return out + lines[at:]


def changed_lines(edits: list[LineEdit]) -> int:
    """Lines the edits replace or insert, whichever is more per hunk."""
    return sum(max(e.end_line - e.start_line, len(lines_of(e.text))) for e in edits)


def undoes(lines: list[str], edits: list[LineEdit], last: RecentEdit | None) -> bool:
    """The edits only take the text back to what it was before the user's last edit."""
    if last is None or not edits:
        return False
    new = lines_of(last.new)
    before = lines[:last.line] + lines_of(last.old) + lines[last.line + len(new):]
    return apply_edits(lines, edits) == before


def suggest(engine: FillEngine, text: str, cursor_line: int, recent: list[RecentEdit], *,
            path: str | None = None, region_lines: int = DEFAULT_REGION_LINES, strength: float = DEFAULT_STRENGTH,
            n: int = 1, seed: int | None = None, **control: Any) -> Suggestion:
    """The next edit in ``text`` after ``recent`` (oldest first), in a region about ``cursor_line``;
    control: settings, on_step, cancel, deadline, as `FillEngine.edit` takes them."""
    lines = lines_of(text)
    last = recent[-1] if recent else None
    if not lines:
        return Suggestion([], (0, 0), None)
    region = pick_region(len(lines), cursor_line, last, region_lines)
    prefix, selection, suffix = ("".join(lines[:region[0]]), "".join(lines[region[0]:region[1]]),
                                 "".join(lines[region[1]:]))

    def edits_of(raw: str) -> list[LineEdit] | None:
        """The answer's edits; None when it is no suggestion (empty, only an undo, a rewrite)."""
        cleaned = clean_replacement(raw, selection, prefix, suffix)
        if not cleaned:
            return None
        edits = region_edits(lines, region, cleaned)
        if undoes(lines, edits, last) or changed_lines(edits) > MAX_CHANGED_SHARE * (region[1] - region[0]):
            return None
        return edits

    accept: Callable[[str], bool] = lambda raw: edits_of(raw) is not None
    res = engine.edit(prefix, selection, suffix, edits_prompt(recent, path), n=n, strength=strength,
                      min_tokens=regeneration_minimum(selection), accept=accept, seed=seed, **control)
    for completion in res.completions:
        edits = edits_of(completion.text)
        if edits is not None:
            return Suggestion(edits, region, res)
    return Suggestion([], region, dataclasses.replace(res, completions=[]))
