"""A decoder step with static shapes, for torch.compile and CUDA graphs; the engine's decoder.

Everything one step reads has a shape fixed by (row bucket, canvas length, KV capacity):

* the prefix KV lives in buffers preallocated per layer ([1, kv heads, capacity, head dim]; a
  sliding-window layer holds at most ``sliding_window - 1`` tokens, as transformers' cache does),
  left-aligned, the unused slots masked out. The engine's own cache is a ``BufferCache`` over these
  buffers (``StaticStep.cache``): a transformers cache whose encoder passes (prefill, commit) write
  straight into them, so the prefix exists once. ``load`` copies a cache in only when it is not that
  one (a branch of a request with several alternatives, a cache made elsewhere), and first gives
  the buffers' current ``BufferCache`` copies of its own (``detach``), so no cache ever sees its
  prefix overwritten; the memory plan counts the buffers (engine/plan.py);
* the attention masks ([1, 1, canvas, capacity + canvas] per attention kind) and the canvas
  positions are buffers too, rewritten in place by ``load``;
* rows are padded to a bucket of 1, 2, 4 or 8 (more rows run eight at a time); each bucket's
  inputs (canvas, self-conditioning logits and mask) are buffers made on its first use, so a graph
  reads them where they are instead of copying them into its own;
* self-conditioning is always passed: on the first step as zeros with a per-row mask that zeroes
  the signal, which is exactly what the model does with no self-conditioning logits. So every step of
  a canvas, the first included, is the same computation.

``StaticStep`` stands in for the model in ``denoise(...)``: it has the model's ``config`` and
``model`` and is called with the same keywords, ignoring the ``cache`` and positions it is given
(call ``load(cache)`` with the prefix first; a prefix of another length is an error). With
``compile=True`` the step goes through ``torch.compile(fullgraph=True, dynamic=False)``: one graph
per bucket, no graph break (tested on the tiny test model on a CPU). With ``graphs=True`` (CUDA
only) it is compiled in "reduce-overhead" mode, which captures one CUDA graph per bucket on the
bucket's first step, every buffer marked as a static address so a replay copies none of them; its
logits are cloned out of the graph's pool. That path needs a GPU and has not run here.

The engine (``Engine._decode_canvas``) decodes through it as ``static_mode`` says: on CUDA by
default with graphs (``DGEMMA_GRAPHS=0`` keeps transformers' dynamic cache); on the CPU only with
``DGEMMA_GRAPHS=1``, and then eager, since there is no graph to capture and compiling a real model
takes minutes per bucket on a CPU. ``Engine.generate`` (a batch of prompts, no pins) stays dynamic.
"""
from __future__ import annotations

import copy
import os
import weakref
from types import SimpleNamespace

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from dgemma.errors import DgemmaError

BUCKETS = (1, 2, 4, 8)


def bucket(rows: int) -> int:
    """The smallest bucket holding ``rows`` (1 <= rows <= 8)."""
    for size in BUCKETS:
        if rows <= size:
            return size
    raise ValueError(f"{rows} rows: at most {BUCKETS[-1]} run in one step")


def static_mode(device: torch.device, graphs_fit: bool = True) -> str | None:
    """How the engine runs its decoder step, from ``DGEMMA_GRAPHS``: "graphs" (static step, one
    CUDA graph per bucket), "eager" (static step, uncompiled) or None (the model on transformers'
    dynamic cache). Unset means "graphs" on CUDA when their buffers and pools fit the free memory
    (``graphs_fit``: an optional speed-up must not cost an out-of-memory) and None on the CPU; 1
    means "graphs" on CUDA, fitting or not, and "eager" on the CPU; 0 means None. Read once, when an
    engine is made, so a bad value fails there."""
    value = os.environ.get("DGEMMA_GRAPHS", "").strip()
    if value not in ("0", "1", ""):
        raise DgemmaError("invalid_params", f"DGEMMA_GRAPHS={value!r}: set it to 1 (static decoder step, "
                          "CUDA graphs on a GPU) or 0 (dynamic cache), or leave it unset.")
    if value == "0" or (value == "" and (device.type != "cuda" or not graphs_fit)):
        return None
    return "graphs" if device.type == "cuda" else "eager"


class BufferCache(DynamicCache):
    """A transformers cache whose prefix lives in a ``StaticStep``'s KV buffers (``StaticStep.cache``
    makes it): its layers are transformers' own dynamic layers holding views of the buffers, and an
    encoder pass appends in place instead of concatenating. A full-attention layer writes the new
    keys after the ones it holds and returns the view of all of them; a sliding-window layer returns
    what transformers' returns (its window and the new keys, concatenated: the attention needs them)
    and keeps the last ``sliding_window - 1`` of them in its buffer. The tensors an encoder pass
    returns, and so its outputs, are the dynamic cache's.

    Anything that copies a cache (``copy.deepcopy``, ``prefix_cache.copy_cache``) gets a plain
    ``DynamicCache`` with compact tensors. A pass that would overflow the buffers, or a batch of more
    than one row, first ``detach``es the cache: its layers get compact copies of their own, and it
    goes on as a plain dynamic cache (the engine then decodes it on the model)."""

    def __init__(self, config, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        super().__init__(config=config)
        if len(self.layers) != len(keys):
            raise ValueError(f"the config has {len(self.layers)} cache layers, the buffers {len(keys)}")
        self.buffer_keys, self.buffer_values = keys, values
        self.attached = True
        for layer, buffer in zip(self.layers, keys):
            # What `lazy_initialization` sets, with the (empty) views of the buffers as the tensors.
            layer.device, layer.is_initialized = buffer.device, True
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer._sliding_window_tensor = torch.full((), layer.sliding_window, dtype=torch.long,
                                                          device=buffer.device)
        for i in range(len(keys)):
            self._hold(i, 0)

    def _hold(self, i: int, tokens: int) -> None:
        layer = self.layers[i]
        layer.keys, layer.values = self.buffer_keys[i][:, :, :tokens], self.buffer_values[i][:, :, :tokens]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.attached:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        keys, values = self.buffer_keys[layer_idx], self.buffer_values[layer_idx]
        held, new = layer.keys.shape[-2], key_states.shape[-2]
        sliding = isinstance(layer, DynamicSlidingWindowLayer)
        keep = min(held + new, layer.sliding_window - 1) if sliding else held + new
        if key_states.shape[0] != 1 or keep > keys.shape[-2]:
            self.detach()
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if not sliding:
            keys[:, :, held:keep].copy_(key_states)
            values[:, :, held:keep].copy_(value_states)
            self._hold(layer_idx, keep)
            return layer.keys, layer.values
        layer.cumulative_length += new
        full_keys = torch.cat([layer.keys, key_states], dim=-2)
        full_values = torch.cat([layer.values, value_states], dim=-2)
        keys[:, :, :keep].copy_(full_keys[:, :, held + new - keep:])
        values[:, :, :keep].copy_(full_values[:, :, held + new - keep:])
        self._hold(layer_idx, keep)
        return full_keys, full_values

    def detach(self) -> None:
        """Give every layer a compact copy of its keys and values: the buffers are no longer this
        cache's, and it goes on as a plain dynamic cache."""
        if not self.attached:
            return
        for layer in self.layers:
            layer.keys = layer.keys.clone(memory_format=torch.contiguous_format)
            layer.values = layer.values.clone(memory_format=torch.contiguous_format)
        self.attached = False

    def __deepcopy__(self, memo: dict) -> DynamicCache:
        # A plain DynamicCache with compact tensors: never the buffers, which a deepcopy of a view
        # would copy whole (as it would a sliding layer's view into its last pass).
        for layer in self.layers:
            for t in (layer.keys, layer.values):
                if id(t) not in memo:
                    memo[id(t)] = t.clone(memory_format=torch.contiguous_format)
        plain = DynamicCache.__new__(DynamicCache)
        memo[id(self)] = plain
        for name, value in self.__dict__.items():
            if name not in ("buffer_keys", "buffer_values", "attached"):
                setattr(plain, name, copy.deepcopy(value, memo))
        return plain


class StaticStep:
    """One decoder forward with static shapes over a loaded prefix (see the module docstring)."""

    def __init__(self, model, capacity: int, compile: bool = False, graphs: bool = False,
                 backend: str = "inductor") -> None:
        self.wrapped = model
        self.config = model.config
        self.model = model.model
        text = model.config.text_config
        self.canvas_length = model.config.canvas_length
        self.vocab = text.vocab_size
        decoder = model.model.decoder
        weight = decoder.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.kinds = list(text.layer_types)
        window = getattr(text, "sliding_window", None)
        self.capacity = {kind: (min(capacity, window - 1) if kind == "sliding_attention" and window else capacity)
                         for kind in set(self.kinds)}
        self.keys, self.values = [], []
        for layer in decoder.layers:
            attn = layer.self_attn
            heads = attn.k_proj.out_features // attn.head_dim
            shape = (1, heads, self.capacity[self.kinds[attn.layer_idx]], attn.head_dim)
            self.keys.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
            self.values.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
        c = self.canvas_length
        self.masks = {kind: torch.zeros(1, 1, c, cap + c, dtype=torch.bool, device=self.device)
                      for kind, cap in self.capacity.items()}
        self.positions = torch.zeros(1, c, dtype=torch.long, device=self.device)
        self.prefix_length: int | None = None
        self._owner: weakref.ref[BufferCache] | None = None  # the BufferCache over the buffers, if any
        if graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {self.device}")
        self.graphs = graphs
        if self.graphs:
            for tensor in [*self.keys, *self.values, *self.masks.values(), self.positions]:
                torch._dynamo.mark_static_address(tensor)
        # One cache object per bucket: views of the buffers, widened to the bucket's rows.
        self.caches = {size: self._cache(size) for size in BUCKETS}
        # Each bucket's inputs, made on its first step: (canvas, self-conditioning logits, mask).
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.forward = self._forward
        if compile or self.graphs:
            mode = "reduce-overhead" if self.graphs else None
            self.forward = torch.compile(self._forward, fullgraph=True, dynamic=False, mode=mode, backend=backend)

    def _cache(self, rows: int) -> DynamicCache:
        # Plain layers over the buffers, as `denoise.expand_cache` builds them: the masks, not the
        # cache, say which slots hold the prefix, so a sliding layer needs no window bookkeeping here.
        cache = DynamicCache()
        cache.layers = []
        for keys, values in zip(self.keys, self.values):
            layer = DynamicLayer()
            layer.keys, layer.values = keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)
            layer.device, layer.is_initialized = keys.device, True
            if self.graphs:  # the views are what the graph reads, and a view is not marked with its base
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)
            cache.layers.append(layer)
        return cache

    def holds(self, cache: DynamicCache) -> bool:
        """Whether ``cache`` is the BufferCache over this step's buffers (its prefix is in them)."""
        return isinstance(cache, BufferCache) and cache.attached and cache.buffer_keys is self.keys

    def _release(self) -> None:
        """The buffers are about to be overwritten: their BufferCache, if still in use, gets copies."""
        owner = self._owner() if self._owner is not None else None
        if owner is not None and self.holds(owner):
            owner.detach()
        self._owner = None

    def _check(self, cache: DynamicCache) -> None:
        """Refuse a cache the buffers cannot hold, before anything is overwritten."""
        for i, layer in enumerate(cache.layers):
            held = layer.keys.shape[-2] if layer.is_initialized else 0
            if held > self.keys[i].shape[-2]:
                raise ValueError(f"layer {i} holds {held} tokens, more than the step's capacity "
                                 f"{self.keys[i].shape[-2]}")

    def _copy_in(self, cache: DynamicCache) -> None:
        for i, layer in enumerate(cache.layers):
            held = layer.keys.shape[-2] if layer.is_initialized else 0
            if held:
                self.keys[i][:, :, :held].copy_(layer.keys[:1])
                self.values[i][:, :, :held].copy_(layer.values[:1])

    @torch.no_grad()
    def cache(self, source: DynamicCache | None = None) -> BufferCache:
        """A BufferCache over the buffers holding ``source``'s batch-1 prefix (copied in: drop
        ``source`` to free its tensors), or empty. It is the buffers' one cache from now on: the
        previous one, if still in use, gets copies of its own first."""
        if source is not None:
            self._check(source)
        self._release()
        cache = BufferCache(self.config.text_config, self.keys, self.values)
        if source is not None and source.get_seq_length() > 0:
            self._copy_in(source)
            for i, layer in enumerate(source.layers):
                if layer.is_initialized:
                    cache._hold(i, layer.keys.shape[-2])
                if isinstance(layer, DynamicSlidingWindowLayer):
                    cache.layers[i].cumulative_length = layer.cumulative_length
        self._owner = weakref.ref(cache)
        return cache

    @torch.no_grad()
    def load(self, cache: DynamicCache) -> None:
        """Set the masks and positions for a batch-1 prefix cache, copying it into the buffers first
        unless it is their BufferCache (``holds``)."""
        length = cache.get_seq_length()
        if not self.holds(cache):
            self._check(cache)
            self._release()
            self._copy_in(cache)
        for i, layer in enumerate(cache.layers):
            held = layer.keys.shape[-2]
            self.keys[i][:, :, held:].zero_()
            self.values[i][:, :, held:].zero_()
        c = self.canvas_length
        for kind, cap in self.capacity.items():
            held = cache.layers[self.kinds.index(kind)].keys.shape[-2]
            slots = torch.arange(cap + c, device=self.device)
            self.masks[kind].copy_(((slots < held) | (slots >= cap)).expand(1, 1, c, cap + c))
        self.positions.copy_(torch.arange(length, length + c, device=self.device)[None])
        self.prefix_length = length

    def _forward(self, canvas: torch.Tensor, sc_logits: torch.Tensor, sc_mask: torch.Tensor) -> torch.Tensor:
        return self.wrapped(decoder_input_ids=canvas, self_conditioning_logits=sc_logits,
                            self_conditioning_mask=sc_mask, cache=self.caches[canvas.shape[0]],
                            decoder_attention_mask=self.masks, decoder_position_ids=self.positions).logits

    @torch.no_grad()
    def step(self, canvas: torch.Tensor, sc_logits: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, C, V) for ``canvas`` (B, C), rows padded to a bucket (eight at a time beyond 8)."""
        if self.prefix_length is None:
            raise RuntimeError("StaticStep.load(cache) must be called before a step")
        rows = canvas.shape[0]
        if rows > BUCKETS[-1]:
            chunks = [self.step(canvas[i:i + BUCKETS[-1]], None if sc_logits is None else sc_logits[i:i + BUCKETS[-1]])
                      for i in range(0, rows, BUCKETS[-1])]
            return torch.cat(chunks)
        size = bucket(rows)
        padded, sc, sc_mask = self._inputs(size)
        # Padding rows keep whatever they last held: rows are independent, their logits are dropped
        # and their self-conditioning is masked off.
        padded[:rows] = canvas
        sc_mask.zero_()
        if sc_logits is None:
            sc.zero_()  # masked off too; zeroed so the first step reads what a fresh canvas would
        else:
            sc[:rows] = sc_logits
            sc_mask[:rows] = True
        if self.graphs:
            # Each step is a new run of the graphs: the last replay's output was cloned and is dead.
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.forward(padded, sc, sc_mask)
        # A first-dimension slice stays contiguous; a CUDA graph's output is overwritten by its next replay.
        return logits[:rows].clone() if self.graphs else logits[:rows]

    def _inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if size not in self.inputs:
            c = self.canvas_length
            inputs = (torch.zeros(size, c, dtype=torch.long, device=self.device),
                      torch.zeros(size, c, self.vocab, dtype=self.dtype, device=self.device),
                      torch.zeros(size, dtype=torch.bool, device=self.device))
            if self.graphs:
                for tensor in inputs:
                    torch._dynamo.mark_static_address(tensor)
            self.inputs[size] = inputs
        return self.inputs[size]

    def __call__(self, *, decoder_input_ids: torch.Tensor, self_conditioning_logits: torch.Tensor | None = None,
                 cache: DynamicCache | None = None, decoder_position_ids: torch.Tensor | None = None,
                 **_: object) -> SimpleNamespace:
        """The model's call as ``denoise`` makes it; ``cache`` must hold the loaded prefix."""
        if cache is not None and cache.get_seq_length() != self.prefix_length:
            raise RuntimeError(f"the step holds a {self.prefix_length}-token prefix, the cache "
                               f"{cache.get_seq_length()} tokens: load(cache) first")
        return SimpleNamespace(logits=self.step(decoder_input_ids, self_conditioning_logits))
