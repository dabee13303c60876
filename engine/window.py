"""Fit a request's code into the model's context: the part nearest the cursor, cut at line starts.

Only the prefix goes through the encoder (the suffix's head is pinned in the canvas), so the
prefix is what can overflow. Its window keeps the lines nearest the cursor and starts on a line
whose number in the text is a multiple of ``ALIGN_LINES``: as the cursor moves down, the start
stays put for many lines, so the prefix cache (longest cached prefix of the new ids) still holds
all but the last lines, and re-encodes only those. A start that moved with every line would miss
the cache at every line.

Tokenizing is the expensive part of a huge text (seconds for 8 MiB), so the text is first cut by
characters: a token covers at most ``max_token_chars`` characters, so the last
``budget * max_token_chars`` characters always hold more than ``budget`` tokens, and nothing the
window could keep is lost. A shorter cut is tried first, and kept when it already holds more
than ``budget`` tokens (the window then lies inside it too).
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass

ALIGN_LINES = 16
# Where no tokenizer is at hand (the language server's budgets, an answer's size before the
# request): code runs about 3-4 characters a token, and 3 errs towards more tokens.
CHARS_PER_TOKEN = 3

# text -> (token ids, (start, end) character offsets of each)
Encoder = Callable[[str], tuple[list[int], list[tuple[int, int]]]]


@dataclass(frozen=True)
class Cut:
    ids: list[int]
    offsets: list[tuple[int, int]]  # into the kept text: text[dropped:] (prefix), text (suffix)
    dropped: int  # characters the model does not see: before the window (prefix), after it (suffix)


def _grid_line_starts(text: str, lo: int) -> Iterator[int]:
    """Offsets >= lo of the line starts whose line number is a multiple of ALIGN_LINES."""
    pos = text.find("\n", lo - 1) + 1 if lo else 0  # the first line start at or after lo
    if lo and not pos:
        return
    line = text.count("\n", 0, pos)
    while True:
        if line % ALIGN_LINES == 0:
            yield pos
        nl = text.find("\n", pos)
        if nl < 0:
            return
        pos, line = nl + 1, line + 1


def cut_prefix(text: str, budget: int, encode: Encoder, max_token_chars: int) -> Cut:
    """The longest tail of ``text`` in at most ``budget`` tokens that starts on a grid line; when
    even the lines since the last grid line do not fit (a huge line), the last ``budget`` tokens."""
    # Code runs 3-4 characters a token: a cut at 4 per token usually holds more than the budget,
    # and tokenizing ~20x less text saves tens of ms per request (BENCHMARKS.md); else the sure cut.
    for per_token in sorted({min(4, max_token_chars), max_token_chars}):
        lo = max(0, len(text) - budget * per_token)
        ids, offsets = encode(text[lo:])
        if lo == 0 or len(ids) > budget:
            break
    if lo == 0 and len(ids) <= budget:
        return Cut(ids, offsets, 0)
    starts = [lo + s for s, _ in offsets]
    for a in _grid_line_starts(text, lo):
        if len(starts) - bisect_left(starts, a) > budget:
            continue
        # The count above is of tokens of the longer text; the window is its own text's encoding.
        win_ids, win_offsets = encode(text[a:])
        if len(win_ids) <= budget:
            return Cut(win_ids, win_offsets, a)
    keep = max(0, len(ids) - budget)
    first = offsets[keep][0] if keep < len(ids) else len(text) - lo
    return Cut(ids[keep:], [(s - first, e - first) for s, e in offsets[keep:]], lo + first)


def cut_suffix(text: str, budget: int, encode: Encoder, max_token_chars: int) -> Cut:
    """The first ``budget`` tokens of ``text``: all a canvas can pin."""
    ids, offsets = encode(text[:budget * max_token_chars])
    if len(ids) <= budget and len(text) <= budget * max_token_chars:
        return Cut(ids, offsets, 0)
    ids, offsets = ids[:budget], offsets[:budget]
    return Cut(ids, offsets, len(text) - (offsets[-1][1] if offsets else 0))
