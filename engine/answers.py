"""A request's answer: the engine call its method asks for, and the text every client gets.

The daemon's worker and the command line's in-process path both call `answer`, and it cleans
every completion with the rules of `postprocess.py`: `dgemma fill`, `dgemma edit` and the
editors get the same text for the same request.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from dgemma.engine.api import FillEngine, Result
from dgemma.engine.postprocess import clean_replacement, postprocess
from dgemma.engine.window import CHARS_PER_TOKEN


def regeneration_budget(selection: str, cap: int) -> int:
    """max_tokens for regenerating ``selection`` without an instruction: 1.5x its estimated
    tokens plus slack, so a large region is not cut short, within ``cap``."""
    estimate = len(selection.encode("utf-8")) // CHARS_PER_TOKEN + 1
    return min(estimate * 3 // 2 + 64, cap)


def regeneration_minimum(selection: str) -> int:
    """min_tokens for rewriting ``selection``: none for a blank one; for code, half its estimated
    tokens, so that the answer is code of about its size, never an empty middle."""
    if not selection.strip():
        return 0
    return max(1, (len(selection.strip().encode("utf-8")) // CHARS_PER_TOKEN + 1) // 2)


def answer(engine: FillEngine, method: str, kwargs: dict[str, Any], **control: Any) -> Result:
    """Run a `fill` or `edit` (kwargs from `daemon/codec.py` `engine_kwargs`; control: settings, on_step,
    cancel, deadline) and clean its completions. An edit without an instruction regenerates the
    selection as the middle between what surrounds it. A cleaned text of "" means nothing to apply.

    A request that asks for code (an edit of code, a fill with ``min_tokens``) gets it: the engine's
    rows cannot end before the minimum, and rows that clean to nothing rank last."""
    kwargs = dict(kwargs)
    prefix, suffix = kwargs["prefix"], kwargs["suffix"]
    if method == "fill":
        max_lines = kwargs.get("max_lines")
        return _answered(engine.fill, kwargs, control,
                         lambda text: postprocess(text, prefix, suffix, max_lines=max_lines))
    selection = kwargs["selection"]
    minimum = regeneration_minimum(selection)
    kwargs["min_tokens"] = min(minimum, kwargs.get("max_tokens") or minimum)
    if kwargs["instruction"].strip():
        return _answered(engine.edit, kwargs, control, lambda text: clean_replacement(text, selection, prefix, suffix))
    del kwargs["selection"], kwargs["instruction"], kwargs["strength"]
    return _answered(engine.fill, kwargs, control,
                     lambda text: clean_replacement(postprocess(text, prefix, suffix), selection, prefix, suffix))


def _answered(run: Callable[..., Result], kwargs: dict[str, Any], control: dict[str, Any],
              clean: Callable[[str], str]) -> Result:
    if kwargs.get("min_tokens"):
        kwargs["accept"] = lambda text: bool(clean(text))
    res = run(**kwargs, **control)
    return dataclasses.replace(res, completions=[dataclasses.replace(c, text=clean(c.text))
                                                 for c in res.completions])
