"""Reuse of encoded prefixes between requests: consecutive keystrokes share almost all of it.

Entries are KV caches keyed by the exact token ids they encode, evicted least recently used once
their total size passes a byte budget. A lookup returns the longest entry whose ids start the
new prompt; the caller encodes only the rest.

Entries live in host memory whatever the model's device (pinned when it is a GPU, so a hit is one
fast copy back). The cache then costs no GPU memory, of which the 26B-A4B's memory plan has none
to spare, and copying an 8k-token prefix back (0.35 GiB) is far cheaper than encoding it again.
Every stored tensor is a compact copy: a sliding-window layer's keys are a view into everything
its last encoder pass produced (transformers keeps the window by slicing), so copying the view's
storage, as deepcopy does, would keep the whole prompt while the budget counted only the window.

Copies in both directions are asynchronous (``non_blocking``), on the current stream, the one the
engine's encoder and decoder run on, so every kernel that reads a copy runs after it; host tensors
are never read by the host, and PyTorch's pinned-memory allocator keeps a freed host block until the
copies that use it are done, so evicting an entry mid-copy is safe too.

Where the memory plan leaves room (``device_bytes``, from the plan's headroom on a GPU, 0 on the
CPU), the most recently used entry also stays on the device, compact: a hit on it copies nothing.
It shares its tensors with the cache handed out, which costs nothing until that cache grows:
transformers' cache layers rebind their tensors on append, never write into them (as
``denoise.expand_cache`` relies on too). With the static decoder step the engine copies a hit into
the step's buffers and drops the copy it was handed (``static_step.BufferCache``, which does write
into its buffers, never into the tensors it was made from); stored entries are compact copies of it.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable

import torch
from transformers import DynamicCache

# Default budgets (host memory) for an engine on a GPU and on the CPU. A GPU model is the 26B-A4B,
# whose 8k-token prefix takes 0.35 GiB; the CPU one is the small bundled model.
DEFAULT_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}


def default_budget(device: torch.device) -> int:
    return DEFAULT_BYTES["cuda" if device.type == "cuda" else "cpu"]


def cache_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers if layer.is_initialized
               for t in (layer.keys, layer.values))


def _cache_device(cache: DynamicCache) -> torch.device:
    return next((layer.keys.device for layer in cache.layers if layer.is_initialized), torch.device("cpu"))


def copy_cache(cache: DynamicCache, device: torch.device) -> DynamicCache:
    """A private copy of ``cache`` with every key and value tensor compacted onto ``device``."""
    def compact(t: torch.Tensor) -> torch.Tensor:
        pin = device.type == "cpu" and t.is_cuda
        return torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin).copy_(t, non_blocking=True)
    return _rebuild(cache, compact)


def share_cache(cache: DynamicCache) -> DynamicCache:
    """A cache of its own (layers, lengths) holding the same key and value tensors: no copy."""
    return _rebuild(cache, lambda t: t)


def _rebuild(cache: DynamicCache, tensor: Callable[[torch.Tensor], torch.Tensor]) -> DynamicCache:
    memo: dict[int, object] = {}
    for layer in cache.layers:
        if layer.is_initialized:
            for t in (layer.keys, layer.values):
                if id(t) not in memo:
                    memo[id(t)] = tensor(t)
    # deepcopy uses the pre-filled memo for the tensors and copies the layers' other state.
    return copy.deepcopy(cache, memo)


class PrefixCache:
    def __init__(self, max_bytes: int, device_bytes: int = 0) -> None:
        self.max_bytes = max_bytes
        self.device_bytes = device_bytes
        # ids -> (cache in host memory, its bytes, the device it came from and goes back to)
        self._entries: OrderedDict[tuple[int, ...], tuple[DynamicCache, int, torch.device]] = OrderedDict()
        # The most recently used entry's ids and its cache on its device, when it fits device_bytes.
        self._resident: tuple[tuple[int, ...], DynamicCache] | None = None
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: list[int]) -> tuple[tuple[int, ...], DynamicCache] | None:
        """The longest cached prefix of ``ids`` and a private copy of its cache on the device it
        was stored from (callers extend it)."""
        best = None
        for key in self._entries:
            if len(key) <= len(ids) and (best is None or len(key) > len(best)) and ids[: len(key)] == list(key):
                best = key
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(best)
        if self._resident is not None and self._resident[0] == best:
            return best, share_cache(self._resident[1])
        entry, size, device = self._entries[best]
        cache = copy_cache(entry, device)
        self._keep(best, size, lambda: share_cache(cache))
        return best, cache

    @property
    def resident(self) -> tuple[int, ...] | None:
        """The ids of the entry held on the device too, if any."""
        return None if self._resident is None else self._resident[0]

    def store(self, ids: list[int], cache: DynamicCache) -> None:
        key = tuple(ids)
        if key in self._entries or self.max_bytes <= 0:
            return
        size = cache_bytes(cache)
        if size > self.max_bytes:
            return
        self._entries[key] = (copy_cache(cache, torch.device("cpu")), size, _cache_device(cache))
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted, _) = self._entries.popitem(last=False)
            self.bytes -= evicted
        self._keep(key, size, lambda: copy_cache(cache, _cache_device(cache)))

    def _keep(self, key: tuple[int, ...], size: int, resident: Callable[[], DynamicCache]) -> None:
        """Make ``key`` the resident entry (``resident()``: its compact cache on the device), or none
        when it is over the budget: the previous one goes either way, as it is no longer the most recent."""
        self._resident = (key, resident()) if size <= self.device_bytes else None

    def clear(self) -> None:
        self._entries.clear()
        self._resident = None
        self.bytes = 0
