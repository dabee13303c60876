"""Completions already computed, so typing does not always cost a model call.

Keyed on hashes of the prefix and suffix windows (not the strings: a
window is kilobytes, and hundreds of entries are kept). Typed-through: when
the user types exactly the characters a cached completion starts with, the
rest of that completion is served without asking the daemon again.

Each entry remembers the token budget it was computed with: a request with a
larger budget (invoked, after automatic ghost text) must not get the shorter
answer, while typing through a longer, invoked suggestion keeps serving it.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict


def _h(s: str) -> bytes:
    return hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class CompletionCache:
    def __init__(self, capacity: int = 256, max_typed: int = 64) -> None:
        self.capacity = capacity
        # How far back to look for a completion the user is typing through; longer
        # than any realistic burst between two completions.
        self.max_typed = max_typed
        # (prefix hash, suffix hash) -> (completion, token budget it was computed with)
        self._items: OrderedDict[tuple[bytes, bytes], tuple[str, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, prefix: str, suffix: str, text: str, max_tokens: int) -> None:
        key = (_h(prefix), _h(suffix))
        self._items.pop(key, None)
        self._items[key] = (text, max_tokens)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, prefix: str, suffix: str, max_tokens: int) -> str | None:
        """The cached completion at this spot, or the rest of one being typed through.

        Only entries computed with at least ``max_tokens`` answer. An exact
        entry wins, even an empty one (the model had nothing to say here,
        asking again would give the same). For typed-through entries the typed
        text must be a strict start of the cached completion.
        """
        hs = _h(suffix)
        key = (_h(prefix), hs)
        exact = self._items.get(key)
        if exact is not None and exact[1] >= max_tokens:
            self._items.move_to_end(key)
            self.hits += 1
            return exact[0]
        for i in range(1, min(self.max_typed, len(prefix)) + 1):
            typed = prefix[-i:]
            hit = self._items.get((_h(prefix[:-i]), hs))
            if hit is not None and hit[1] >= max_tokens and len(hit[0]) > i and hit[0].startswith(typed):
                self.hits += 1
                rest = hit[0][i:]
                # Remember the new spot too so the next keystroke hits exactly.
                self.put(prefix, suffix, rest, hit[1])
                return rest
        self.misses += 1
        return None
