"""Reuse of encoded prefixes between requests: consecutive keystrokes share almost all of it.

Entries are KV caches keyed by the exact token ids they encode, evicted least recently used once
their total size passes a byte budget. A lookup returns the longest entry whose ids start the
new prompt; the caller encodes only the rest.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

from transformers import DynamicCache


def cache_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers if layer.is_initialized
               for t in (layer.keys, layer.values))


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], tuple[DynamicCache, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: list[int]) -> tuple[tuple[int, ...], DynamicCache] | None:
        """The longest cached prefix of ``ids`` and a private copy of its cache (callers extend it)."""
        best = None
        for key in self._entries:
            if len(key) <= len(ids) and (best is None or len(key) > len(best)) and ids[: len(key)] == list(key):
                best = key
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(best)
        return best, copy.deepcopy(self._entries[best][0])

    def store(self, ids: list[int], cache: DynamicCache) -> None:
        key = tuple(ids)
        if key in self._entries or self.max_bytes <= 0:
            return
        size = cache_bytes(cache)
        if size > self.max_bytes:
            return
        self._entries[key] = (copy.deepcopy(cache), size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
