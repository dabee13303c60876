"""Jobs and their order: one queue per connection, served least recently served first.

The asyncio loop puts jobs in, the model worker thread takes them out; a lock and a condition
variable are all they share.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from dgemma.daemon.connection import Connection


# Why a request was stopped before it finished, as the wire says it (code, message); a client
# that disconnected gets no reply. The engine only knows it was interrupted ("cancelled").
STOP_REPLIES: dict[str, tuple[str, str] | None] = {
    "cancelled": ("cancelled", "cancelled by the client"),
    "superseded": ("superseded", "superseded by a newer request for the same document"),
    "shutdown": ("cancelled", "the daemon is shutting down"),
    "disconnected": None,
}


class CancelFlag:
    """threading.Event-like flag the engine polls between steps, plus why it was set."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.reason = ""

    def set(self, reason: str = "cancelled") -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()

    def on_set(self, fn: Callable[[], None]) -> None:
        """Call `fn` once the flag is set (at once if it is): a request blocked on I/O, which
        cannot poll, is woken this way (remote mode closes its connection)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn()

    def is_set(self) -> bool:
        return self._event.is_set()


@dataclass(eq=False)
class Job:
    conn: "Connection"
    id: Any
    method: str                      # fill | edit
    kwargs: dict[str, Any]           # engine keyword arguments (without callbacks)
    settings: dict[str, Any]         # SamplerSettings overrides from the request
    document: str | None
    stream: bool
    deadline: float | None
    received: float = field(default_factory=time.monotonic)
    flag: CancelFlag = field(default_factory=CancelFlag)


class Scheduler:
    """Queued jobs per connection. The next job comes from the connection served least
    recently, so a client with 50 queued requests delays a client with one by at most
    one request."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._queues: dict[int, collections.deque[Job]] = {}
        self._last_served: dict[int, int] = {}
        self._served = itertools.count()
        self._control: collections.deque[Callable[[], None]] = collections.deque()
        self._closed = False
        self.running: Job | None = None

    def put(self, job: Job) -> list[Job]:
        """Queue `job`; returns the older jobs of the same document it displaced (the
        running one, if any, is flagged `superseded` instead)."""
        with self._cv:
            displaced: list[Job] = []
            if job.document is not None:
                displaced = self._remove_locked(lambda j: j.document == job.document)
                if self.running is not None and self.running.document == job.document:
                    self.running.flag.set("superseded")
            self._queues.setdefault(job.conn.cid, collections.deque()).append(job)
            self._cv.notify()
            return displaced

    def control(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the worker thread before the next job (model reloads)."""
        with self._cv:
            self._control.append(fn)
            self._cv.notify()

    def take(self) -> Job | Callable[[], None] | None:
        """Next control function or job (None once closed). Marks the job running under
        the same lock, so supersede never misses a job between queue and worker."""
        with self._cv:
            while True:
                if self._closed:
                    return None
                if self._control:
                    return self._control.popleft()
                if self._queues:
                    # Never-served clients (-1) first, then least recently served; ties by cid (arrival).
                    cid = min(self._queues, key=lambda c: (self._last_served.get(c, -1), c))
                    queue = self._queues[cid]
                    job = queue.popleft()
                    if not queue:
                        del self._queues[cid]
                    self._last_served[cid] = next(self._served)
                    self.running = job
                    return job
                self._cv.wait()

    def done(self, job: Job) -> None:
        with self._cv:
            if self.running is job:
                self.running = None

    def forget(self, cid: int) -> None:
        with self._cv:
            self._last_served.pop(cid, None)

    def remove(self, pred: Callable[[Job], bool]) -> list[Job]:
        with self._cv:
            return self._remove_locked(pred)

    def _remove_locked(self, pred: Callable[[Job], bool]) -> list[Job]:
        removed = []
        for cid in list(self._queues):
            keep: collections.deque[Job] = collections.deque()
            for job in self._queues[cid]:
                (removed if pred(job) else keep).append(job)
            if keep:
                self._queues[cid] = keep
            else:
                del self._queues[cid]
        return removed

    def depth(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._queues.values())

    def close(self) -> list[Job]:
        with self._cv:
            self._closed = True
            left = self._remove_locked(lambda j: True)
            self._cv.notify_all()
            return left
