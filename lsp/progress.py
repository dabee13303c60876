"""Telling the user what the daemon is doing, without nagging.

* ``$/progress`` (work-done progress) while the daemon starts and loads the model.
* ``window/showMessage`` for a failure, once per distinct failure: a model that
  cannot load would otherwise raise a pop-up on every keystroke.
* ``dgemma/status`` notifications with the state, for editor status bars.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

from lsprotocol import types

if TYPE_CHECKING:  # pragma: no cover
    from dgemma.errors import DgemmaError
    from dgemma.lsp.server import DgemmaLanguageServer

log = logging.getLogger("dgemma.lsp.progress")

STATUS_NOTIFICATION = "dgemma/status"


class StateReporter:
    def __init__(self, ls: "DgemmaLanguageServer") -> None:
        self.ls = ls
        self.state = "stopped"
        self.message = ""
        self.model: str | None = None
        self._token: str | None = None
        self._shown: set[str] = set()
        self._busy = 0
        self.last_fill: dict[str, Any] | None = None

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state, "message": self.message, "model": self.model, "busy": self._busy > 0}

    def details(self) -> dict[str, Any]:
        """The snapshot plus the timing of the last model call (``dgemma.status``)."""
        return {**self.snapshot(), "last_fill": self.last_fill}

    def _notify_status(self) -> None:
        try:
            self.ls.protocol.notify(STATUS_NOTIFICATION, self.snapshot())
        except Exception:  # pragma: no cover - e.g. the client is gone
            log.debug("cannot send status", exc_info=True)

    def _client_has_progress(self) -> bool:
        caps = self.ls.client_capabilities
        return bool(caps and caps.window and caps.window.work_done_progress)

    def begin_startup(self) -> None:
        """Called on ``initialized``: the status bar shows "starting" at once."""
        if self.state == "stopped":
            self.state, self.message = "starting", "Connecting to the dgemma daemon"
            self._notify_status()

    async def _progress(self, kind: str, message: str) -> None:
        if not self._client_has_progress():
            return
        if kind == "begin" and self._token is None:
            token = f"dgemma-{uuid.uuid4().hex[:8]}"
            try:
                await asyncio.wait_for(self.ls.work_done_progress.create_async(token), 5.0)
            except Exception:  # deliberate: a timeout or the client's error reply; progress is optional
                log.debug("client refused a progress token", exc_info=True)
                return
            self._token = token
            self.ls.work_done_progress.begin(token, types.WorkDoneProgressBegin(
                title="dgemma", message=message, cancellable=False))
        elif kind == "report" and self._token is not None:
            self.ls.work_done_progress.report(self._token, types.WorkDoneProgressReport(message=message))
        elif kind == "end" and self._token is not None:
            token, self._token = self._token, None
            self.ls.work_done_progress.end(token, types.WorkDoneProgressEnd(message=message))

    async def on_state(self, state: str, message: str, extra: dict[str, Any]) -> None:
        """The backend's state changes (see DaemonBackend._emit)."""
        previous = self.state
        self.state, self.message = state, message
        if state in ("starting", "loading"):
            await self._progress("begin" if self._token is None else "report", message)
        elif state == "ready":
            self.model = extra.get("model")
            await self._progress("end", message)
            # A fixed failure may come back later: let it be shown again then.
            self._shown.clear()
        elif state == "error":
            await self._progress("end", "failed")
            self._show_once(types.MessageType.Error, message)
        if state != previous or state != "ready":
            self._notify_status()

    def _show_once(self, kind: types.MessageType, message: str) -> None:
        message = _fmt(message)
        if message in self._shown:
            return
        self._shown.add(message)
        self.ls.window_show_message(types.ShowMessageParams(type=kind, message=message))

    def warn_once(self, message: str) -> None:
        """Something the user can fix (a bad setting): one message, not one per request."""
        self._show_once(types.MessageType.Warning, message)

    def request_failed(self, exc: "DgemmaError", always: bool = False) -> None:
        """A request failed for a reason other than being superseded or cancelled."""
        from dgemma.lsp.backend import LOAD_ERRORS

        if exc.code in LOAD_ERRORS:
            return  # on_state("error") already said it, once
        msg = _fmt(exc.message)
        if always:
            self.ls.window_show_message(types.ShowMessageParams(type=types.MessageType.Error, message=msg))
        else:
            self._show_once(types.MessageType.Warning, msg)

    def busy(self, message: str) -> None:
        self._busy += 1
        self._notify_status()

    def idle(self) -> None:
        self._busy = max(0, self._busy - 1)
        self._notify_status()


def _fmt(message: str) -> str:
    return message if message.lower().startswith("dgemma") else f"dgemma: {message}"
