"""The denoising loop for one canvas, and the encoder passes around it.

It follows ``DiffusionGemmaForBlockDiffusion.generate`` step for step (same random draws in the same
order, so an unconstrained canvas reproduces it token for token) and adds pinned positions: they
keep their token, count as fully confident, and feed self-conditioning a one-hot distribution.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from dgemma.errors import DgemmaError
from dgemma.engine.sampler import sample_positions, token_logprobs
from dgemma.engine.settings import SamplerSettings


@dataclass
class StepState:
    """What a per-step observer sees: the current argmax canvas and per-position entropy."""

    step: int
    argmax: torch.Tensor  # (B, C)
    entropy: torch.Tensor  # (B, C), 0 at pinned positions
    finished: torch.Tensor  # (B,)


@dataclass
class CanvasOutcome:
    argmax: torch.Tensor  # (B, C) the denoised canvas
    logprobs: torch.Tensor  # (B, C) untempered log-probability of each argmax token at the row's last step
    steps: int


class Interrupt:
    """Cancellation and deadline, checked between steps."""

    def __init__(self, cancel: object | None = None, deadline: float | None = None) -> None:
        self.cancel = cancel
        self.deadline = deadline

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise DgemmaError("cancelled", "The request was cancelled.")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DgemmaError("deadline", "The request ran past its deadline.")


def encode(model, ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Causal encoder pass that appends ``ids`` (B, L) to ``cache`` (prompt prefill, canvas commit);
    returns its final hidden states (B, L, D), which the LM head reads as next-token predictions."""
    start = cache.get_seq_length()
    batch, length = ids.shape
    positions = torch.arange(start, start + length, dtype=torch.int32, device=ids.device).unsqueeze(0)
    _window_tensors_on(cache, ids.device)
    encoder = model.model.encoder
    # No padding mask: every position is real, and an all-ones mask only makes transformers check
    # that it is all ones (a host sync on a GPU) before building the same causal masks.
    masks = encoder.create_masks_for_generate(
        config=model.config, inputs_embeds=torch.empty((batch, length, 0), dtype=model.dtype, device=ids.device),
        attention_mask=None, cache=cache, position_ids=positions,
    )
    return encoder(input_ids=ids.contiguous(), attention_mask=masks, cache=cache,
                   position_ids=positions).last_hidden_state


def _window_tensors_on(cache: DynamicCache, device: torch.device) -> None:
    """A fresh cache's sliding layers hold their window size as a CPU tensor, which their first
    update copies to the device: a blocking copy per layer, each waiting for the layers before it.
    Made on the device instead (a fill, no copy), the first encoder pass never waits either."""
    for layer in cache.layers:
        window = getattr(layer, "_sliding_window_tensor", None)
        if isinstance(window, torch.Tensor) and window.device != device:
            layer._sliding_window_tensor = torch.full((), layer.sliding_window, dtype=window.dtype, device=device)


def expand_cache(cache: DynamicCache, batch: int) -> DynamicCache:
    """A view of a batch-1 cache for ``batch`` rows, with no tensor copied: every row of a canvas
    batch shares the one encoded prefix. The decoder only reads it; an encoder pass may append to it
    (the cache layers rebind their tensors on append, never write into them), and the original
    cache stays as it was. Built from transformers' public cache classes: new layers of the same
    kinds, holding the prefix's keys and values expanded to the batch."""
    wide = DynamicCache()
    wide.layers = [_expand_layer(layer, batch) for layer in cache.layers]
    return wide


def _expand_layer(layer: DynamicLayer, batch: int) -> DynamicLayer:
    if isinstance(layer, DynamicSlidingWindowLayer):
        wide = DynamicSlidingWindowLayer(sliding_window=layer.sliding_window)
        wide.cumulative_length = layer.cumulative_length  # tokens seen, more than the window holds
    elif type(layer) is DynamicLayer:
        wide = DynamicLayer()
    else:
        raise TypeError(f"expand_cache cannot share a {type(layer).__name__} between rows")
    if layer.is_initialized:
        # What `lazy_initialization` sets, less its copy of a sliding layer's window size to the device
        # (a host sync per layer; the model does not read it, and `encode` makes it on the device).
        wide.device, wide.is_initialized = layer.keys.device, True
        wide.keys = layer.keys.expand(batch, -1, -1, -1)
        wide.values = layer.values.expand(batch, -1, -1, -1)
    return wide


SUBNORMAL_MARGIN = 80.0  # nats: e^-80 is a normal float32, e^-88 is not


@dataclass(frozen=True)
class Ban:
    """Tokens the sampler may not draw at some canvas positions: ``mask`` (B, C) bool, kept on the
    host so that finding its positions costs no device sync, and the banned ``token_ids``."""

    mask: torch.Tensor
    token_ids: tuple[int, ...]

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        rows, cols = self.mask.cpu().nonzero(as_tuple=True)
        if not rows.numel():
            return None
        k = len(self.token_ids)
        ids = torch.tensor(self.token_ids).repeat(rows.numel())
        return (rows.repeat_interleave(k).to(device), cols.repeat_interleave(k).to(device), ids.to(device))


@dataclass
class _Layout:
    """What stays fixed over the steps of one canvas: where the pins are, which positions are free."""

    canvas: torch.Tensor  # (B, C) the canvas as given; pinned positions keep its tokens
    pinned: torch.Tensor  # (B, C) bool
    positions: torch.Tensor  # (1, C) the canvas's positions after the cached prefix
    pin_rows: torch.Tensor
    pin_cols: torch.Tensor
    pin_values: torch.Tensor
    any_pinned: bool
    free_index: torch.Tensor  # flat indices of the free positions, in order
    free_rows: torch.Tensor
    free_cols: torch.Tensor
    free: torch.Tensor  # (B, C) bool, ~pinned
    free_count: torch.Tensor  # (B,) free positions per row, at least 1
    vocab: int
    embed_dtype: torch.dtype
    # Where tokens are banned, as (rows, cols, token ids) indices: the first slots of a middle that
    # may not end yet (no <eos>/<pad>); None when nothing is banned.
    banned: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, model, cache: DynamicCache, canvas: torch.Tensor, pinned: torch.Tensor,
           ban: Ban | None = None) -> "_Layout":
        batch, canvas_length = canvas.shape
        start = cache.get_seq_length()
        positions = torch.arange(start, start + canvas_length, dtype=torch.int32, device=canvas.device).unsqueeze(0)
        # The canvas's one host sync before its steps: where the pins are. The free positions are
        # the others, in order (a stable sort puts them first), so their count needs no second sync.
        pin_rows, pin_cols = pinned.nonzero(as_tuple=True)
        free_total = batch * canvas_length - pin_rows.numel()
        free_index = torch.argsort(pinned.reshape(-1).to(torch.uint8), stable=True)[:free_total]
        return cls(canvas=canvas, pinned=pinned, positions=positions, pin_rows=pin_rows, pin_cols=pin_cols,
                   pin_values=canvas[pin_rows, pin_cols], any_pinned=pin_rows.numel() > 0, free_index=free_index,
                   free_rows=free_index // canvas_length, free_cols=free_index % canvas_length, free=~pinned,
                   free_count=(~pinned).sum(-1).clamp(min=1), vocab=model.config.text_config.vocab_size,
                   embed_dtype=model.model.decoder.embed_tokens.weight.dtype,
                   banned=ban.indices(canvas.device) if ban is not None else None)


@dataclass
class _Carry:
    """What one step hands the next."""

    current: torch.Tensor  # (B, C) the canvas the next forward reads
    argmax: torch.Tensor  # (B, C)
    sc_logits: torch.Tensor | None  # the last logits in the embedding dtype, for self-conditioning
    entropy: torch.Tensor  # (B, C), 0 at pinned positions
    finished: torch.Tensor  # (B,) rows that have stopped
    any_finished: bool  # known on the host from the last stop check
    row_temperature: torch.Tensor  # (B, 1, 1) what each row's last logits were divided by
    # The last `stability_threshold` argmax canvases; a row is stable when all equal the new one.
    history: list[torch.Tensor]


def denoise_step(model, cache: DynamicCache, layout: _Layout, carry: _Carry, temperature: float,
                 settings: SamplerSettings, generator: torch.Generator | None, exact: bool) -> _Carry:
    """One denoising step: a decoder forward, the draws at the free positions, acceptance of the
    lowest-entropy ones within the bound, fresh noise elsewhere, and which rows are now finished.
    No host sync: the loop makes the one stop check per step. The step's fp32 logits die with it
    (only their embedding-dtype copy is carried), so the next forward runs without them."""
    batch, canvas_length = layout.canvas.shape
    device = layout.canvas.device
    logits = model(decoder_input_ids=carry.current, self_conditioning_logits=carry.sc_logits, cache=cache,
                   decoder_position_ids=layout.positions).logits
    logits.div_(temperature)  # a fresh fp32 tensor: no copy needed
    if layout.any_pinned:
        # Self-conditioning reads softmax(logits): -inf everywhere but the pinned token makes it
        # one-hot. Written in place: a (pinned x vocab) copy is hundreds of MB at 262k vocab.
        logits[layout.pin_rows, layout.pin_cols] = float("-inf")
        logits[layout.pin_rows, layout.pin_cols, layout.pin_values] = 0.0
    if layout.banned is not None:
        logits[layout.banned] = float("-inf")
    # Pinned positions keep their token and have entropy 0: only free ones are sampled.
    free_sampled, free_argmax, free_entropy = sample_positions(logits, layout.free_index, generator, exact)
    sampled, argmax = layout.canvas.clone(), layout.canvas.clone()
    sampled[layout.free_rows, layout.free_cols] = free_sampled
    argmax[layout.free_rows, layout.free_cols] = free_argmax
    entropy = torch.zeros((batch, canvas_length), dtype=free_entropy.dtype, device=device)
    entropy[layout.free_rows, layout.free_cols] = free_entropy

    # Accept the k lowest-entropy positions whose summed entropy, less the largest, stays in bound.
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    keep_sorted = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= settings.entropy_bound
    accept = torch.scatter(torch.zeros_like(keep_sorted), -1, order, keep_sorted)
    noise = torch.randint(0, layout.vocab, (batch, canvas_length), device=device, generator=generator)
    current = torch.where(accept, sampled, noise)
    if layout.any_pinned:
        current = torch.where(layout.pinned, layout.canvas, current)

    # Rows that already stopped keep their canvas, argmax, logits and so their entropy (copied
    # row by row: recomputing it over the whole batch cost more than the sampling itself).
    # Selected with torch.where, not boolean indexing, which would wait for the device.
    finished = carry.finished
    if carry.any_finished:
        argmax = torch.where(finished[:, None], carry.argmax, argmax)
        current = torch.where(finished[:, None], carry.current, current)
        torch.where(finished[:, None, None], carry.sc_logits, logits, out=logits)
        entropy = torch.where(finished[:, None], carry.entropy, entropy)
    row_temperature = torch.where(finished[:, None, None], carry.row_temperature, temperature)
    history = carry.history
    if settings.stability_threshold == 0:
        stable = torch.ones_like(finished)
    elif len(history) < settings.stability_threshold:
        stable = torch.zeros_like(finished)
    else:
        stable = torch.stack([(old == argmax).all(-1) for old in history]).all(0)
    confident = (entropy * layout.free).sum(-1) / layout.free_count < settings.confidence_threshold
    if settings.stability_threshold:
        history = [*history, argmax][-settings.stability_threshold:]
    if device.type == "cpu":
        # The next forward's self-conditioning is softmax(logits) @ embeddings. On a CPU, the
        # probabilities of tokens more than 87 nats under a position's best are subnormal floats,
        # and they make that matmul about 30x slower (bundled model: 107 ms against 3 ms a step,
        # most of a fill). Raised to 80 nats under the best they are normal and still weigh nothing
        # (a vocabulary of 262k at e^-80 is under 1e-29). GPUs run subnormals at full speed.
        logits.clamp_(min=logits.amax(-1, keepdim=True) - SUBNORMAL_MARGIN)
    return _Carry(current=current, argmax=argmax, sc_logits=logits.to(layout.embed_dtype), entropy=entropy,
                  finished=finished | (stable & confident), any_finished=carry.any_finished,
                  row_temperature=row_temperature, history=history)


def denoise(model, cache: DynamicCache, canvas: torch.Tensor, pinned: torch.Tensor, settings: SamplerSettings,
            generator: torch.Generator | None, interrupt: Interrupt | None = None,
            on_step: Callable[[StepState], None] | None = None, exact: bool = False,
            ban: Ban | None = None) -> CanvasOutcome:
    """Denoise ``canvas`` (B, C) against the cached prefix; ``pinned`` (B, C) positions stay as given,
    and ``ban``'s tokens are never drawn where it says: `denoise_step` until every row has finished
    or the steps run out.

    ``exact`` draws random numbers exactly as transformers does (torch.multinomial), so the same
    seed gives the same tokens as ``generate``; otherwise an equivalent inverse-CDF draw is used,
    several times cheaper on a CPU (multinomial makes one exponential variate per vocabulary entry).
    """
    batch, canvas_length = canvas.shape
    device = canvas.device
    cache = expand_cache(cache, batch)
    layout = _Layout.of(model, cache, canvas, pinned, ban)
    carry = _Carry(current=canvas, argmax=canvas, sc_logits=None,
                   entropy=torch.zeros(batch, canvas_length, device=device),  # read once a row has finished
                   finished=torch.zeros(batch, dtype=torch.bool, device=device), any_finished=False,
                   row_temperature=torch.ones(batch, 1, 1, device=device), history=[])
    steps = 0
    for steps_left in range(settings.max_denoising_steps, 0, -1):
        if interrupt is not None:
            interrupt.check()
        steps += 1
        carry = denoise_step(model, cache, layout, carry, settings.temperature(steps_left), settings, generator,
                             exact)
        if on_step is not None:
            on_step(StepState(step=steps, argmax=carry.argmax, entropy=carry.entropy, finished=carry.finished))
        # The step's one host sync: which rows have stopped.
        done = carry.finished.tolist()
        if all(done):
            break
        carry.any_finished = any(done)
    # Each row's confidence in its own result, from the last step it was still denoising, at
    # temperature 1: at the late steps' low temperature every log-probability is ~0, and rows could
    # not be told apart.
    logprobs = token_logprobs(carry.sc_logits, carry.argmax, carry.row_temperature)
    return CanvasOutcome(argmax=carry.argmax, logprobs=logprobs, steps=steps)
