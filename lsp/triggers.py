"""When an automatic trigger deserves a model call, which completion request is the newest for its
document, and waiting for the typing to pause."""
from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from typing import Any, TypeVar

from dgemma.errors import DgemmaError

T = TypeVar("T")

_WORD = re.compile(r"\w")
# Closing punctuation that commonly sits right of the cursor while typing
# inside a call or literal; a completion there is still welcome.
_CLOSING = set(")]}>\"'`;,: \t")


def should_trigger(line_before: str, line_after: str, automatic: bool, max_line_suffix: int = 8) -> bool:
    """Skip automatic triggers where ghost text would be noise.

    Invoked triggers always pass: the user asked. Automatic ones are skipped
    in the middle of a word (the model would have to rewrite the word) and
    when more than ``max_line_suffix`` characters of real text sit right of
    the cursor (as llama.vim does; inserting before them rarely helps).
    """
    if not automatic:
        return True
    if line_after[:1] and _WORD.match(line_after[:1]):
        return False
    rest = line_after.strip()
    if len(rest) > max_line_suffix:
        return False
    if rest and not all(c in _CLOSING for c in rest):
        return False
    return True


# The end of a line that opens a block whose body comes next: Python's `:`, braces, brackets,
# an arrow function, a shell/Ruby/Lua `do`/`then`; a trailing `#` or `//` comment may follow.
_OPENS_BLOCK = re.compile(r"(?:[:{(\[]|=>|\bdo|\bthen)\s*(?:(?:#|//)[^\"']*)?$")


def automatic_lines(text_before: str, line_after: str, max_lines: int) -> int:
    """How many lines automatic ghost text may have at the cursor: one, the case a user waits on
    (the engine decodes it on its fast line plan), unless the cursor sits alone on a line below
    one that opens a block: there the body is the suggestion, up to ``max_lines`` (as Copilot
    shows a whole body after a signature). ``text_before`` is the document up to the cursor."""
    line_start = text_before.rfind("\n") + 1
    if text_before[line_start:].strip() or line_after.strip() or not line_start:
        return 1
    above = text_before[:line_start - 1]
    previous = above[above.rfind("\n") + 1:].rstrip()  # the line right above, less a CR
    return max_lines if _OPENS_BLOCK.search(previous) else 1


# Daemon errors that mean "stopped early, nobody needs the answer" (daemon/scheduler.py STOP_REPLIES):
# a newer request for the document took over, or the request was cancelled. Not failures to report.
STOPPED_CODES = frozenset({"superseded", "cancelled"})


class Latest:
    """The one place the language server decides whether a completion request is still the newest
    for its document. A new request makes every older one for the document stale at once and cancels
    the daemon request serving it; the debounce, the request in flight and its late answer all ask
    `is_current`.

    The daemon also supersedes by `document`, but only when a new fill reaches it; a request answered
    from the cache or skipped would leave the old one running, and its late answer on screen.
    """

    def __init__(self) -> None:
        self._gen: dict[str, int] = {}
        self._running: dict[str, asyncio.Future[Any]] = {}  # the daemon request serving the newest one

    def begin(self, key: str) -> int:
        """A new request for ``key``: every older one is now stale. Returns its generation."""
        gen = self._gen.get(key, 0) + 1
        self._gen[key] = gen
        self.forget(key)
        return gen

    def is_current(self, key: str, gen: int) -> bool:
        return self._gen.get(key) == gen

    def forget(self, key: str) -> None:
        """Stop the daemon request running for ``key`` (a newer request, a closed document)."""
        running = self._running.pop(key, None)
        if running is not None:
            running.cancel()

    async def run(self, key: str, gen: int, request: Awaitable[T]) -> T | None:
        """Await the daemon ``request`` serving request ``gen`` of ``key``. None when it stopped
        early: a newer request took over (answer "nothing" rather than an error the client would
        log), or the daemon says it was superseded or cancelled (STOPPED_CODES). When this request
        itself is cancelled ($/cancelRequest, a closed document), the daemon request stops too and
        CancelledError goes on. Other DgemmaErrors go on."""
        task = asyncio.ensure_future(request)
        self._running[key] = task
        try:
            # Shielded: cancelling this request must cancel the daemon request explicitly (below),
            # which sends the daemon a `cancel`.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not self.is_current(key, gen):
                return None
            task.cancel()
            raise
        except DgemmaError as exc:
            if exc.code in STOPPED_CODES:
                return None
            raise
        finally:
            if self._running.get(key) is task:
                del self._running[key]


class Debouncer:
    """Latest-wins delay: only the newest request of a burst for a document goes on."""

    def __init__(self, delay_s: float, latest: Latest) -> None:
        self.delay_s = delay_s
        self.latest = latest

    async def settle(self, key: str, gen: int, delay_s: float | None = None) -> bool:
        """Wait out the delay; True when request ``gen`` is still the newest for ``key`` (Latest)."""
        delay = self.delay_s if delay_s is None else delay_s
        if delay > 0:
            await asyncio.sleep(delay)
        return self.latest.is_current(key, gen)
