"""Canvas plans: how a request becomes the rows of one batched canvas (see docs/engine.md).

A row is C positions: ``m`` free slots followed by a pinned tail. The slots start as uniform noise
(fill) or as the selection's tokens partly renoised (edit); the tail holds the suffix's first tokens,
then ``<eos>`` and ``<pad>``, and is never resampled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CanvasPlan:
    tokens: torch.Tensor  # (B, C) long: the canvas the first denoising step sees
    pinned: torch.Tensor  # (B, C) bool: positions that are fixed for the whole loop
    slots: list[int]  # free slots per row; they always come first


def slot_candidates(canvas_length: int, max_tokens: int) -> list[int]:
    """Middle lengths decoded side by side: a quarter, half, three quarters of the canvas and all
    but an eighth (the smallest pinned tail that still shows the model the suffix), each capped by
    the token budget. The model fills a row's spare slots with ``<eos> <pad>...``."""
    longest = canvas_length - max(1, canvas_length // 8)
    wanted = [canvas_length // 4, canvas_length // 2, (3 * canvas_length) // 4, longest]
    cap = max(1, min(max_tokens, longest))
    return sorted({max(1, min(m, cap)) for m in wanted})


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
              seeds: list[list[int]] | None = None, renoise: torch.Tensor | None = None) -> CanvasPlan:
    """Rows of ``noise`` (B, C) with ``slots[i]`` free slots and the pinned suffix tail.

    ``seeds[i]`` (edit) are the tokens the slots start from instead of noise; ``renoise`` (B, C) bool
    marks the seeded slots that are put back to noise anyway, so the model may change them.
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
    return CanvasPlan(tokens=tokens, pinned=pinned, slots=list(slots))


def slot_tokens(row: list[int], m: int, eos_id: int) -> tuple[list[int], bool]:
    """The middle a finished row holds: its slots up to the first ``<eos>``, and whether it ended."""
    middle = row[:m]
    if eos_id in middle:
        return middle[: middle.index(eos_id)], True
    return middle, False
