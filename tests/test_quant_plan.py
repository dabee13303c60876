"""Memory plan from the config alone: the shipped 26B-A4B config must fit 18 GiB at 8k with NVFP4 experts."""

import json

import pytest
import typer
from typer.testing import CliRunner

from dgemma.quant.cli import register
from dgemma.quant.meta import load_config
from dgemma.quant.plan import GIB, kv_cache_bytes, parse_bytes, plan

MIB = 1 << 20


@pytest.fixture(scope="module")
def config():
    return load_config("diffusiongemma-26B-A4B")


@pytest.fixture(scope="module")
def plan_18g(config):
    return plan(config, parse_bytes("18GiB"), context=8192)


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
    assert p.fits, p.to_dict()
    # Experts: 22.84 B parameters at 4.5 bits (codes + E4M3 scale per 16) = 11.96 GiB.
    assert 11.9 * GIB < p.weights["experts"] < 12.0 * GIB
    assert 4.4 * GIB < p.weights_total - p.weights["experts"] < 4.6 * GIB
    assert "vision" not in json.dumps(p.weights)


def test_kv_cache_caps_sliding_layers_at_the_window(config):
    kv = kv_cache_bytes(config, 8192)
    # 25 sliding layers x 1024 tokens x 8 heads x 256 x (K+V) x bf16; 5 full x 8192 x 2 x 512 x 2 x 2.
    assert kv["sliding_attention"] == 25 * 1024 * 8 * 256 * 2 * 2 == 200 * MIB
    assert kv["full_attention"] == 5 * 8192 * 2 * 512 * 2 * 2 == 160 * MIB
    assert kv_cache_bytes(config, 512)["sliding_attention"] == 25 * 512 * 8 * 256 * 4


def test_bf16_experts_do_not_fit(config):
    assert not plan(config, parse_bytes("18GiB"), experts_format=None).fits


def test_parse_bytes():
    assert parse_bytes("18GiB") == 18 * GIB
    assert parse_bytes("24 GB") == 24 * 10**9
    assert parse_bytes("512MiB") == 512 * MIB
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_plan_cli_json_and_errors():
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["plan", "diffusiongemma-26B-A4B", "--vram", "18GiB", "--context", "8192", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["fits"] is True and data["total"] <= 18 * GIB
    res = runner.invoke(app, ["plan", "no/such/model", "--vram", "18GiB"])
    assert res.exit_code == 1 and res.output.startswith("dgemma: ")
    res = runner.invoke(app, ["plan", "diffusiongemma-26B-A4B", "--vram", "lots"])
    assert res.exit_code == 1 and "dgemma: cannot read 'lots'" in res.output
