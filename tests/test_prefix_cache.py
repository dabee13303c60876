"""The prefix cache's device-resident entry (engine/prefix_cache.py), on a CPU: which entry stays
resident, the budget, and that a hit on it copies nothing while the caller's cache is its own.
The host-to-GPU copies themselves (pinned, non_blocking) need a GPU and are not run here."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

from dgemma.engine.denoise import encode
from dgemma.engine.prefix_cache import PrefixCache, cache_bytes
from tiny import tiny_config


@pytest.fixture(scope="module")
def model() -> DiffusionGemmaForBlockDiffusion:
    torch.manual_seed(0)
    return DiffusionGemmaForBlockDiffusion(tiny_config(vocab_size=512)).eval()


def _cache(model, ids: list[int]) -> DynamicCache:
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        encode(model, torch.tensor([ids]), cache)
    return cache


def _pointers(cache: DynamicCache) -> list[int]:
    return [t.data_ptr() for layer in cache.layers for t in (layer.keys, layer.values)]


def test_the_most_recent_entry_stays_resident_within_the_budget(model) -> None:
    a, b = list(range(3, 23)), list(range(100, 140))
    cache_a, cache_b = _cache(model, a), _cache(model, b)
    assert cache_bytes(cache_a) < cache_bytes(cache_b)
    prefix = PrefixCache(1 << 20, device_bytes=cache_bytes(cache_a))
    prefix.store(a, cache_a)
    assert prefix.resident == tuple(a)
    prefix.store(b, cache_b)  # the most recent, but over the device budget: none stays
    assert prefix.resident is None and len(prefix) == 2
    key, _ = prefix.lookup(a + [7])  # a hit copies a back and keeps it
    assert key == tuple(a) and prefix.resident == tuple(a)
    prefix.lookup(b)
    assert prefix.resident is None
    assert PrefixCache(1 << 20).device_bytes == 0  # the default, and the CPU engine's
    prefix.clear()
    assert prefix.resident is None


def test_a_hit_on_the_resident_entry_copies_nothing(model) -> None:
    ids = list(range(3, 43))  # past the 32-token sliding window
    cache = _cache(model, ids)
    prefix = PrefixCache(1 << 20, device_bytes=1 << 20)
    prefix.store(ids, cache)
    _, hit = prefix.lookup(ids + [9, 10])
    _, other = prefix.lookup(ids)
    assert _pointers(hit) == _pointers(other)  # no copy: the resident entry's own tensors ...
    assert hit is not other and hit.layers[0] is not other.layers[0]
    # ... a compact copy of the stored cache, whose sliding layer keeps its whole last pass.
    tensors = [t for layer in hit.layers for t in (layer.keys, layer.values)]
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)
    assert set(_pointers(hit)).isdisjoint(_pointers(cache))
    want = [t.clone() for layer in cache.layers for t in (layer.keys, layer.values)]
    with torch.no_grad():
        encode(model, torch.tensor([[9, 10]]), hit)  # the caller extends its cache ...
    assert hit.get_seq_length() == len(ids) + 2
    _, again = prefix.lookup(ids)  # ... and the resident entry is as it was
    assert again.get_seq_length() == len(ids)
    got = [t for layer in again.layers for t in (layer.keys, layer.values)]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    # Not resident: a hit is a copy from the host entry.
    host_only = PrefixCache(1 << 20)
    host_only.store(ids, cache)
    assert set(_pointers(host_only.lookup(ids)[1])).isdisjoint(_pointers(cache))


def test_copy_benchmark_runs_and_says_what_it_did_not_measure(capsys, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))  # as `python bench/...` runs it
    from prefix_copy import prefix_bytes, report

    report(repeats=1, mib=1)
    printed = capsys.readouterr().out
    assert "host to host" in printed and f"{prefix_bytes() / (1 << 30):.3f} GiB" in printed
    assert ("not measured: no GPU here" in printed) != torch.cuda.is_available()
