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


def answer(engine: FillEngine, method: str, kwargs: dict[str, Any], **control: Any) -> Result:
    """Run a `fill` or `edit` (kwargs from `daemon/codec.py` `engine_kwargs`; control: settings, on_step,
    cancel, deadline) and clean its completions. An edit without an instruction regenerates the
    selection as the middle between what surrounds it. A cleaned text of "" means nothing to apply."""
    kwargs = dict(kwargs)
    prefix, suffix = kwargs["prefix"], kwargs["suffix"]
    if method == "fill":
        max_lines = kwargs.pop("max_lines", None)
        res = engine.fill(**kwargs, **control)
        return _cleaned(res, lambda text: postprocess(text, prefix, suffix, max_lines=max_lines))
    selection = kwargs["selection"]
    if kwargs["instruction"].strip():
        res = engine.edit(**kwargs, **control)
        return _cleaned(res, lambda text: clean_replacement(text, selection, prefix, suffix))
    del kwargs["selection"], kwargs["instruction"], kwargs["strength"]
    res = engine.fill(**kwargs, **control)
    return _cleaned(res, lambda text: clean_replacement(postprocess(text, prefix, suffix), selection, prefix, suffix))


def _cleaned(res: Result, clean: Callable[[str], str]) -> Result:
    return dataclasses.replace(res, completions=[dataclasses.replace(c, text=clean(c.text))
                                                 for c in res.completions])
