"""When an automatic trigger deserves a model call, and waiting for the typing to pause."""
from __future__ import annotations

import asyncio
import re

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


class Debouncer:
    """Latest-wins delay per key: only the last call in a burst goes on."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self._gen: dict[str, int] = {}

    def bump(self, key: str) -> int:
        """Mark a new request for ``key``; any earlier one is now stale."""
        gen = self._gen.get(key, 0) + 1
        self._gen[key] = gen
        return gen

    def is_current(self, key: str, gen: int) -> bool:
        return self._gen.get(key) == gen

    async def settle(self, key: str, gen: int, delay_s: float | None = None) -> bool:
        """Wait out the delay; True when no newer request for ``key`` came meanwhile."""
        delay = self.delay_s if delay_s is None else delay_s
        if delay > 0:
            await asyncio.sleep(delay)
        return self.is_current(key, gen)
