"""The language server's side of the daemon: connect (starting it on demand), wait for
the model, run fills, edits and next edits, and remember a load failure so keystrokes stop
hammering a daemon that cannot serve.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

from dgemma.errors import DgemmaError

log = logging.getLogger("dgemma.lsp.backend")

# state, human message, extra details (model name, error code)
StateCallback = Callable[[str, str, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class FillResult:
    text: str
    ms: float = 0.0  # the engine's own time for this request
    steps: int = 0
    model: str | None = None
    queue_ms: float = 0.0


class Backend(Protocol):
    state: str
    retry_after_s: float  # seconds before asking again a daemon whose model failed to load

    async def ensure_ready(self) -> None: ...

    def should_try(self, automatic: bool) -> bool: ...

    async def fill(self, prefix: str, suffix: str, *, document: str, max_tokens: int, n: int = 1,
                   seed: int | None = None, sampler: dict[str, Any] | None = None,
                   max_lines: int | None = None, min_tokens: int = 0) -> FillResult: ...

    async def edit(self, prefix: str, selection: str, suffix: str, instruction: str, *, document: str,
                   strength: float = 0.5, seed: int | None = None, max_tokens: int | None = None,
                   sampler: dict[str, Any] | None = None) -> FillResult: ...

    async def next_edit(self, text: str, line: int, recent_edits: list[dict[str, Any]], *, document: str,
                        path: str | None = None, region_lines: int = 20, seed: int | None = None,
                        sampler: dict[str, Any] | None = None) -> list[dict[str, Any]]: ...


# Errors the daemon answers every fill with until its model (or, in remote mode, the team server)
# is fixed: said once, and automatic requests pause for retry_after_s.
LOAD_ERRORS = ("model_missing", "remote_unavailable")
# Of those, the ones a request meets while the daemon itself is ready: only a request that
# succeeds says "ready" again (else each explicit request would show the failure anew).
REQUEST_ERRORS = ("remote_unavailable",)


class DaemonBackend:
    """One asyncio connection to the daemon, shared by every request of this server."""

    def __init__(self, on_state: StateCallback | None = None, retry_after_s: float = 30.0) -> None:
        self.on_state = on_state
        self.retry_after_s = retry_after_s
        self.state = "stopped"  # stopped | starting | loading | ready | error
        self.error: DgemmaError | None = None
        self.model: str | None = None
        self._failed_at = 0.0
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def _emit(self, state: str, message: str, **extra: Any) -> None:
        self.state = state
        if self.on_state is not None:
            try:
                await self.on_state(state, message, extra)
            except Exception:  # pragma: no cover - reporting must never break a request
                log.exception("state callback failed")

    def should_try(self, automatic: bool) -> bool:
        """False while a recent load failure stands and the user did not ask explicitly."""
        if self.state != "error" or not automatic:
            return True
        return time.monotonic() - self._failed_at >= self.retry_after_s

    async def _fail(self, err: DgemmaError) -> DgemmaError:
        self.error = err
        self._failed_at = time.monotonic()
        await self._emit("error", err.message, code=err.code)
        return err

    async def ensure_ready(self) -> Any:
        """The connected client once the daemon's model is loaded; raises DgemmaError."""
        from dgemma.daemon.client import AsyncClient, ModelLoadFailed, daemon_answers

        async with self._lock:
            client = self._client
            if client is not None and not client.closed and self.state == "ready":
                return client
            if client is None or client.closed:
                self._client = None
                if not await asyncio.to_thread(daemon_answers):
                    await self._emit("starting", "Starting the dgemma daemon")
                try:
                    client = await AsyncClient.connect(autostart=True)
                except DgemmaError as exc:
                    raise await self._fail(DgemmaError(exc.code, exc.message)) from None
                self._client = client
            try:
                info = await client.wait_loaded(on_loading=lambda: self._emit("loading", "Loading the model"))
            except ModelLoadFailed as exc:  # the daemon stays up: keep the connection, ask again later
                raise await self._fail(DgemmaError(exc.code, exc.message)) from None
            except DgemmaError as exc:
                self._client = None
                raise await self._fail(DgemmaError(exc.code, exc.message)) from None
            self.model = info.get("model")
            if self.error is None or self.error.code not in REQUEST_ERRORS:
                await self._ready()
            return client

    async def _ready(self) -> None:
        self.error = None
        await self._emit("ready", f"Model {self.model or ''} ready".replace("  ", " "), model=self.model)

    async def _request(self, method: str, params: dict[str, Any]) -> FillResult:
        res = await self._call(method, params)
        comps = res.get("completions") or [{"text": ""}]
        return FillResult(text=str(comps[0].get("text", "")), ms=float(res.get("ms", 0.0)),
                          steps=int(res.get("steps", 0)), model=res.get("model"),
                          queue_ms=float(res.get("queue_ms", 0.0)))

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """The daemon's result map for one request; a load failure is remembered."""
        client = await self.ensure_ready()
        try:
            res = await client.request(method, params)
        except DgemmaError as exc:
            err = DgemmaError(exc.code, exc.message)
            if exc.code == "unavailable":
                # The daemon went away (stopped, crashed): reconnect next time.
                self._client = None
                self.state = "stopped"
            elif exc.code in LOAD_ERRORS:
                raise await self._fail(err) from None
            raise err from None
        if self.error is not None:  # the failure that stood is over (remote mode: the team server is back)
            await self._ready()
        return res

    async def fill(self, prefix: str, suffix: str, *, document: str, max_tokens: int, n: int = 1,
                   seed: int | None = None, sampler: dict[str, Any] | None = None,
                   max_lines: int | None = None, min_tokens: int = 0) -> FillResult:
        # Ghost text cannot be streamed through LSP, so drafts are not requested.
        params: dict[str, Any] = {"prefix": prefix, "suffix": suffix, "document": document,
                                  "max_tokens": max_tokens, "n": n, "stream": False}
        if min_tokens:
            params["min_tokens"] = min_tokens
        if max_lines is not None:
            params["max_lines"] = max_lines
        return await self._request("fill", _extra(params, seed, sampler))

    async def edit(self, prefix: str, selection: str, suffix: str, instruction: str, *, document: str,
                   strength: float = 0.5, seed: int | None = None, max_tokens: int | None = None,
                   sampler: dict[str, Any] | None = None) -> FillResult:
        params: dict[str, Any] = {"prefix": prefix, "selection": selection, "suffix": suffix,
                                  "instruction": instruction, "document": document, "strength": strength,
                                  "stream": False}
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        return await self._request("edit", _extra(params, seed, sampler))

    async def next_edit(self, text: str, line: int, recent_edits: list[dict[str, Any]], *, document: str,
                        path: str | None = None, region_lines: int = 20, seed: int | None = None,
                        sampler: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The daemon's line edits ({start_line, end_line, text}) for the edit after ``recent_edits``."""
        params: dict[str, Any] = {"text": text, "path": path, "cursor": {"line": line, "character": 0},
                                  "recent_edits": recent_edits, "region_lines": region_lines,
                                  "document": document, "stream": False}
        res = await self._call("next_edit", _extra(params, seed, sampler))
        return list(res.get("edits") or [])

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _extra(params: dict[str, Any], seed: int | None, sampler: dict[str, Any] | None) -> dict[str, Any]:
    if seed is not None:
        params["seed"] = seed
    if sampler:
        params["settings"] = dict(sampler)
    return params
