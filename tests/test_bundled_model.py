"""The model shipped as package data: loads offline through dgemma's loader, has the
documented shape, and fills a gap on CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

BUNDLED = Path(__file__).resolve().parent.parent / "dgemma" / "bundled"

pytestmark = pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(),
                                reason="bundled weights not built (python -m train.train)")


@pytest.fixture(scope="module")
def loaded():
    from dgemma.engine.loading import load_model

    return load_model(device="cpu")


def test_package_data_is_small():
    size = (BUNDLED / "model.safetensors").stat().st_size
    assert size < 30 * 1024 * 1024
    for name in ("config.json", "generation_config.json", "dgemma_sampler.json", "tokenizer.json",
                 "tokenizer_config.json", "CORPUS.txt", "MODEL_CARD.md"):
        assert (BUNDLED / name).is_file(), name


def test_loads_offline(monkeypatch):
    """No download and no network: any connection attempt fails the load. (How fast it loads is
    measured by bench/infill_eval.py and recorded in BENCHMARKS.md, not asserted here.)"""
    import socket

    from dgemma.engine.loading import load_model

    def no_network(*args, **kwargs):
        raise AssertionError("the bundled model must load without the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    loaded = load_model(device="cpu")
    assert loaded.model.config.model_type == "diffusion_gemma"


def test_documented_shape(loaded):
    from transformers import DiffusionGemmaConfig

    cfg = loaded.model.config
    assert isinstance(cfg, DiffusionGemmaConfig)
    text = cfg.text_config
    assert cfg.canvas_length == 64
    assert text.vocab_size == 8192 and len(loaded.tokenizer) == 8192
    assert (text.pad_token_id, text.eos_token_id, text.bos_token_id) == (0, 1, 2)
    assert text.layer_types[-1] == "full_attention"
    assert text.num_experts and text.top_k_experts and text.moe_intermediate_size
    n = sum(p.numel() for p in loaded.model.parameters())
    assert 10e6 <= n <= 30e6, n
    assert loaded.model.model.encoder.vision_tower is None
    gen = json.loads((BUNDLED / "generation_config.json").read_text())
    assert 1 <= gen["max_denoising_steps"] <= 48


def test_fill_returns_text(loaded):
    from dgemma.engine.engine import Engine

    engine = Engine(loaded)
    prefix = "def add(a, b):\n"
    suffix = "\n\n\nprint(add(1, 2))\n"
    res = engine.fill(prefix, suffix, max_tokens=32, seed=0)
    assert res.completions and isinstance(res.completions[0].text, str)
    assert res.steps >= 1


def test_edit_returns_text(loaded):
    from dgemma.engine.engine import Engine

    engine = Engine(loaded)
    res = engine.edit("def add(a, b):\n", "    retrun a + b\n", "\n", "Fix this code", seed=0)
    assert res.completions and isinstance(res.completions[0].text, str)
