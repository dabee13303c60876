"""One codec for a request and its answer, wherever the engine runs: the daemon's worker, a team
server's replica (cluster/app.py) and the command line's in-process path all validate params with
`engine_kwargs` and answer with `run_request`, so each gives the same result map for the same request.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from dgemma.daemon import protocol as proto
from dgemma.daemon.config import Limits
from dgemma.engine.answers import answer, regeneration_budget
from dgemma.engine.api import Draft, FillEngine, Result
from dgemma.engine.settings import check_settings


def engine_kwargs(method: str, params: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """Validated keyword arguments for Engine.fill / Engine.edit from request params."""
    p = proto.param
    kwargs: dict[str, Any] = {
        "prefix": p(params, "prefix", str),
        "suffix": p(params, "suffix", str, ""),
        "n": p(params, "n", int, 1, min=1, max=limits.max_n),
        "seed": p(params, "seed", int, None, min=-(1 << 63), max=(1 << 64) - 1),  # what torch takes
    }
    max_tokens = p(params, "max_tokens", int, None, min=1, max=limits.max_tokens)
    if method == "fill":
        kwargs["max_tokens"] = max_tokens if max_tokens is not None else min(256, limits.max_tokens)
        kwargs["max_lines"] = p(params, "max_lines", int, None, min=1, max=1 << 20)
        # An explicit request for code (`dgemma fill`, an invoked completion) asks for at least this.
        kwargs["min_tokens"] = p(params, "min_tokens", int, 0, min=0, max=kwargs["max_tokens"])
    else:
        kwargs["selection"] = p(params, "selection", str)
        kwargs["instruction"] = p(params, "instruction", str, "")
        kwargs["strength"] = p(params, "strength", float, 0.5, min=0.0, max=1.0)
        if max_tokens is None and not kwargs["instruction"].strip():
            max_tokens = regeneration_budget(kwargs["selection"], limits.max_tokens)
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
    return kwargs


@dataclass(frozen=True)
class Controls:
    """How a request runs, beside what it asks the engine."""
    settings: dict[str, Any]  # sampler overrides, each checked (the engine checks how they combine)
    stream: bool  # send drafts
    deadline: float | None  # the time.monotonic() by which it ends, from `deadline_ms`


def request_controls(params: dict[str, Any]) -> Controls:
    """A request's controls from its params, checked at the door."""
    deadline_ms = proto.param(params, "deadline_ms", (int, float), None, min=0)
    return Controls(settings=check_settings(proto.param(params, "settings", dict, {})),
                    stream=proto.param(params, "stream", bool, True),
                    deadline=None if deadline_ms is None else time.monotonic() + deadline_ms / 1000)


def result_payload(res: Result, model_name: str | None) -> dict[str, Any]:
    """An engine Result as the wire's `result` map."""
    return {
        "completions": [{"text": c.text, "score": float(c.score), "agreement": float(c.agreement),
                         "fit": None if c.fit is None else float(c.fit)}
                        for c in res.completions],
        "model": model_name or res.model,
        "steps": int(res.steps),
        "ms": float(res.ms),
        "cached_tokens": int(res.cached_tokens),
        "prompt_tokens": int(res.prompt_tokens),
        "prefix_dropped": int(res.prefix_dropped),
        "suffix_dropped": int(res.suffix_dropped),
        "canvases": int(res.canvases),
        "rows": int(res.rows),
    }


def run_request(engine: FillEngine, method: str, kwargs: dict[str, Any], settings: dict[str, Any], *,
                on_step: Callable[[Draft], None] | None = None, cancel: Any = None,
                deadline: float | None = None) -> dict[str, Any]:
    """Answer a request (kwargs from `engine_kwargs`; settings: the config's sampler overlaid with
    the request's, which the engine overlays on its defaults and validates) as the `result` map."""
    if settings:
        kwargs = {**kwargs, "settings": settings}
    res = answer(engine, method, kwargs, on_step=on_step, cancel=cancel, deadline=deadline)
    return result_payload(res, engine.model_name)
