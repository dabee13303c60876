"""Memory plan from the config alone: the shipped 26B-A4B config must fit 18 GiB at 8k with NVFP4 experts.

The plan's counts are checked against the real code: a denoising step's allocations (recorded by the
CPU allocator through the profiler) and a real KV cache's storage after encoder passes.
"""

import json

import pytest
import torch
import typer
from torch.profiler import ProfilerActivity, profile
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache
from typer.testing import CliRunner

from dgemma.engine import denoise, sampler
from dgemma.engine.prefix_cache import PrefixCache, cache_bytes
from dgemma.engine.settings import SamplerSettings
from dgemma.cli.quant import register
from dgemma.quant.meta import load_config
from dgemma.engine.plan import GIB, kv_cache_bytes, parse_bytes, pass_terms, plan, static_step_terms
from tiny import tiny_config

MIB = 1 << 20


@pytest.fixture(scope="module")
def config():
    return load_config("diffusiongemma-26B-A4B")


@pytest.fixture(scope="module")
def plan_18g(config):
    return plan(config, parse_bytes("18GiB"), context=8192, graphs=False)


def test_shipped_config_matches_the_26b_a4b(config):
    tc = config.text_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.sliding_window) == (2816, 30, 1024)
    assert [i for i, t in enumerate(tc.layer_types) if t == "full_attention"] == [5, 11, 17, 23, 29]
    assert tc.num_attention_heads == 16
    assert (tc.per_layer_config[0].num_key_value_heads, tc.per_layer_config[0].head_dim) == (8, 256)
    assert (tc.per_layer_config[5].num_key_value_heads, tc.per_layer_config[5].head_dim) == (2, 512)
    assert (tc.num_experts, tc.top_k_experts, tc.moe_intermediate_size, tc.intermediate_size) == (128, 8, 704, 2112)
    assert tc.vocab_size == 262144 and tc.tie_word_embeddings and config.canvas_length == 256


def test_26b_fits_18gib_at_8k_with_nvfp4_experts(plan_18g):
    p = plan_18g
    assert p.fits and p.total <= 18 * GIB, p.to_dict()
    # Experts: 22.84 B parameters at 4.5 bits (codes + E4M3 scale per 16) = 11.96 GiB.
    assert 11.9 * GIB < p.weights["experts"] < 12.0 * GIB
    assert 4.4 * GIB < p.weights_total - p.weights["experts"] < 4.6 * GIB
    assert "vision" not in json.dumps(p.weights)
    # A denoising step at 262k vocabulary: one fp32 and one bf16 canvas x vocab held, two fp32 in the softcap.
    assert p.peak_pass == "canvas_decode"
    decode = p.passes["canvas_decode"]
    assert decode["transient: softcap, 2 fp32 logits"] > 2 * 256 * 262144 * 4
    assert sum(decode.values()) - decode["kv cache"] < 0.9 * GIB
    # The CUDA context is stated on top of the budget, not hidden in it.
    assert p.gpu_total == p.total + p.cuda_context and p.cuda_context >= 0.5 * GIB


def test_cuda_graphs_add_the_static_step_to_both_passes(config, plan_18g, monkeypatch):
    monkeypatch.delenv("DGEMMA_GRAPHS", raising=False)
    graphs = plan(config, parse_bytes("18GiB"), context=8192)  # as an engine on a GPU runs by default
    assert graphs.graphs and graphs.weights == plan_18g.weights
    static = static_step_terms(config, 8192)
    for name, terms in graphs.passes.items():
        assert static.items() <= terms.items(), name
    # The buffers are a second copy of the prefix, the window's for a sliding layer; the pool holds
    # at least the softcap's two fp32 logits of the bucket's one row.
    assert static["static step: kv buffers"] >= sum(kv_cache_bytes(config, 8192).values())
    assert static["static step: graph pool (estimate)"] >= 2 * 256 * 262144 * 4
    prefill = graphs.passes["prompt_prefill"]
    assert sum(prefill.values()) == sum(plan_18g.passes["prompt_prefill"].values()) + sum(static.values())
    # The README's figure: 18.46 GiB, over the 18 GiB target (DGEMMA_GRAPHS=0 fits, plan_18g).
    assert 18.4 * GIB < graphs.total < 18.5 * GIB and not graphs.fits and graphs.prefix_cache_device == 0
    monkeypatch.setenv("DGEMMA_GRAPHS", "0")
    assert not plan(config, parse_bytes("18GiB")).graphs


def test_whole_prompt_in_one_pass_would_not_fit(config):
    # Every sliding layer would keep the whole prompt's keys behind its window view.
    one_pass = plan(config, parse_bytes("18GiB"), context=8192, prefill_chunk=0)
    assert one_pass.peak_pass == "prompt_prefill" and not one_pass.fits
    assert one_pass.passes["prompt_prefill"]["kv cache"] == sum(kv_cache_bytes(config, 8192, last_pass=8192).values())


def test_kv_cache_caps_sliding_layers_at_the_window(config):
    kv = kv_cache_bytes(config, 8192)
    # transformers keeps window - 1 tokens: 25 sliding layers x 1023 x 8 heads x 256 x (K+V) x bf16.
    assert kv["sliding_attention"] == 25 * 1023 * 8 * 256 * 2 * 2
    assert kv["full_attention"] == 5 * 8192 * 2 * 512 * 2 * 2 == 160 * MIB
    assert kv_cache_bytes(config, 512)["sliding_attention"] == 25 * 512 * 8 * 256 * 4
    # ... plus, behind the window view, the keys of the last encoder pass (a committed canvas).
    assert kv_cache_bytes(config, 8192, last_pass=256)["sliding_attention"] == 25 * 1279 * 8 * 256 * 4


@pytest.fixture(scope="module")
def sliding_model():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=512, sliding_window=32)
    return DiffusionGemmaForBlockDiffusion(cfg).to(torch.bfloat16).eval()


def _storage_bytes(cache: DynamicCache) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for layer in cache.layers for t in (layer.keys, layer.values)}
    return sum(storages.values())


def _encoded(model, *lengths: int) -> DynamicCache:
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        for n in lengths:
            denoise.encode(model, torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(n)), cache)
    return cache


def test_kv_cache_plan_matches_a_real_cache(sliding_model):
    config = sliding_model.config
    for lengths in ((100,), (100, 7), (20,)):
        cache = _encoded(sliding_model, *lengths)
        expected = kv_cache_bytes(config, sum(lengths), last_pass=lengths[-1])
        assert _storage_bytes(cache) == sum(expected.values()), lengths


def test_prefix_cache_keeps_compact_private_copies(sliding_model):
    cache = _encoded(sliding_model, 100)
    assert _storage_bytes(cache) > cache_bytes(cache)  # the sliding layer's view keeps all 100 tokens
    prefix = PrefixCache(1 << 20)
    prefix.store(list(range(100)), cache)
    entry = prefix._entries[tuple(range(100))][0]
    assert _storage_bytes(entry) == cache_bytes(entry) == cache_bytes(cache) == prefix.bytes
    key, copy = prefix.lookup(list(range(105)))
    assert key == tuple(range(100))
    for got, want in zip(copy.layers, cache.layers):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
        assert got.keys.untyped_storage().data_ptr() != want.keys.untyped_storage().data_ptr()
        assert got.get_seq_length() == want.get_seq_length()
    copy.layers[0].keys.zero_()  # the caller's copy is its own
    assert prefix.lookup(list(range(100)))[1].layers[0].keys.abs().sum() > 0


def _peak_allocated(fn) -> int:
    """Peak of live CPU-allocator bytes while ``fn`` runs, above its start: the profiler records
    every allocation and free of torch's CPU allocator in order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("chunk_bytes,transient", [
    (sampler.SAMPLE_CHUNK_BYTES, "transient: sampler, 4 fp32 chunks"),  # the canvas fits one sampler chunk
    (256 << 10, "transient: softcap, 2 fp32 logits"),  # small chunks: the 26B's regime at 262k vocabulary
])
def test_decode_step_allocations_match_the_plan(monkeypatch, chunk_bytes, transient):
    monkeypatch.setattr(sampler, "SAMPLE_CHUNK_BYTES", chunk_bytes)
    vocab, canvas, prompt = 16384, 64, 40
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=vocab, canvas_length=canvas)
    model = DiffusionGemmaForBlockDiffusion(cfg).to(torch.bfloat16).eval()
    cache = _encoded(model, prompt)
    # Two steps, so the second runs with the first one's self-conditioning logits held.
    settings = SamplerSettings(max_denoising_steps=2, stability_threshold=0, confidence_threshold=1e-30)
    noise = torch.randint(0, vocab, (1, canvas), generator=torch.Generator().manual_seed(1))
    free = torch.zeros(1, canvas, dtype=torch.bool)

    def step() -> None:
        with torch.no_grad():
            denoise.denoise(model, cache, noise, free, settings, torch.Generator().manual_seed(0))

    measured = _peak_allocated(step)
    terms = pass_terms(cfg, prompt)["canvas_decode"]
    assert transient in terms
    planned = sum(terms.values()) - terms["kv cache"]  # the cache exists before the step
    assert abs(measured / planned - 1) < 0.05, (measured, terms)


def test_bf16_experts_do_not_fit(config):
    assert not plan(config, parse_bytes("18GiB"), experts_format=None).fits


def test_parse_bytes():
    assert parse_bytes("18GiB") == 18 * GIB
    assert parse_bytes("24 GB") == 24 * 10**9
    assert parse_bytes("512MiB") == 512 * MIB
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_plan_cli_json_and_errors(monkeypatch):
    monkeypatch.setenv("DGEMMA_GRAPHS", "0")  # the plan that fits 18 GiB (see above)
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["plan", "diffusiongemma-26B-A4B", "--vram", "18GiB", "--context", "8192", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["fits"] is True and data["total"] <= 18 * GIB and data["gpu_total"] > data["total"]
    res = runner.invoke(app, ["plan", "diffusiongemma-26B-A4B", "--vram", "18GiB"])
    assert res.exit_code == 0 and "CUDA context" in res.output and "prefix cache: in host memory" in res.output
    res = runner.invoke(app, ["plan", "no/such/model", "--vram", "18GiB"])
    assert res.exit_code == 1 and res.output.startswith("dgemma: ")
    res = runner.invoke(app, ["plan", "diffusiongemma-26B-A4B", "--vram", "lots"])
    assert res.exit_code == 1 and "dgemma: cannot read 'lots'" in res.output
