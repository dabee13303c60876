"""The server in this process with a scripted engine: fairness, supersede, cancel,
failures inside the engine, model load errors and live config reload, deterministically.
(The real daemon on the bundled model is tested in test_daemon_protocol.py; here the engine
is scripted so that a request can be held at an exact point, and a model load can fail or
run out of memory on demand.)"""
from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dgemma.daemon.client import AsyncClient, ModelLoadFailed
from dgemma.daemon.config import Config, load_config
from dgemma.errors import DgemmaError
from dgemma.engine.api import Completion, Draft, Result
from dgemma.engine.prefix_cache import PrefixCache
from dgemma.daemon.server import Server
from test_daemon_util import short_tmp


class FakeEngine:
    """An `api.FillEngine` that steps until cancelled; a prefix starting with "gate" holds the worker
    until `gate` is set, so tests can line requests up behind it."""

    def __init__(self, name: str = "fake") -> None:
        self.model_name = name
        self.device = "cpu"
        self.prefix_cache = PrefixCache(1 << 20)
        self.order: list[str] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        self.cancel_seen: list[str] = []

    def fill(self, prefix: str, suffix: str, *, n: int = 1, max_tokens: int = 256, seed: Any = None,
             settings: Any = None, on_step: Any = None, cancel: Any = None, deadline: Any = None,
             **_: Any) -> Result:
        if prefix == "boom":
            raise RuntimeError("kaboom")
        if prefix == "oom":
            import torch
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        steps = (settings or {}).get("max_denoising_steps", 3)
        self.started.set()
        for step in range(steps):
            if prefix.startswith("gate"):
                while not self.gate.wait(0.01):
                    if cancel is not None and cancel.is_set():
                        break
            if cancel is not None and cancel.is_set():
                self.cancel_seen.append(prefix)
                raise DgemmaError("cancelled", "cancelled")
            if on_step is not None:
                on_step(Draft(f"{prefix}:{step}", step, canvas=0))
            time.sleep(0.002)
        self.order.append(prefix)
        return Result([_completion(prefix.upper())], steps=steps, canvases=1, ms=1.0)

    def edit(self, prefix: str, selection: str, suffix: str, instruction: str, **kw: Any) -> Result:
        return self.fill(prefix + selection, suffix, **kw)


def _completion(text: str) -> Completion:
    return Completion(text=text, score=0.0, agreement=0.0, fit=None, tokens=len(text), finished=True)


@pytest.fixture
async def served():
    """A running in-process server with a FakeEngine; yields (server, engine, socket)."""
    root = short_tmp("dgs-")
    engine = FakeEngine()
    cfg_file = root / "cfg" / "config.toml"
    cfg_file.parent.mkdir(parents=True)
    server = Server(Config(), socket=root / "run" / "d.sock", config_file=cfg_file,
                    engine_factory=lambda config, spec, device: engine)
    await server.start()
    yield server, engine, server.socket
    engine.gate.set()
    await server.stop()
    shutil.rmtree(root, ignore_errors=True)


async def _client(sock: Path) -> AsyncClient:
    return await AsyncClient.connect(sock, autostart=False)


async def _wait(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_clients_are_served_round_robin(served):
    server, engine, sock = served
    a, b = await _client(sock), await _client(sock)
    try:
        gate = asyncio.create_task(a.request("fill", {"prefix": "gate"}))
        await _wait(engine.started.is_set)
        a_jobs = [asyncio.create_task(a.request("fill", {"prefix": f"a{i}"})) for i in range(3)]
        await _wait(lambda: server.scheduler.depth() == 3)
        b_job = asyncio.create_task(b.request("fill", {"prefix": "b0"}))
        await _wait(lambda: server.scheduler.depth() == 4)
        engine.gate.set()
        await asyncio.gather(gate, *a_jobs, b_job)
        # b0 arrived last but its client had not been served: it goes right after the gate.
        assert engine.order == ["gate", "b0", "a0", "a1", "a2"]
        assert (await b_job)["completions"][0]["text"] == "B0"
    finally:
        await a.close()
        await b.close()


async def test_supersede_queued_and_running(served):
    server, engine, sock = served
    c = await _client(sock)
    try:
        running = asyncio.create_task(c.request("fill", {"prefix": "gate-x", "document": "x"}))
        await _wait(engine.started.is_set)
        q1 = asyncio.create_task(c.request("fill", {"prefix": "y1", "document": "y"}))
        await _wait(lambda: server.scheduler.depth() == 1)
        q2 = asyncio.create_task(c.request("fill", {"prefix": "y2", "document": "y"}))
        with pytest.raises(DgemmaError) as exc:
            await q1
        assert exc.value.code == "superseded"
        x2 = asyncio.create_task(c.request("fill", {"prefix": "x2", "document": "x"}))
        with pytest.raises(DgemmaError) as exc:
            await running
        assert exc.value.code == "superseded"
        assert (await x2)["completions"][0]["text"] == "X2"
        assert (await q2)["completions"][0]["text"] == "Y2"
        assert engine.order == ["y2", "x2"] or engine.order == ["x2", "y2"]
    finally:
        await c.close()


async def test_cancel_queued_and_running(served):
    server, engine, sock = served
    c = await _client(sock)
    try:
        rid = c.new_id()
        running = asyncio.create_task(c.request("fill", {"prefix": "gate"}, id=rid))
        await _wait(engine.started.is_set)
        qid = c.new_id()
        queued = asyncio.create_task(c.request("fill", {"prefix": "q"}, id=qid))
        await _wait(lambda: server.scheduler.depth() == 1)
        assert await c.cancel(qid) is True
        with pytest.raises(DgemmaError) as exc:
            await queued
        assert exc.value.code == "cancelled"
        assert await c.cancel(rid) is True
        with pytest.raises(DgemmaError) as exc:
            await running
        assert exc.value.code == "cancelled"
        assert engine.cancel_seen == ["gate"] and engine.order == []
        assert await c.cancel(rid) is False
    finally:
        await c.close()


async def test_engine_failures_are_contained(served):
    server, engine, sock = served
    c = await _client(sock)
    try:
        with pytest.raises(DgemmaError) as exc:
            await c.request("fill", {"prefix": "boom"})
        assert exc.value.code == "internal" and "kaboom" in exc.value.message
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()
        cache.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), 0)
        engine.prefix_cache.store([1, 2], cache)
        with pytest.raises(DgemmaError) as exc:
            await c.request("fill", {"prefix": "oom"})
        assert exc.value.code == "out_of_memory"
        assert len(engine.prefix_cache) == 0  # memory given back
        drafts: list[dict] = []
        res = await c.request("edit", {"prefix": "p", "selection": "s", "suffix": "", "instruction": "i"},
                              on_draft=drafts.append)
        # Drafts stream in order; a busy connection may coalesce some (drafts, never results, can drop).
        assert res["completions"][0]["text"] == "PS"
        seen = [d["text"] for d in drafts]
        assert seen and set(seen) <= {"ps:0", "ps:1", "ps:2"} and seen == sorted(seen)
    finally:
        await c.close()


async def test_disconnect_cancels_the_clients_work(served):
    server, engine, sock = served
    c = await _client(sock)
    asyncio.create_task(c.request("fill", {"prefix": "gate"}))
    await _wait(engine.started.is_set)
    asyncio.create_task(c.request("fill", {"prefix": "never"}))
    await _wait(lambda: server.scheduler.depth() == 1)
    await c.close()
    await _wait(lambda: engine.cancel_seen == ["gate"])
    await _wait(lambda: server.scheduler.depth() == 0 and server.scheduler.running is None)
    other = await _client(sock)
    try:
        assert (await other.request("fill", {"prefix": "next"}))["completions"][0]["text"] == "NEXT"
        assert "never" not in engine.order
    finally:
        await other.close()


async def test_too_many_pending_and_duplicate_ids(served):
    server, engine, sock = served
    server.host.config = Config(limits=type(server.host.config.limits)(max_pending_per_client=2))
    c = await _client(sock)
    try:
        t1 = asyncio.create_task(c.request("fill", {"prefix": "gate"}, id="same"))
        await _wait(engine.started.is_set)
        with pytest.raises(DgemmaError) as exc:
            await c.request("fill", {"prefix": "b"}, id="same")
        assert exc.value.code == "invalid_request"
        t2 = asyncio.create_task(c.request("fill", {"prefix": "c"}))
        await _wait(lambda: server.scheduler.depth() == 1)
        with pytest.raises(DgemmaError) as exc:
            await c.request("fill", {"prefix": "d"})
        assert exc.value.code == "too_large"
        engine.gate.set()
        await asyncio.gather(t1, t2)
    finally:
        await c.close()


async def test_model_load_failure_is_reported_and_daemon_serves():
    root = short_tmp("dgs-")
    (root / "cfg").mkdir()

    def broken(config, spec, device):
        raise DgemmaError("model_missing", "Model '/nowhere' is not on this machine")

    server = Server(Config(), socket=root / "run" / "d.sock", config_file=root / "cfg" / "config.toml",
                    engine_factory=broken)
    await server.start()
    c = await _client(server.socket)
    try:
        with pytest.raises(DgemmaError) as exc:
            await c.request("fill", {"prefix": "x"})
        assert exc.value.code == "model_missing" and "/nowhere" in exc.value.message
        st = await c.request("status")
        assert st["state"] == "error" and "/nowhere" in st["load_error"]
        with pytest.raises(ModelLoadFailed) as failed:  # what every client waits by (client.model_loaded)
            await c.wait_loaded()
        assert failed.value.code == "model_missing" and failed.value.message == st["load_error"]
        assert (await c.request("ping"))["pong"]
    finally:
        await c.close()
        await server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_clients_wait_for_a_loading_model():
    """The async client waits out a slow first load, announcing it once; the sync one then finds it loaded."""
    from dgemma.daemon.client import Client

    root = short_tmp("dgs-")
    release = threading.Event()

    def slow(config, spec, device):
        release.wait(10)
        return FakeEngine()

    server = Server(Config(), socket=root / "run" / "d.sock", config_file=root / "cfg" / "config.toml",
                    engine_factory=slow)
    await server.start()
    c = await _client(server.socket)
    announced = []

    async def on_loading() -> None:
        announced.append(True)
        release.set()

    try:
        st = await asyncio.wait_for(c.wait_loaded(on_loading=on_loading), 10)
        assert st["state"] == "ready" and st["model"] == "fake" and announced == [True]
        calls: list[bool] = []

        def sync_wait() -> dict:  # on a thread: this test's loop serves the daemon
            with Client.connect(server.socket, timeout=10) as sync:
                return sync.wait_loaded(lambda: calls.append(True))
        st = await asyncio.to_thread(sync_wait)
        assert st["state"] == "ready" and calls == []  # loaded already: nothing to announce
    finally:
        release.set()
        await c.close()
        await server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_config_reload_live_and_invalid_file_keeps_previous(served):
    server, engine, sock = served
    path = server.config_file
    c = await _client(sock)
    try:
        path.write_text("[limits]\nmax_tokens = 4\n")
        await _wait(lambda: server.host.config.limits.max_tokens == 4, timeout=15)
        with pytest.raises(DgemmaError) as exc:
            await c.request("fill", {"prefix": "x", "max_tokens": 8})
        assert exc.value.code == "invalid_params"
        path.write_text("[limits\nmax_tokens = 'many'\n")
        await _wait(lambda: server.watcher.error is not None, timeout=15)
        assert server.host.config.limits.max_tokens == 4
        assert (await c.request("status"))["config_error"]
        # A sampler typo is an invalid file too, not a setting that fails every request later.
        path.write_text("[limits]\nmax_tokens = 4\n[sampler]\nmax_denoising_step = 2\n")
        await _wait(lambda: "max_denoising_step" in (server.watcher.error or ""), timeout=15)
        assert "max_denoising_step" in (await c.request("status"))["config_error"]
        assert server.host.config.sampler == {} and server.host.config.limits.max_tokens == 4
        with pytest.raises(DgemmaError) as exc:
            await c.request("reload")
        assert exc.value.code == "invalid_params" and "previous" in exc.value.message
        path.write_text("[sampler]\nmax_denoising_steps = 1\n")
        res = await c.request("reload")
        assert res["reloaded"] and server.host.config.sampler == {"max_denoising_steps": 1}
        assert (await c.request("fill", {"prefix": "x", "max_tokens": 8}))["steps"] == 1
        # A model change in the config reloads the model on the worker before the reply.
        path.write_text('model = "/elsewhere"\n')
        res = await c.request("reload")
        assert res["model_spec"] == "/elsewhere" and res["state"] == "ready" and res["model_reloaded"] is True
        res = await c.request("reload")
        assert res["model_reloaded"] is False
        res = await c.request("reload", {"reload_model": True})
        assert res["model_reloaded"] is True
    finally:
        await c.close()


async def test_model_that_does_not_load_leaves_the_previous_one_serving():
    """A bad model (or quantization) in the config must not cost the working model: the old
    engine serves while the new one loads and stays when it fails; the config is committed
    only with a loaded model. A model too big to sit next to the old one replaces it."""
    import torch

    root = short_tmp("dgs-")
    cfg_file = root / "cfg" / "config.toml"
    cfg_file.parent.mkdir(parents=True)
    server: Server

    def factory(config, spec, device):
        if spec and "broken" in spec:
            raise DgemmaError("model_missing", f"Model '{spec}' is not on this machine")
        if spec and "huge" in spec and server.host.engine is not None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return FakeEngine(spec or "fake")

    server = Server(Config(), socket=root / "run" / "d.sock", config_file=cfg_file, engine_factory=factory,
                    config_error="config.toml: a typo at start-up")
    await server.start()
    c = await _client(server.socket)
    try:
        st = await c.request("status")
        assert st["config_error"] == "config.toml: a typo at start-up"  # shown until the file is fixed
        cfg_file.write_text('model = "/broken/m"\n[limits]\nmax_tokens = 4\n')
        res = await c.request("reload")
        assert res["reloaded"] is False and res["model_reloaded"] is False and "/broken/m" in res["error"]
        assert res["model"] == "fake" and res["state"] == "ready"
        st = await c.request("status")
        assert st["state"] == "ready" and st["model"] == "fake" and "/broken/m" in st["load_error"]
        assert "/broken/m" in st["config_error"]
        # Nothing of that file is in force: not its limits either.
        assert (await c.request("fill", {"prefix": "x", "max_tokens": 8}))["model"] == "fake"
        cfg_file.write_text('model = "/other"\n')
        res = await c.request("reload")
        assert res["reloaded"] and res["model_reloaded"] and res["model"] == "/other" and res["error"] is None
        st = await c.request("status")
        assert st["config_error"] is None and st["load_error"] is None
        cfg_file.write_text('model = "/huge"\n')
        res = await c.request("reload")
        assert res["model_reloaded"] and res["model"] == "/huge" and res["state"] == "ready"
    finally:
        await c.close()
        await server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_requests_are_served_while_a_new_model_loads():
    """Loading a large checkpoint takes minutes: the model in service answers meanwhile, the new
    one takes over between two requests, and a config change that arrives during the load
    waits for it rather than loading a third model beside the two."""
    root = short_tmp("dgs-")
    cfg_file = root / "cfg" / "config.toml"
    cfg_file.parent.mkdir(parents=True)
    release = threading.Event()
    lock = threading.Lock()
    built: list[str | None] = []
    inflight = [0, 0]  # now, most at once

    def factory(config, spec, device):
        with lock:
            inflight[0] += 1
            inflight[1] = max(inflight)
        try:
            if spec == "/slow":
                assert release.wait(30)
            built.append(spec)
            return FakeEngine(spec or "fake")
        finally:
            with lock:
                inflight[0] -= 1

    server = Server(Config(), socket=root / "run" / "d.sock", config_file=cfg_file, engine_factory=factory)
    await server.start()
    c = await _client(server.socket)
    try:
        cfg_file.write_text('model = "/slow"\n')
        first = asyncio.create_task(c.request("reload"))
        await _wait(lambda: server.host.loading == "/slow")
        assert (await c.request("fill", {"prefix": "x"}))["model"] == "fake"
        st = await c.request("status")
        assert st["state"] == "ready" and st["model"] == "fake" and st["loading"] == "/slow"
        cfg_file.write_text('model = "/next"\n')
        second = asyncio.create_task(c.request("reload"))
        assert (await c.request("fill", {"prefix": "y"}))["model"] == "fake"
        assert not first.done() and not second.done() and built == [None]
        release.set()
        res = await first
        assert res["model_reloaded"] and res["model"] == "/slow" and res["error"] is None
        res = await second
        assert res["model_reloaded"] and res["model"] == "/next" and res["state"] == "ready"
        assert (await c.request("fill", {"prefix": "z"}))["model"] == "/next"
        assert (await c.request("status"))["loading"] is None
        assert built == [None, "/slow", "/next"] and inflight[1] == 1
    finally:
        release.set()
        await c.close()
        await server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_config_parsing_errors():
    from dgemma.daemon.config import parse_config

    assert parse_config("").model is None
    cfg = parse_config('model = "~/m"\ndtype = "bf16"\nquantization = "nf4"\n[sampler]\nt_max = 0.7\n'
                       '[limits]\nmax_n = 2\n')
    assert cfg.model.endswith("/m") and cfg.sampler == {"t_max": 0.7} and cfg.limits.max_n == 2
    for bad in ("modle = 1", "model = 3", "[limits]\nmax_n = -1", "[limits]\nnope = 1", "sampler = 1", "x =",
                "[sampler]\nmax_denoising_step = 2", "[sampler]\nmax_denoising_steps = 0",
                "[sampler]\nt_max = 'hot'", 'dtype = "f16"', 'quantization = "int4"'):
        with pytest.raises(DgemmaError) as exc:
            parse_config(bad)
        assert exc.value.code == "invalid_params"
        assert exc.value.message.startswith("config.toml: ") and "\n" not in exc.value.message


def test_config_names_match_the_loaders():
    """config.py spells out the dtype and quantization names so that reading the config never
    imports torch; they must stay what the loader and dgemma.quant accept."""
    import torch

    from dgemma.daemon.config import DTYPES, QUANTIZATIONS
    from dgemma.engine.loading import pick_dtype
    from dgemma.kernels.packed import FORMATS

    cpu = torch.device("cpu")
    assert {pick_dtype(name, cpu) for name in DTYPES if name not in ("fp16", "float16")} == \
        {torch.float32, torch.bfloat16}
    assert set(QUANTIZATIONS) == set(FORMATS)


def test_load_config_missing_file_gives_defaults(tmp_path):
    assert load_config(tmp_path / "none.toml") == Config()
