"""The engine: an editor request becomes seeded canvases, and denoised canvases become text.

request -> context ids (prefix cache) -> canvas plan (canvas.py) -> denoise loop (denoise.py)
-> ranked completions. Canvas layouts and the public API are documented in docs/engine.md.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from dgemma.engine.api import Completion, Draft, Result
from dgemma.engine.canvas import CanvasPlan, FillPlan, Row, line_drafts, plan_rows, slot_candidates, slot_tokens
from dgemma.engine.denoise import Ban, Interrupt, StepState, denoise, encode
from dgemma.errors import DgemmaError
from dgemma.engine.loading import LoadedModel
from dgemma.engine.prefix_cache import PrefixCache, copy_cache, default_budget
from dgemma.engine.settings import SamplerSettings
from dgemma.engine.ranking import SUFFIX_FIT_TOKENS, agreement, suffix_fit
from dgemma.engine.window import Cut, cut_prefix, cut_suffix
from dgemma.engine.plan import PLANNED_CONTEXT, PREFILL_CHUNK_TOKENS, headroom, resident_prefix_budget
from dgemma.engine.static_step import StaticStep, static_mode

log = logging.getLogger("dgemma.engine")

MAX_ALTERNATIVES = 8
MAX_NEW_TOKENS = 4096


@dataclass
class _Row:
    """One decoded row: its middle tokens and the log-probabilities behind them."""

    tokens: list[int]
    finished: bool
    logprob_sum: float
    logprob_count: int

    @property
    def score(self) -> float:
        return self.logprob_sum / max(1, self.logprob_count)


@dataclass
class _Request:
    settings: SamplerSettings
    generator: torch.Generator
    interrupt: Interrupt
    on_step: Callable[[Draft], None] | None
    canvas: int  # positions of every canvas of the request: the model's canvas, or a line's
    min_tokens: int  # leading slots of the first canvas that cannot end the middle
    steps: int = 0
    rows: int = 0  # rows decoded, over all canvases
    canvases: int = 0
    committed: list[int] = field(default_factory=list)  # middle tokens of earlier canvases, for drafts


class Engine:
    """Owns one loaded model (the daemon's `api.FillEngine`). Not thread-safe: a single worker
    thread calls it."""

    def __init__(self, loaded: LoadedModel, *, settings: SamplerSettings | None = None,
                 prefix_cache_bytes: int | None = None, max_rows: int | None = None,
                 logits_budget_bytes: int | None = None, prefix_device_bytes: int | None = None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        config = self.model.config
        self.text_config = config.get_text_config(decoder=True)
        self.canvas_length: int = config.canvas_length
        self.context_limit: int = self.text_config.max_position_embeddings
        self.vocab_size: int = self.text_config.vocab_size
        self.eos_id = _single_id(self.tokenizer.eos_token_id, self.text_config.eos_token_id)
        self.pad_id = _single_id(self.tokenizer.pad_token_id, self.text_config.pad_token_id)
        self.bos_token: str = self.tokenizer.bos_token or ""
        # What one token can span, for cutting huge texts by characters before tokenizing them.
        self.max_token_chars = max(1, max(map(len, self.tokenizer.get_vocab())))
        self.settings = settings or SamplerSettings.from_mapping(
            loaded.sampler, base=SamplerSettings.from_generation_config(self.model.generation_config))
        # Every row of a batch holds a few fp32 (canvas x vocab) logits tensors during a step (the
        # forward's output and softcap, the previous step's self-conditioning logits; sampling itself is
        # chunked): about 1 GiB per row at 262k vocabulary. Rows beyond the budget wait for the next batch.
        per_row = 4 * self.canvas_length * self.vocab_size * 4
        self.max_rows = max_rows or max(1, (logits_budget_bytes or (1 << 30)) // per_row)
        # The decoder step (engine/static_step.py), read here so that a bad DGEMMA_GRAPHS fails now.
        # Its buffers hold a prefix of the planned context; a longer one decodes on the dynamic cache.
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 0
        graphs_fit = self.device.type != "cuda" or headroom(config, free, self.max_rows, graphs=True) >= 0
        self.static_mode = static_mode(self.device, graphs_fit)
        if not graphs_fit and self.static_mode is None:
            log.warning("CUDA graphs would not fit the %.2f GiB this GPU has free beside the weights; decoding "
                        "without them (DGEMMA_GRAPHS=1 forces them)", free / (1 << 30))
        self.static_capacity = min(self.context_limit, PLANNED_CONTEXT)
        self._static: StaticStep | None = None
        if prefix_device_bytes is None:
            # On a GPU, what the memory plan's peak leaves of the memory free once the weights are in.
            prefix_device_bytes = 0 if self.device.type != "cuda" else resident_prefix_budget(
                config, free, self.max_rows, self.static_mode == "graphs")
        self.prefix_cache = PrefixCache(default_budget(self.device) if prefix_cache_bytes is None
                                        else prefix_cache_bytes, prefix_device_bytes)

    # ------------------------------------------------------------------ public API
    @property
    def model_name(self) -> str:
        return self.loaded.name

    def fill(self, prefix: str, suffix: str, *, n: int = 1, max_tokens: int = 256, max_lines: int | None = None,
             min_tokens: int = 0, accept: Callable[[str], bool] | None = None, seed: int | None = None,
             settings: SamplerSettings | dict | None = None, on_step: Callable[[Draft], None] | None = None,
             cancel: object | None = None, deadline: float | None = None) -> Result:
        """The middle between ``prefix`` and ``suffix``: n alternatives, best first.

        ``max_lines=1`` asks for one line, which the line plan decodes on a short canvas with few
        rows (settings ``line_canvas``, ``line_draws``). The first ``min_tokens`` tokens of every row
        cannot end the middle, and rows whose text ``accept`` refuses (the text of their first
        canvas) rank after every other row: a request for code (an explicit fill, a regenerated
        selection) gets code back."""
        _check_text(prefix=prefix, suffix=suffix)
        _check_counts(n, max_tokens)
        _check_minimum(min_tokens, max_tokens)
        if not prefix and not suffix:
            raise DgemmaError("invalid_params", "Nothing to fill: prefix and suffix are both empty.")
        settings = self._settings(settings)
        min_tokens += _indentation_token(prefix) if min_tokens else 0
        drafts = [self._encode(d) for d in line_drafts(prefix)] if settings.draft_strength else []
        plan = FillPlan.of(self.canvas_length, settings.line_canvas, max_lines, max(n, settings.draws),
                           max(n, settings.line_draws), min_tokens, drafts)
        # Room after the prefix: the canvases max_tokens can take, and the suffix head scored after them.
        room = plan.canvas if plan.line else self.canvas_length * math.ceil(min(max_tokens, MAX_NEW_TOKENS) / self.canvas_length)
        ids, stable, window = self._context(self.bos_token, prefix, room + SUFFIX_FIT_TOKENS)
        suffix = self._suffix(suffix)

        return self._run(ids, stable, suffix.ids, plan.rows, n=n, max_tokens=max_tokens, seed=seed,
                         settings=settings, on_step=on_step, cancel=cancel, deadline=deadline,
                         strength=settings.draft_strength, dropped=(window.dropped, suffix.dropped),
                         canvas=plan.canvas, min_tokens=min_tokens, accept=accept)

    def edit(self, prefix: str, selection: str, suffix: str, instruction: str, *, n: int = 1,
             strength: float = 0.5, max_tokens: int | None = None, min_tokens: int = 0,
             accept: Callable[[str], bool] | None = None, seed: int | None = None,
             settings: SamplerSettings | dict | None = None, on_step: Callable[[Draft], None] | None = None,
             cancel: object | None = None, deadline: float | None = None) -> Result:
        """A rewrite of ``selection`` following ``instruction``; canvases start from the selection.
        ``min_tokens`` and ``accept`` as in `fill`."""
        _check_text(prefix=prefix, selection=selection, suffix=suffix, instruction=instruction)
        _check_counts(n, max_tokens)
        _check_minimum(min_tokens, max_tokens)
        if not instruction.strip():
            raise DgemmaError("invalid_params", "The edit instruction is empty.")
        if not 0.0 <= strength <= 1.0:
            raise DgemmaError("invalid_params", f"strength must be in [0, 1], got {strength}.")
        canvas = self.canvas_length
        if len(selection) > self.context_limit * self.max_token_chars:  # surely too many tokens
            raise self._selection_too_large(f"{len(selection)} characters")
        selection_ids = self._encode(selection)
        longest = slot_candidates(canvas, canvas)[-1]
        slack = max(8, len(selection_ids) // 4)
        # All but the last block rewrite a full canvas of the selection; the last one gets slack to
        # grow and the pinned suffix after it.
        full_blocks = max(0, math.ceil((len(selection_ids) + slack - longest) / canvas))
        # Every block but the last is committed to the context before the next is decoded.
        room = (full_blocks + 1) * canvas + SUFFIX_FIT_TOKENS
        if room >= self.context_limit:
            raise self._selection_too_large(f"{len(selection_ids)} tokens")
        ids, stable, window = self._context(self._instruction_prompt(instruction), prefix, room)
        suffix = self._suffix(suffix)
        settings = self._settings(settings)
        chunks = [selection_ids[i * canvas:(i + 1) * canvas] for i in range(full_blocks)]
        last = selection_ids[full_blocks * canvas:]

        def plans(block: int, budget: int) -> list[Row]:
            draws = max(n, settings.draws) if block == 0 else 1
            if block < len(chunks):
                return [(canvas, chunks[block])] * draws
            if block == len(chunks):
                return [(max(min(longest, len(last) + slack, budget), min(min_tokens, longest)), last)] * draws
            return []  # the selection is rewritten: no further canvases

        budget = max_tokens if max_tokens is not None else min(MAX_NEW_TOKENS, len(selection_ids) + slack + canvas)
        return self._run(ids, stable, suffix.ids, plans, n=n, max_tokens=budget, seed=seed, settings=settings,
                         on_step=on_step, cancel=cancel, deadline=deadline, strength=strength,
                         dropped=(window.dropped, suffix.dropped), canvas=canvas, min_tokens=min_tokens,
                         accept=accept)

    def _selection_too_large(self, size: str) -> DgemmaError:
        return DgemmaError("too_large", f"The selection is {size}: rewriting it needs more than the model's "
                           f"context of {self.context_limit} tokens. Select fewer lines.")

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, *, max_new_tokens: int = 256, seed: int = 0,
                 settings: SamplerSettings | None = None) -> torch.Tensor:
        """Unconstrained block diffusion, as ``DiffusionGemmaForBlockDiffusion.generate`` does it:
        same seed and settings give the same tokens. Returns prompt + canvases, padded after <eos>."""
        settings = settings or self.settings
        generator = torch.Generator(self.device).manual_seed(seed)
        ids = input_ids.to(self.device)
        batch = ids.shape[0]
        max_length = ids.shape[1] + max_new_tokens
        cache = DynamicCache(config=self.text_config)
        encode(self.model, ids, cache)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        no_pins = torch.zeros(batch, self.canvas_length, dtype=torch.bool, device=self.device)
        for _ in range(math.ceil(max_new_tokens / self.canvas_length)):
            noise = self._noise(batch, generator)
            canvas = denoise(self.model, cache, noise, no_pins, settings, generator, exact=True).argmax.clone()
            is_eos = canvas == self.eos_id
            done_now = is_eos.any(-1) | (ids.shape[1] + self.canvas_length >= max_length)
            before, finished = finished, finished | done_now
            if finished.any():
                canvas[before] = self.pad_id
                seen = is_eos.cumsum(-1)
                canvas[(seen > 0) & ~((seen == 1) & is_eos)] = self.pad_id
            ids = torch.cat([ids, canvas], dim=-1)
            if bool(finished.all()):
                break
            encode(self.model, canvas, cache)
        return ids

    def _settings(self, settings: SamplerSettings | dict | None) -> SamplerSettings:
        """A request's sampler settings: its overrides over the engine's defaults."""
        if isinstance(settings, SamplerSettings):
            return settings
        return SamplerSettings.from_mapping(settings, base=self.settings)

    # ------------------------------------------------------------------ request -> context ids
    def _encode(self, text: str) -> list[int]:
        """Token ids of user text. Special-token spellings in it ("<eos>" in a string literal)
        stay text: only the engine places special tokens."""
        return self._encode_offsets(text)[0]

    def _instruction_prompt(self, instruction: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                                      add_generation_prompt=True)
        return f"{self.bos_token}{instruction}\n\n"

    def _encode_special(self, text: str) -> list[int]:
        """Token ids of engine-made text (<bos>, the chat template): special tokens parsed."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not text:
            return [], []
        enc = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    def _context(self, head: str, code: str, room: int) -> tuple[list[int], int, Cut]:
        """Token ids of ``head`` followed by the window of ``code`` that leaves ``room`` tokens of
        the context free (engine/window.py), how many leading ids are *stable*, and the cut. Stable
        ids end before the whitespace run holding the window's last newline, so typing on the
        current line cannot change them. Prefill always splits there, which makes a prefix-cache
        hit compute exactly what a cold run computes."""
        head_ids = self._encode_special(head) if len(head) <= self.context_limit * self.max_token_chars else None
        budget = self.context_limit - len(head_ids) - room if head_ids is not None else -1
        if budget < 0:
            raise DgemmaError("too_large", f"The instruction and the answer's {room} tokens are "
                              f"together more than the model's context of {self.context_limit}. Shorten the "
                              "instruction, or select fewer lines.")
        window = cut_prefix(code, budget, self._encode_offsets, self.max_token_chars)
        text = code[window.dropped:]
        cut = len(text[: text.rfind("\n")].rstrip()) if "\n" in text else 0
        return head_ids + window.ids, len(head_ids) + sum(1 for _, end in window.offsets if end <= cut), window

    def _suffix(self, suffix: str) -> Cut:
        """The suffix's head: a canvas pins at most its first canvas_length tokens."""
        return cut_suffix(suffix, self.canvas_length, self._encode_offsets, self.max_token_chars)

    @torch.no_grad()
    def _prefill(self, ids: list[int], stable: int) -> tuple[DynamicCache, int]:
        hit = self.prefix_cache.lookup(ids[:stable])
        cache, done = (hit[1], len(hit[0])) if hit else (DynamicCache(config=self.text_config), 0)
        del hit
        if self.static_mode is not None and len(ids) <= self.static_capacity:
            # The prefix lives once, in the static step's buffers: a hit is copied in (its own copy
            # dropped) and the encoder appends straight into them (static_step.BufferCache).
            if self._static is None:
                self._static = StaticStep(self.model, self.static_capacity, graphs=self.static_mode == "graphs")
            cache = self._static.cache(cache)
        if done < stable:
            self._encode_in_chunks(ids[done:stable], cache)
            self.prefix_cache.store(ids[:stable], cache)
        if stable < len(ids):
            self._encode_in_chunks(ids[stable:], cache)
        return cache, done

    def _encode_in_chunks(self, part: list[int], cache: DynamicCache) -> None:
        """Encoder passes of at most PREFILL_CHUNK_TOKENS: a sliding-window layer keeps every key of
        its last pass behind its window view, so one 8k pass would hold 1.6 GiB more on the 26B
        (the memory plan counts on this)."""
        for start in range(0, len(part), PREFILL_CHUNK_TOKENS):
            chunk = torch.tensor([part[start:start + PREFILL_CHUNK_TOKENS]], dtype=torch.long, device=self.device)
            encode(self.model, chunk, cache)

    # ------------------------------------------------------------------ canvases -> completions
    def _noise(self, batch: int, generator: torch.Generator, length: int | None = None) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, (batch, length or self.canvas_length), device=self.device,
                             generator=generator)

    def _plan(self, rows: list[Row], suffix_ids: list[int], strength: float, generator: torch.Generator,
              canvas: int, min_tokens: int = 0) -> CanvasPlan:
        noise = self._noise(len(rows), generator, canvas)
        seeds = [seed for _, seed in rows]
        slots = [m for m, _ in rows]
        if all(seed is None for seed in seeds):
            return plan_rows(noise, slots, suffix_ids, self.eos_id, self.pad_id, min_tokens=min_tokens)
        renoise = torch.rand(noise.shape, device=self.device, generator=generator) < strength
        renoise[[i for i, seed in enumerate(seeds) if seed is None]] = True  # unseeded rows: all noise
        return plan_rows(noise, slots, suffix_ids, self.eos_id, self.pad_id,
                         seeds=[seed or [] for seed in seeds], renoise=renoise, min_tokens=min_tokens)

    def _decode_canvas(self, cache: DynamicCache, rows: list[Row], suffix_ids: list[int],
                       strength: float, req: _Request) -> list[_Row]:
        """Denoise one canvas for every planned row, ``max_rows`` rows per batch."""
        decoded = []
        decoder = self._decoder(cache, req.canvas)
        # The middle's minimum length binds its first canvas; later ones continue it.
        min_tokens = req.min_tokens if req.canvases == 0 else 0
        for start in range(0, len(rows), self.max_rows):
            plan = self._plan(rows[start:start + self.max_rows], suffix_ids, strength, req.generator, req.canvas,
                              min_tokens)
            observer = self._draft_observer(plan, req) if req.on_step else None
            ban = Ban(plan.unended, (self.eos_id, self.pad_id)) if plan.unended is not None else None
            args = (cache, plan.tokens.to(self.device), plan.pinned.to(self.device), req.settings, req.generator,
                    req.interrupt, observer, False, ban)
            try:
                outcome = denoise(decoder, *args)
            except DgemmaError:
                raise  # cancelled, deadline: the request's own end, whatever decodes it
            except Exception as exc:
                if decoder is self.model:
                    raise
                # The static step (CUDA graphs on a GPU) cannot have run on every GPU and driver a
                # user has: when it fails, this engine decodes on the dynamic cache from now on, and
                # says so once, rather than failing every request.
                log.warning("the static decoder step failed (%s: %s); decoding on the dynamic cache from now "
                            "on (DGEMMA_GRAPHS=0 skips it)", type(exc).__name__, exc, exc_info=exc)
                self.static_mode, self._static = None, None
                decoder = self.model
                outcome = denoise(decoder, *args)
            req.steps += outcome.steps
            req.rows += len(plan.slots)
            argmax, logprobs = outcome.argmax.tolist(), outcome.logprobs
            for i, m in enumerate(plan.slots):
                tokens, finished = slot_tokens(argmax[i], m, self.eos_id)
                # A canvas with no pinned tail is a middle block of a long edit: more follows it.
                finished = finished and m < req.canvas
                scored = len(tokens) + 1 if finished else m  # the closing <eos> is part of the answer
                decoded.append(_Row(tokens, finished, float(logprobs[i, :scored].sum()), scored))
        req.canvases += 1
        return decoded

    def _decoder(self, cache: DynamicCache, canvas: int) -> StaticStep | torch.nn.Module:
        """What denoises a ``canvas``-position canvas against ``cache``: the static step with the
        prefix loaded (made, and on a GPU its graphs captured, on first use), or the model on the
        dynamic cache."""
        if self.static_mode is None or cache.get_seq_length() > self.static_capacity or canvas != self.canvas_length:
            return self.model
        if self._static is None:
            self._static = StaticStep(self.model, self.static_capacity, graphs=self.static_mode == "graphs")
        self._static.load(cache)
        return self._static

    def _draft_observer(self, plan: CanvasPlan, req: _Request) -> Callable[[StepState], None]:
        free = (~plan.pinned).to(self.device)

        def observe(state: StepState) -> None:
            # The draft is the row the model is currently most sure of.
            mean_entropy = (state.entropy * free).sum(-1) / free.sum(-1).clamp(min=1)
            row = int(mean_entropy.argmin())
            tokens, _ = slot_tokens(state.argmax[row].tolist(), plan.slots[row], self.eos_id)
            req.on_step(Draft(text=self._decode(req.committed + tokens), step=req.steps + state.step,
                              canvas=req.canvases))
        return observe

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @torch.no_grad()
    def _run(self, ids: list[int], stable: int, suffix_ids: list[int],
             plans: Callable[[int, int], list[Row]], *, n: int, max_tokens: int,
             seed: int | None, settings: SamplerSettings | dict | None, on_step: Callable[[Draft], None] | None,
             cancel: object | None, deadline: float | None, strength: float, canvas: int, min_tokens: int,
             accept: Callable[[str], bool] | None, dropped: tuple[int, int] = (0, 0)) -> Result:
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        settings = self._settings(settings)
        started = time.perf_counter()
        req = _Request(settings=settings, generator=torch.Generator(self.device).manual_seed(int(seed)),
                       interrupt=Interrupt(cancel, deadline), on_step=on_step, canvas=canvas,
                       min_tokens=min_tokens)
        req.interrupt.check()
        cache, cached = self._prefill(ids, stable)

        # First canvas: every planned layout (the plan draws each several times), in one batch.
        # A row whose text the request does not accept comes last, then an empty middle (a request
        # for a fill wants text, and closing at once is the cheapest thing a model can say); then,
        # when the settings rank by it, the row that leads best into the suffix (ranking.py); then
        # rows that ran out of slots (they cost another canvas each); then the rows most like all
        # the others (ranking.py).
        decoded = self._decode_canvas(cache, plans(0, max_tokens), suffix_ids, strength, req)
        texts = [self._decode(row.tokens) for row in decoded]
        accepted = [accept is None or accept(text) for text in texts]
        votes = agreement(texts)
        fits = self._fits(cache, len(ids), decoded, suffix_ids, settings)
        chosen, seen = [], set()
        for i in sorted(range(len(decoded)), reverse=True, key=lambda i: (
                accepted[i], bool(decoded[i].tokens), fits[i] or 0.0, decoded[i].finished, votes[i],
                decoded[i].score)):
            if len(chosen) == n:
                break
            if tuple(decoded[i].tokens) not in seen:
                seen.add(tuple(decoded[i].tokens))
                chosen.append((decoded[i], votes[i], fits[i]))

        completions = []
        for row, vote, fit in chosen:
            branch = cache if len(chosen) == 1 else copy_cache(cache, self.device)
            row = self._continue(branch, len(ids), row, suffix_ids, plans, max_tokens, strength, req)
            completions.append(Completion(text=self._decode(row.tokens), score=row.score, agreement=vote,
                                          fit=fit, tokens=len(row.tokens), finished=row.finished))
        return Result(completions=completions, steps=req.steps, canvases=req.canvases, rows=req.rows,
                      prompt_tokens=len(ids),
                      cached_tokens=cached, prefix_dropped=dropped[0], suffix_dropped=dropped[1],
                      ms=(time.perf_counter() - started) * 1000, seed=int(seed), model=self.loaded.name)

    def _fits(self, cache: DynamicCache, context: int, rows: list[_Row], suffix_ids: list[int],
              settings: SamplerSettings) -> list[float | None]:
        """Each row's suffix fit, when the settings rank by it (None otherwise, and for empty rows).
        Identical middles are scored once; the suffix head is cut to what the context still holds."""
        if settings.rank_by != "suffix_fit":
            return [None] * len(rows)
        middles = list(dict.fromkeys(tuple(row.tokens) for row in rows))
        room = self.context_limit - context - max(len(m) for m in middles)
        scored = suffix_fit(self.model, cache, [list(m) for m in middles],
                            suffix_ids[:max(0, min(SUFFIX_FIT_TOKENS, room))], self.pad_id)
        by_middle = dict(zip(middles, scored))
        return [by_middle[tuple(row.tokens)] for row in rows]

    def _continue(self, cache: DynamicCache, context: int, row: _Row, suffix_ids: list[int],
                  plans: Callable[[int, int], list[Row]], max_tokens: int,
                  strength: float, req: _Request) -> _Row:
        """Commit the canvas and decode the next one until the middle ends, the plan runs out, the
        token budget is spent or the context is full."""
        block, new = 1, row.tokens
        req.committed = list(row.tokens)
        while not row.finished and len(row.tokens) < max_tokens:
            rows = plans(block, max_tokens - len(row.tokens))
            if not rows or context + len(row.tokens) + self.canvas_length > self.context_limit:
                break
            if new:
                encode(self.model, torch.tensor([new], dtype=torch.long, device=self.device), cache)
            nxt = max(self._decode_canvas(cache, rows, suffix_ids, strength, req), key=_continuation_rank)
            row = _Row(row.tokens + nxt.tokens, nxt.finished, row.logprob_sum + nxt.logprob_sum,
                       row.logprob_count + nxt.logprob_count)
            req.committed = list(row.tokens)
            block, new = block + 1, nxt.tokens
        row.tokens = row.tokens[:max_tokens]
        return row


def _continuation_rank(row: _Row) -> tuple:
    """A later canvas of one middle: finished rows first, by score (an immediate <eos> just means
    the middle ended with the previous canvas); among unfinished ones the row that got furthest,
    since it continues into the next canvas."""
    if row.finished:
        return (True, row.score)
    return (False, len(row.tokens), row.score)


def _single_id(*candidates: int | list[int] | None) -> int:
    for value in candidates:
        if isinstance(value, list) and value:
            return int(value[0])
        if isinstance(value, int):
            return value
    raise DgemmaError("model_missing", "The model's tokenizer defines no <eos>/<pad> token.")


def _check_text(**values: object) -> None:
    for name, value in values.items():
        if not isinstance(value, str):
            raise DgemmaError("invalid_params", f"'{name}' must be a string, got {type(value).__name__}.")


def _check_minimum(min_tokens: object, max_tokens: int | None) -> None:
    if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or not 0 <= min_tokens <= (max_tokens or MAX_NEW_TOKENS):
        raise DgemmaError("invalid_params", f"min_tokens must be an integer in 0..max_tokens, got {min_tokens!r}.")


def _indentation_token(prefix: str) -> int:
    """1 when the cursor starts a line: a middle written there usually opens with indentation,
    a token that is not yet code."""
    return 0 if prefix[prefix.rfind("\n") + 1:].strip() else 1


def _check_counts(n: object, max_tokens: object) -> None:
    if not isinstance(n, int) or not 1 <= n <= MAX_ALTERNATIVES:
        raise DgemmaError("invalid_params", f"n must be an integer in 1..{MAX_ALTERNATIVES}, got {n!r}.")
    if max_tokens is not None and (not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_NEW_TOKENS):
        raise DgemmaError("invalid_params", f"max_tokens must be in 1..{MAX_NEW_TOKENS}, got {max_tokens!r}.")
