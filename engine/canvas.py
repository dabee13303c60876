"""Canvas plans: how a request becomes the rows of one batched canvas (see docs/engine.md).

A row is C positions: ``m`` free slots followed by a pinned tail. The slots start as uniform noise
(fill) or as the selection's tokens partly renoised (edit); the tail holds the suffix's first tokens,
then ``<eos>`` and ``<pad>``, and is never resampled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class CanvasPlan:
    tokens: torch.Tensor  # (B, C) long: the canvas the first denoising step sees
    pinned: torch.Tensor  # (B, C) bool: positions that are fixed for the whole loop
    slots: list[int]  # free slots per row; they always come first
    # (B, C) bool, on the host: free slots where the middle may not end yet (no <eos>, no <pad>), so
    # a request for code cannot come back empty. On the host so that finding them costs no sync.
    unended: torch.Tensor | None = None


def slot_candidates(canvas_length: int, max_tokens: int) -> list[int]:
    """Middle lengths decoded side by side: a quarter, half, three quarters of the canvas and all
    but an eighth (the smallest pinned tail that still shows the model the suffix), each capped by
    the token budget. The model fills a row's spare slots with ``<eos> <pad>...``."""
    longest = canvas_length - max(1, canvas_length // 8)
    wanted = [canvas_length // 4, canvas_length // 2, (3 * canvas_length) // 4, longest]
    cap = max(1, min(max_tokens, longest))
    return sorted({max(1, min(m, cap)) for m in wanted})


def line_slots(line_canvas: int, max_tokens: int) -> list[int]:
    """Middle lengths for a fill of one line, on a canvas of ``line_canvas`` positions: half and
    three quarters of it, each capped by the token budget. A line rarely needs more than half
    (click's lines: median 10 tokens, at most 31 on the bundled tokenizer), and the pinned suffix
    head after the slots keeps the next line in view."""
    cap = max(1, min(max_tokens, line_canvas - max(1, line_canvas // 8)))
    return sorted({max(1, min(m, cap)) for m in (line_canvas // 2, (3 * line_canvas) // 4)})


Row = tuple[int, Optional[list[int]]]  # (free slots, the tokens they start from, or None for noise)


@dataclass(frozen=True)
class FillPlan:
    """Which rows a fill decodes, canvas by canvas (docs/engine.md, "Choosing a row" and "One
    line"). A fill of one line (``line``) decodes one short canvas of ``canvas`` positions, the
    two `line_slots` lengths; any other fill decodes every `slot_candidates` length per canvas of
    the model's size. The first canvas also starts rows from the ``drafts`` (token lists), and
    draws every layout ``draws`` times; later canvases continue a middle already begun, once."""

    canvas: int
    line: bool
    draws: int
    min_tokens: int = 0  # every length at least this (capped by the longest)
    drafts: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def of(cls, canvas_length: int, line_canvas: int, max_lines: int | None, draws: int, line_draws: int,
           min_tokens: int = 0, drafts: list[list[int]] | tuple = ()) -> FillPlan:
        line = max_lines == 1 and line_canvas > 0
        return cls(canvas=min(canvas_length, line_canvas) if line else canvas_length, line=line,
                   draws=line_draws if line else draws, min_tokens=min_tokens,
                   drafts=tuple(tuple(d) for d in drafts))

    def rows(self, block: int, budget: int) -> list[Row]:
        if self.line and block > 0:
            return []  # one line fits the first canvas: a row that ran out of slots is cut there
        lengths = line_slots(self.canvas, budget) if self.line else slot_candidates(self.canvas, budget)
        lengths = sorted({max(m, min(self.min_tokens, lengths[-1])) for m in lengths})
        rows: list[Row] = [(m, None) for m in lengths]
        if block > 0:
            return rows
        return (rows + [(lengths[-1], list(d)) for d in self.drafts]) * self.draws

    def decoder_tokens(self, budget: int) -> int:
        """Positions one denoising step of the first canvas runs through the decoder."""
        return len(self.rows(0, budget)) * self.canvas


def line_drafts(prefix: str) -> list[str]:
    """Seeds for fill rows when the cursor starts a line: the last non-blank line above it and the
    last two, less the indentation the cursor's line already has. Code repeats itself nearby
    (the next line is often the previous one with a name changed); a row seeded with such a draft,
    partly renoised, lets the model write that change instead of a line from nothing. Empty when
    the cursor is inside a line's code: a whole line is not what comes next there."""
    head, _, current = prefix.rpartition("\n")
    if current.strip():
        return []
    lines = [line for line in head.split("\n") if line.strip()]
    drafts = []
    for k in (1, 2):
        if len(lines) >= k:
            text = "\n".join(lines[-k:])
            drafts.append(text[len(current):] if text.startswith(current) else text.lstrip())
    return list(dict.fromkeys(drafts))


def pinned_tail(suffix_ids: list[int], length: int, eos_id: int, pad_id: int) -> list[int]:
    """The first ``length`` tokens of ``suffix + <eos> + <pad>*``."""
    tail = list(suffix_ids[:length])
    if len(tail) < length:
        tail.append(eos_id)
    tail.extend([pad_id] * (length - len(tail)))
    return tail


def plan_rows(noise: torch.Tensor, slots: list[int], suffix_ids: list[int], eos_id: int, pad_id: int,
              seeds: list[list[int]] | None = None, renoise: torch.Tensor | None = None,
              min_tokens: int = 0) -> CanvasPlan:
    """Rows of ``noise`` (B, C) with ``slots[i]`` free slots and the pinned suffix tail.

    ``seeds[i]`` (edit) are the tokens the slots start from instead of noise; ``renoise`` (B, C) bool
    marks the seeded slots that are put back to noise anyway, so the model may change them.
    The first ``min_tokens`` slots of every row may not end the middle (``CanvasPlan.unended``).
    """
    batch, canvas_length = noise.shape
    tokens = noise.clone()
    pinned = torch.zeros_like(noise, dtype=torch.bool)
    for row, m in enumerate(slots):
        tail = pinned_tail(suffix_ids, canvas_length - m, eos_id, pad_id)
        tokens[row, m:] = torch.tensor(tail, dtype=tokens.dtype)
        pinned[row, m:] = True
        if seeds is not None:
            seed = torch.tensor(pinned_tail(seeds[row], m, eos_id, pad_id), dtype=tokens.dtype)
            keep = ~renoise[row, :m] if renoise is not None else torch.ones(m, dtype=torch.bool)
            tokens[row, :m] = torch.where(keep, seed, noise[row, :m])
    unended = None
    if min_tokens > 0:
        columns = torch.arange(canvas_length)
        unended = torch.stack([columns < min(min_tokens, m) for m in slots])
    return CanvasPlan(tokens=tokens, pinned=pinned, slots=list(slots), unended=unended)


def slot_tokens(row: list[int], m: int, eos_id: int) -> tuple[list[int], bool]:
    """The middle a finished row holds: its slots up to the first ``<eos>``, and whether it ended."""
    middle = row[:m]
    if eos_id in middle:
        return middle[: middle.index(eos_id)], True
    return middle, False
