"""The static-shape decoder step (engine/static_step.py) on the tiny test model, on a CPU.

What runs here: the static buffers, masks, row buckets and the step under
``torch.compile(fullgraph=True, dynamic=False)`` (Inductor; fullgraph makes any graph break an
error), each against the model's own forward and the eager denoising loop. What cannot run here:
the CUDA-graph capture an engine on a GPU runs by default (``DGEMMA_GRAPHS=0`` turns it off).
"""
from __future__ import annotations

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

from dgemma.engine.denoise import denoise, encode, expand_cache
from dgemma.engine.prefix_cache import cache_bytes, copy_cache
from dgemma.engine.settings import SamplerSettings
from dgemma.engine.static_step import StaticStep, bucket, static_mode
from dgemma.errors import DgemmaError
from tiny import tiny_config

PREFIX = 40  # past the tiny model's 32-token sliding window


@pytest.fixture(scope="module")
def model_and_cache() -> tuple[DiffusionGemmaForBlockDiffusion, DynamicCache]:
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(tiny_config(vocab_size=512, canvas_length=16)).eval()
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        encode(model, torch.randint(3, 512, (1, PREFIX), generator=torch.Generator().manual_seed(1)), cache)
    return model, cache


def test_rows_go_to_buckets_and_graphs_need_a_gpu(monkeypatch, model_and_cache) -> None:
    assert [bucket(n) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError):
        bucket(9)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("DGEMMA_GRAPHS", raising=False)
    assert (static_mode(cpu), static_mode(cuda)) == (None, "graphs")
    assert static_mode(cuda, graphs_fit=False) is None  # by default only where they fit
    monkeypatch.setenv("DGEMMA_GRAPHS", "1")
    assert (static_mode(cpu), static_mode(cuda)) == ("eager", "graphs")
    assert static_mode(cuda, graphs_fit=False) == "graphs"  # asked for: the user's call
    monkeypatch.setenv("DGEMMA_GRAPHS", "0")
    assert (static_mode(cpu), static_mode(cuda)) == (None, None)
    monkeypatch.setenv("DGEMMA_GRAPHS", "yes")
    with pytest.raises(DgemmaError, match="DGEMMA_GRAPHS"):
        static_mode(cpu)
    with pytest.raises(ValueError, match="CUDA"):
        StaticStep(model_and_cache[0], capacity=64, graphs=True)


@pytest.mark.parametrize("rows", [1, 3, 10])
def test_static_step_matches_the_model_forward(model_and_cache, rows: int) -> None:
    """Padded KV slots masked out, rows padded to a bucket (10 = 8 + a bucket of 2), and the first
    step's zeroed self-conditioning equal to passing none."""
    model, cache = model_and_cache
    step = StaticStep(model, capacity=64)
    step.load(cache)
    gen = torch.Generator().manual_seed(rows)
    canvas = torch.randint(0, 512, (rows, 16), generator=gen)
    sc = torch.randn(rows, 16, 512, generator=gen)
    positions = torch.arange(PREFIX, PREFIX + 16)[None]
    with torch.no_grad():
        for logits in (sc, None):
            want = model(decoder_input_ids=canvas, self_conditioning_logits=logits, cache=expand_cache(cache, rows),
                         decoder_position_ids=positions).logits
            got = step(decoder_input_ids=canvas, self_conditioning_logits=logits, cache=cache).logits
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_prefix_of_another_length_is_refused(model_and_cache) -> None:
    model, cache = model_and_cache
    step = StaticStep(model, capacity=64)
    with pytest.raises(RuntimeError, match="load"):
        step(decoder_input_ids=torch.zeros(1, 16, dtype=torch.long), cache=cache)
    step.load(cache)
    other = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        encode(model, torch.randint(3, 512, (1, 8)), other)
    with pytest.raises(RuntimeError, match="load"):
        step(decoder_input_ids=torch.zeros(1, 16, dtype=torch.long), cache=other)
    with pytest.raises(ValueError, match="capacity"):
        StaticStep(model, capacity=16).load(cache)


def test_compiled_step_denoises_to_the_same_tokens_as_eager(model_and_cache) -> None:
    """torch.compile(fullgraph=True, dynamic=False) of the whole decoder step: no graph break, and
    the denoising loop driven by it gives the eager loop's tokens, with pins and 3 rows (bucket 4)."""
    model, cache = model_and_cache
    canvas = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(5))
    pinned = torch.zeros_like(canvas, dtype=torch.bool)
    pinned[:, 12:] = True
    settings = SamplerSettings(max_denoising_steps=8)
    eager = denoise(model, cache, canvas, pinned, settings, torch.Generator().manual_seed(3))
    step = StaticStep(model, capacity=64, compile=True)
    step.load(cache)
    compiled = denoise(step, cache, canvas, pinned, settings, torch.Generator().manual_seed(3))
    assert torch.equal(compiled.argmax, eager.argmax) and compiled.steps == eager.steps
    torch.testing.assert_close(compiled.logprobs, eager.logprobs, rtol=1e-4, atol=1e-4)


def _passes(model, cache, lengths: tuple[int, ...], seed: int = 7) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return [encode(model, torch.randint(3, 512, (1, n), generator=gen), cache) for n in lengths]


def test_the_encoder_writes_into_the_buffers_exactly_as_into_a_dynamic_cache(model_and_cache) -> None:
    """A BufferCache (StaticStep.cache) holds the prefix in the step's buffers, the engine's only copy:
    encoder passes across the sliding window give the dynamic cache's hidden states and keys bit for
    bit, the step decodes it without copying, and a copy of it is a plain compact DynamicCache."""
    model, _ = model_and_cache
    step = StaticStep(model, capacity=64)
    cache, dynamic = step.cache(), DynamicCache(config=model.config.text_config)
    lengths = (20, 25, 16)  # 61 tokens, past the 32-token window
    for got, want in zip(_passes(model, cache, lengths), _passes(model, dynamic, lengths)):
        assert torch.equal(got, want)
    assert step.holds(cache) and cache.get_seq_length() == dynamic.get_seq_length() == 61
    for layer, want, buffer in zip(cache.layers, dynamic.layers, step.keys):
        assert torch.equal(layer.keys, want.keys) and torch.equal(layer.values, want.values)
        assert layer.keys.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    copied = copy_cache(cache, torch.device("cpu"))
    assert type(copied) is DynamicCache and cache_bytes(copied) == cache_bytes(dynamic)
    assert sum(layer.keys.untyped_storage().nbytes() for layer in copied.layers) == cache_bytes(copied) // 2
    step.load(cache)  # nothing to copy: the keys are where the step reads them
    canvas = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    pinned = torch.zeros_like(canvas, dtype=torch.bool)
    settings = SamplerSettings(max_denoising_steps=4)
    want = denoise(model, dynamic, canvas, pinned, settings, torch.Generator().manual_seed(3))
    got = denoise(step, cache, canvas, pinned, settings, torch.Generator().manual_seed(3))
    assert torch.equal(got.argmax, want.argmax)
    # The model decodes on it too (the engine's fallback, a line canvas): its layers are transformers' own.
    on_model = denoise(model, cache, canvas, pinned, settings, torch.Generator().manual_seed(3))
    assert torch.equal(on_model.argmax, want.argmax) and torch.equal(on_model.logprobs, want.logprobs)


def test_a_cache_loses_the_buffers_only_to_copies_of_its_own(model_and_cache) -> None:
    """Loading another cache, or making a new BufferCache, first detaches the one over the buffers:
    it keeps its prefix; a pass past the capacity detaches it too, and it goes on as a dynamic cache."""
    model, prefix = model_and_cache
    step = StaticStep(model, capacity=64)
    first = step.cache(prefix)  # a prefix-cache hit: copied in
    dynamic = copy_cache(prefix, torch.device("cpu"))
    assert step.holds(first) and first.get_seq_length() == PREFIX
    other = DynamicCache(config=model.config.text_config)
    _passes(model, other, (8,))
    step.load(other)  # overwrites the buffers
    assert not step.holds(first) and not first.attached
    for layer, want in zip(first.layers, dynamic.layers):
        assert torch.equal(layer.keys, want.keys) and torch.equal(layer.values, want.values)
    second = step.cache(prefix)
    third = step.cache()
    assert not second.attached and second.get_seq_length() == PREFIX and step.holds(third)
    # Past the capacity: 40 + 30 > 64 tokens of the full layer.
    for got, want in zip(_passes(model, second, (30,)), _passes(model, dynamic, (30,))):
        assert torch.equal(got, want)
    grown = step.cache(prefix)
    for got, want in zip(_passes(model, grown, (30,)), _passes(model, copy_cache(prefix, torch.device("cpu")), (30,))):
        assert torch.equal(got, want)
    assert not grown.attached and grown.get_seq_length() == 70
    with pytest.raises(ValueError, match="capacity"):
        StaticStep(model, capacity=16).cache(prefix)
