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
from dgemma.engine import next_edit
from dgemma.engine.answers import answer, regeneration_budget
from dgemma.engine.api import Draft, FillEngine, Result
from dgemma.engine.settings import check_settings
from dgemma.errors import DgemmaError


def engine_kwargs(method: str, params: dict[str, Any], limits: Limits, *, read_files: bool = True) -> dict[str, Any]:
    """Validated keyword arguments for Engine.fill / Engine.edit (or next_edit.suggest) from request
    params. ``read_files``: a `path` may stand for the document (the daemon, on the user's machine;
    not a team server)."""
    p = proto.param
    if method == "next_edit":
        return next_edit_kwargs(params, limits, read_files)
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


def next_edit_kwargs(params: dict[str, Any], limits: Limits, read_files: bool) -> dict[str, Any]:
    """`next_edit`'s params: the document (``text``, or ``path`` for the daemon to read), the
    cursor, the recent edits, the region's size. They stay wire-shaped (a team replica gets them
    as they are); `run_request` makes them `next_edit.RecentEdit`s."""
    p = proto.param
    path = p(params, "path", str, None)
    text = p(params, "text", str, None)
    if text is None:
        if path is None or not read_files:
            raise DgemmaError("invalid_params", "next_edit needs the document as `text`"
                              + (", or a `path` to read" if read_files else " (a team server reads no files)"))
        text = _read_document(path, limits.max_frame_bytes)
    cursor = p(params, "cursor", dict)
    line = p(cursor, "line", int, min=0, max=1 << 31)
    recent = p(params, "recent_edits", list, [])
    if len(recent) > next_edit.MAX_RECENT_EDITS:
        recent = recent[-next_edit.MAX_RECENT_EDITS:]  # the oldest matter least
    checked = []
    for i, edit in enumerate(recent):
        if not isinstance(edit, dict):
            raise DgemmaError("invalid_params", f"recent_edits[{i}] must be a map of line, old and new")
        checked.append({"line": p(edit, "line", int, min=0, max=1 << 31), "old": p(edit, "old", str, ""),
                        "new": p(edit, "new", str, "")})
    return {"text": text, "path": path, "cursor": {"line": line, "character": p(cursor, "character", int, 0, min=0)},
            "recent_edits": checked,
            "region_lines": p(params, "region_lines", int, next_edit.DEFAULT_REGION_LINES, min=1,
                              max=next_edit.MAX_REGION_LINES),
            "strength": p(params, "strength", float, next_edit.DEFAULT_STRENGTH, min=0.0, max=1.0),
            "n": p(params, "n", int, 1, min=1, max=limits.max_n),
            "seed": p(params, "seed", int, None, min=-(1 << 63), max=(1 << 64) - 1)}


def _read_document(path: str, limit: int) -> str:
    """The file a `next_edit` names, read as the daemon's user (clients run as the same user)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise DgemmaError("invalid_params", f"cannot read {proto.clip(path, 200)}: {exc.strerror}") from None
    if len(data) > limit:
        raise DgemmaError("too_large", f"{proto.clip(path, 200)} is over the limit of {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise DgemmaError("invalid_params", f"{proto.clip(path, 200)} is not UTF-8 text") from None


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
    if method == "next_edit":
        return _next_edit(engine, kwargs, on_step=on_step, cancel=cancel, deadline=deadline)
    res = answer(engine, method, kwargs, on_step=on_step, cancel=cancel, deadline=deadline)
    return result_payload(res, engine.model_name)


def _next_edit(engine: FillEngine, kwargs: dict[str, Any], **control: Any) -> dict[str, Any]:
    kwargs = dict(kwargs)
    recent = [next_edit.RecentEdit(**e) for e in kwargs.pop("recent_edits")]
    cursor = kwargs.pop("cursor")
    found = next_edit.suggest(engine, kwargs.pop("text"), cursor["line"], recent, **kwargs, **control)
    payload = result_payload(found.result, engine.model_name) if found.result else {
        "model": engine.model_name, "steps": 0, "ms": 0.0}
    payload.pop("completions", None)
    payload["edits"] = [{"start_line": e.start_line, "end_line": e.end_line, "text": e.text} for e in found.edits]
    payload["region"] = {"start_line": found.region[0], "end_line": found.region[1]}
    return payload
