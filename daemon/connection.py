"""One client connection: its outbox of replies and disposable drafts, written by its own task
so a slow reader never holds up anyone else. Runs on the loop thread only."""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Any

from dgemma.daemon import protocol as proto

if TYPE_CHECKING:
    from dgemma.daemon.scheduler import Job

log = logging.getLogger("dgemma.daemon")

# Past this many unwritten replies a client is not reading at all; dropping it is
# kinder to everyone else than buffering without bound.
MAX_OUTBOX = 1024


class _DraftSlot:
    __slots__ = ("rid",)

    def __init__(self, rid: Any) -> None:
        self.rid = rid


class Connection:
    """One client. Everything here runs on the loop thread."""

    def __init__(self, cid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_drafts: int) -> None:
        self.cid = cid
        self.reader = reader
        self.writer = writer
        self.max_drafts = max_drafts
        self.outbox: collections.deque[bytes | _DraftSlot] = collections.deque()
        self.drafts: dict[Any, bytes] = {}
        self.jobs: dict[Any, Job] = {}
        self.greeted = False
        self.closed = False
        self.dropped_drafts = 0
        self._wake = asyncio.Event()

    def send(self, msg: dict[str, Any]) -> None:
        if self.closed:
            return
        if len(self.outbox) >= MAX_OUTBOX:
            log.warning("client %d reads nothing (%d replies waiting); dropping it", self.cid, len(self.outbox))
            self.abort()
            return
        self.outbox.append(proto.encode(msg))
        self._wake.set()

    def send_draft(self, rid: Any, msg: dict[str, Any]) -> None:
        """Drafts are disposable: a newer draft of the same request replaces a waiting
        one, and a client that lets too many pile up simply misses some."""
        if self.closed:
            return
        data = proto.encode(msg)
        if rid in self.drafts:
            self.drafts[rid] = data
            return
        if len(self.drafts) >= self.max_drafts:
            self.dropped_drafts += 1
            return
        self.drafts[rid] = data
        self.outbox.append(_DraftSlot(rid))
        self._wake.set()

    async def write_loop(self) -> None:
        try:
            while not self.closed:
                await self._wake.wait()
                self._wake.clear()
                while self.outbox and not self.closed:
                    item = self.outbox.popleft()
                    data = self.drafts.pop(item.rid, None) if isinstance(item, _DraftSlot) else item
                    if data is None:
                        continue
                    self.writer.write(data)
                    await self.writer.drain()
        except (ConnectionError, OSError):
            self.abort()

    async def flush(self, timeout: float = 1.0) -> None:
        """Best effort: let queued replies out before closing (e.g. a too_large error)."""
        deadline = time.monotonic() + timeout
        while self.outbox and not self.closed and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(self.writer.drain(), max(0.0, deadline - time.monotonic()))
        except (asyncio.TimeoutError, OSError):  # too slow, or gone: the connection closes anyway
            pass

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._wake.set()
            transport = self.writer.transport
            if transport is not None:
                transport.abort()
