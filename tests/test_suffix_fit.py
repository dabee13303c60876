"""Suffix fit (engine/ranking.py): the causal encoder's log-probability of the suffix's first
tokens after a middle, computed on a view of the prefix cache."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from dgemma.engine.denoise import encode
from dgemma.engine.engine import Engine
from dgemma.engine.loading import load_model
from dgemma.engine.ranking import suffix_fit


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine(load_model(tiny_model_dir, device="cpu"))


def full_pass_fit(model, context: list[int], middle: list[int], suffix_head: list[int]) -> float:
    """The same quantity from one uncached encoder pass over context + middle + suffix head."""
    ids = torch.tensor([context + middle + suffix_head])
    hidden = model.model.encoder(input_ids=ids).last_hidden_state
    logits = model.lm_head(hidden[0]).float()
    cap = model.final_logit_softcapping
    logprobs = torch.log_softmax(torch.tanh(logits / cap) * cap, dim=-1)
    start = len(context) + len(middle) - 1
    return float(sum(logprobs[start + j, token] for j, token in enumerate(suffix_head)))


@pytest.mark.parametrize("middles", [[[40, 41, 42]], [[40, 41, 42], [7], [], [300, 301, 302, 303, 304]]])
def test_fit_matches_an_uncached_pass_and_leaves_the_cache(engine: Engine, middles) -> None:
    model, context, suffix_head = engine.model, [2, 310, 41, 977, 12, 55], [90, 91, 92, 93]
    cache = DynamicCache(config=engine.text_config)
    encode(model, torch.tensor([context]), cache)
    before = [layer.keys.clone() for layer in cache.layers]
    fits = suffix_fit(model, cache, middles, suffix_head, engine.pad_id)
    for middle, fit in zip(middles, fits):
        if not middle:
            assert fit is None
        else:
            assert fit == pytest.approx(full_pass_fit(model, context, middle, suffix_head), abs=1e-3)
    assert cache.get_seq_length() == len(context)
    assert all(torch.equal(layer.keys, old) for layer, old in zip(cache.layers, before))


def test_no_suffix_means_no_preference(engine: Engine) -> None:
    cache = DynamicCache(config=engine.text_config)
    encode(engine.model, torch.tensor([[2, 5, 6]]), cache)
    assert suffix_fit(engine.model, cache, [[7, 8], [], [9]], [], engine.pad_id) == [0.0, None, 0.0]


def test_fill_ranks_by_fit_when_asked(engine: Engine) -> None:
    settings = {"max_denoising_steps": 3, "rank_by": "suffix_fit", "draws": 2}
    res = engine.fill("def add(a, b):\n    return", "\n\nprint(add(1, 2))\n", n=4, max_tokens=12, seed=1,
                      settings=settings)
    texts = [c for c in res.completions if c.text]
    assert texts and all(c.fit is not None for c in texts)
    assert [c.fit for c in texts] == sorted((c.fit for c in texts), reverse=True)
    plain = engine.fill("def add(a, b):\n    return", "\n", max_tokens=12, seed=1, settings={"max_denoising_steps": 3})
    assert plain.completions[0].fit is None  # agreement ranking: nothing to measure


def test_bundled_model_prefers_a_middle_that_connects() -> None:
    """On the trained bundled model a fit tells a finished statement from one cut off mid-way."""
    loaded = load_model(device="cpu")
    eng = Engine(loaded)
    # Its dgemma_sampler.json, as train.config writes it.
    assert (eng.settings.rank_by, eng.settings.draws, eng.settings.draft_strength) == ("suffix_fit", 3, 0.25)
    ids, _, _ = eng._context(eng.bos_token, "def add(a, b):\n", 0)
    cache = DynamicCache(config=eng.text_config)
    encode(eng.model, torch.tensor([ids]), cache)
    whole, cut = eng._encode("    return a + b"), eng._encode("    return a +")
    fits = suffix_fit(eng.model, cache, [whole, cut], eng._encode("\n\n\nprint(add(1, 2))\n"), eng.pad_id)
    assert fits[0] > fits[1]
