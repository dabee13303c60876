"""The real daemon, as a subprocess on a real socket with the bundled model: framing,
handshake, bad input, bad config edits, concurrency, cancellation and clients that die
mid-stream."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack
from hypothesis import HealthCheck, given, settings, strategies as st

from dgemma.daemon import protocol as proto
from test_daemon_util import in_threads, BUSY, Raw, daemon  # noqa: F401  (fixture)


def fill_params(**kw):
    params = {"prefix": "def add(a, b):\n    return ", "suffix": "\n", "max_tokens": 8}
    params.update(kw)
    return params


def test_socket_and_directory_are_private(daemon):
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(daemon.socket.parent.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(daemon.socket.stat().st_mode)


def test_handshake_and_ping(daemon):
    with Raw(daemon.socket, hello=False) as c:
        assert c.greeting["type"] == "hello" and c.greeting["protocol"] == proto.PROTOCOL_VERSION
        err = c.call("ping")[-1]
        assert err["type"] == "error" and err["error"]["code"] == "invalid_request"
        bad = c.call("hello", {"protocol": 999})[-1]
        assert bad["error"]["code"] == "invalid_request" and "999" in bad["error"]["message"]
        ok = c.call("hello", {"protocol": 1})[-1]
        assert ok["result"]["protocol"] == 1 and ok["result"]["model"]
        assert c.call("ping")[-1]["result"]["pong"] is True


def test_status_fields(daemon):
    with Raw(daemon.socket) as c:
        st_ = c.call("status")[-1]["result"]
    for key in ("socket", "pid", "model", "device", "vram", "queue_depth", "requests_served", "uptime_s", "state"):
        assert key in st_
    assert st_["state"] == "ready" and st_["device"] == "cpu" and st_["socket"] == str(daemon.socket)


def test_fill_streams_drafts_then_one_result(daemon):
    with Raw(daemon.socket) as c:
        msgs = c.call("fill", fill_params(seed=1))
    assert [m["type"] for m in msgs[:-1]] == ["draft"] * (len(msgs) - 1) and len(msgs) >= 2
    res = msgs[-1]["result"]
    assert res["completions"] and isinstance(res["completions"][0]["text"], str)
    for key in ("model", "steps", "ms", "cached_tokens"):
        assert key in res
    assert res["steps"] >= 1


def test_bad_requests_get_clear_errors_and_connection_survives(daemon):
    with Raw(daemon.socket) as c:
        cases = [
            ({"id": 1, "method": "nope"}, "invalid_request"),
            ({"method": "ping"}, "invalid_request"),
            ({"id": 2, "method": "fill", "params": {}}, "invalid_params"),
            ({"id": 3, "method": "fill", "params": {"prefix": 5}}, "invalid_params"),
            ({"id": 4, "method": "fill", "params": fill_params(n=True)}, "invalid_params"),
            ({"id": 5, "method": "fill", "params": fill_params(max_tokens=10**9)}, "invalid_params"),
            ({"id": 6, "method": "edit", "params": fill_params()}, "invalid_params"),
            ({"id": 7, "method": "fill", "params": "x"}, "invalid_params"),
            ({"id": 8, "method": "fill", "params": fill_params(settings={"bogus": 1})}, "invalid_params"),
            ({"id": 9, "method": "fill", "params": fill_params(model="/no/such/model")}, "invalid_params"),
            ({"id": 10, "method": "fill", "params": fill_params(prefix="", suffix="")}, "invalid_params"),
        ]
        for msg, code in cases:
            c.send(msg)
            reply = c.recv()
            while reply["type"] == "draft":
                reply = c.recv()
            assert reply["type"] == "error", (msg, reply)
            assert reply["error"]["code"] == code, (msg, reply)
            assert reply["error"]["message"]
        # Well-framed garbage: an error, and the stream stays in step.
        body = b"\xc1\xc1\xc1"
        c.send_bytes(struct.pack(">I", len(body)) + body)
        assert c.recv()["error"]["code"] == "invalid_request"
        c.send_bytes(proto.HEADER.pack(3) + msgpack.packb([1, 2]))
        assert c.recv()["error"]["code"] == "invalid_request"
        assert c.call("ping")[-1]["result"]["pong"]
    # Each rejection is one log line naming the client: at the door (unknown method, an unknown
    # sampler setting) and in the engine (nothing to fill).
    assert "unknown method" in daemon.wait_for_log(r"client \d+: nope 1 rejected: invalid_request")
    assert "bogus" in daemon.wait_for_log(r"client \d+: fill 8 rejected: invalid_params")
    assert "Nothing to fill" in daemon.wait_for_log(r"client \d+: fill 10 failed: invalid_params")


def _status(c: Raw) -> dict:
    return c.call("status")[-1]["result"]


def test_bad_config_edits_keep_the_daemon_serving(daemon):
    cfg = Path(daemon.env["DGEMMA_CONFIG_DIR"]) / "config.toml"
    good = cfg.read_text()
    try:
        with Raw(daemon.socket) as c:
            model = _status(c)["model"]
            # A typo in [sampler] is refused and reported; the previous config stays.
            cfg.write_text(good.replace("max_denoising_steps", "max_denoising_step"))
            err = c.call("reload")[-1]
            assert err["type"] == "error" and err["error"]["code"] == "invalid_params"
            assert "max_denoising_step" in err["error"]["message"]
            assert "max_denoising_step" in _status(c)["config_error"]
            res = c.call("fill", fill_params())[-1]
            assert res["type"] == "result" and res["result"]["steps"] <= 2  # the previous [sampler]
            # So is an unknown quantization, before any load is tried.
            cfg.write_text('quantization = "int3"\n' + good)
            assert c.call("reload")[-1]["error"]["code"] == "invalid_params"
            # A model that does not load: the one in service keeps serving, and status says why.
            cfg.write_text('model = "/no/such/model"\n' + good)
            res = c.call("reload")[-1]["result"]
            assert res["reloaded"] is False and res["model_reloaded"] is False and "/no/such/model" in res["error"]
            assert res["state"] == "ready" and res["model"] == model
            st = _status(c)
            assert st["state"] == "ready" and st["model"] == model
            assert "/no/such/model" in st["load_error"] and "/no/such/model" in st["config_error"]
            assert c.call("fill", fill_params())[-1]["type"] == "result"
    finally:
        cfg.write_text(good)
    with Raw(daemon.socket) as c:
        res = c.call("reload")[-1]["result"]
        assert res["reloaded"] is True and res["error"] is None
        st = _status(c)
        assert st["config_error"] is None and st["load_error"] is None and st["model"] == model


def test_oversized_frame_is_rejected_and_daemon_keeps_serving(daemon):
    with Raw(daemon.socket) as c:
        c.send_bytes(struct.pack(">I", 1 << 31) + b"x" * 100)
        reply = c.recv()
        assert reply["type"] == "error" and reply["error"]["code"] == "too_large"
        c.sock.settimeout(5)
        try:  # the stream is out of step, so the daemon closes it
            assert c.sock.recv(1) == b""
        except ConnectionResetError:
            pass
    with Raw(daemon.socket) as c:
        assert c.call("ping")[-1]["result"]["pong"]
        # Large but within the limit: read in full, answered.
        assert c.call("ping", {"junk": "x" * (3 << 20)})[-1]["result"]["pong"]


frames = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda body, cut: (struct.pack(">I", len(body)) + body)[:cut],
              st.binary(max_size=64), st.integers(0, 70)),
    st.builds(lambda obj: proto.encode(obj) if isinstance(obj, dict) else struct.pack(">I", 4) + b"\x93\x01",
              st.dictionaries(st.sampled_from(["id", "method", "params", "x"]),
                              st.one_of(st.none(), st.integers(-2**63, 2**64 - 1), st.text(max_size=8),
                                        st.sampled_from(["ping", "fill", "edit", "cancel", "status"])))),
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(chunks=st.lists(frames, min_size=1, max_size=4), greet=st.booleans())
def test_fuzzed_and_truncated_frames_never_break_the_daemon(daemon, chunks, greet):
    c = Raw(daemon.socket, hello=greet, timeout=10)
    try:
        for chunk in chunks:
            c.send_bytes(chunk)
    except OSError:
        pass
    finally:
        c.close()  # mid-frame, often: a truncated frame
    with Raw(daemon.socket, timeout=10) as ok:
        assert ok.call("ping")[-1]["result"]["pong"]


def test_32_concurrent_clients_all_answered(daemon):
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with Raw(daemon.socket, timeout=120) as c:
                msgs = c.call("fill", fill_params(prefix=f"x{i} = ", max_tokens=4, seed=i, stream=i % 2 == 0,
                                                  settings={"max_denoising_steps": 1}))
                results[i] = msgs[-1]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    in_threads(client, 32, 150)
    assert not errors, errors
    assert len(results) == 32
    assert all(m["type"] == "result" for m in results.values()), [m for m in results.values() if m["type"] != "result"]


def test_cancel_running_request(daemon):
    with Raw(daemon.socket) as c:
        rid = c.request("fill", fill_params(max_tokens=256, settings=BUSY))
        first = c.recv()
        assert first["type"] == "draft" and first["id"] == rid
        cid = c.request("cancel", {"id": rid})
        msgs = {}
        while len(msgs) < 2:
            m = c.recv()
            if m["type"] != "draft":
                msgs[m["id"]] = m
        assert msgs[cid]["result"]["cancelled"] is True
        assert msgs[rid]["type"] == "error" and msgs[rid]["error"]["code"] == "cancelled"
        assert c.call("cancel", {"id": 12345})[-1]["result"]["cancelled"] is False


def test_newer_request_for_same_document_supersedes(daemon):
    with Raw(daemon.socket) as c, Raw(daemon.socket) as other:
        # A long request from another client keeps the worker busy, so `queued` waits.
        busy = other.request("fill", fill_params(max_tokens=256, settings=BUSY, document="other.py"))
        assert other.recv()["type"] == "draft"
        running_elsewhere = c.request("fill", fill_params(document="b.py"))
        queued = c.request("fill", fill_params(document="a.py"))
        newer = c.request("fill", fill_params(document="a.py"))
        got = c.until_done(queued)[-1]
        assert got["error"]["code"] == "superseded"
        other.request("cancel", {"id": busy})
        assert other.until_done(busy)[-1]["error"]["code"] == "cancelled"
        assert c.until_done(running_elsewhere)[-1]["type"] == "result"
        assert c.until_done(newer)[-1]["type"] == "result"
        # And a running one: wait for its first draft, then send a newer one.
        first = c.request("fill", fill_params(max_tokens=256, settings=BUSY, document="c.py"))
        assert c.recv()["type"] == "draft"
        second = c.request("fill", fill_params(document="c.py"))
        assert c.until_done(first)[-1]["error"]["code"] == "superseded"
        assert c.until_done(second)[-1]["type"] == "result"


def test_deadline(daemon):
    with Raw(daemon.socket) as c:
        msgs = c.call("fill", fill_params(max_tokens=256, settings=BUSY, deadline_ms=1))
    assert msgs[-1]["error"]["code"] == "deadline"


CLIENT = r"""
import json, socket, sys
from dgemma.daemon import protocol as proto
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); proto.recv_frame(s)
s.sendall(proto.encode(proto.request(1, "hello", {"protocol": 1}))); proto.recv_frame(s)
s.sendall(proto.encode(proto.request(2, "fill", {"prefix": "def f():\n", "suffix": "", "max_tokens": 256,
                                                 "settings": json.loads(sys.argv[2])})))
while proto.recv_frame(s).get("type") != "draft":
    pass
print("streaming", flush=True)
input()
"""


def _until_idle(c: Raw) -> dict:
    """Status once the worker runs nothing (a BUSY request left running would take minutes)."""
    deadline = time.monotonic() + 60
    while (st := _status(c))["running"] is not None:
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    return st


def test_client_killed_mid_stream(daemon):
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(daemon.socket), json.dumps(BUSY)],
                            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "streaming"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # The daemon drops the orphan's work (and says so in its log), then serves the next client.
        with Raw(daemon.socket) as c:
            assert c.call("ping")[-1]["result"]["pong"]
            assert _until_idle(c)["queue_depth"] == 0
            assert c.call("fill", fill_params())[-1]["type"] == "result"
        daemon.wait_for_log(r"client \d+ disconnected with 1 request\(s\) in flight")
    finally:
        proc.kill()
        proc.wait()


def test_slow_reader_does_not_block_others(daemon):
    slow = Raw(daemon.socket)
    try:
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # Enough replies to fill the socket buffers, and then no reading at all.
        for _ in range(400):
            slow.request("status")
        fills = [slow.request("fill", fill_params(seed=i)) for i in range(3)]
        # Were the daemon blocked on the slow reader, these would time out.
        with Raw(daemon.socket) as c:
            for _ in range(5):
                assert c.call("ping")[-1]["result"]["pong"]
            assert c.call("fill", fill_params())[-1]["type"] == "result"
        # When it reads again, every request still gets its one reply (drafts may be dropped).
        replies = 0
        finished = set()
        while replies < 403:
            m = slow.recv()
            if m["type"] in ("result", "error"):
                replies += 1
                if m["id"] in fills:
                    assert m["type"] == "result"
                    finished.add(m["id"])
        assert finished == set(fills)
    finally:
        slow.close()


def test_async_client_request_draft_and_cancel(daemon):
    import asyncio

    from dgemma.daemon.client import AsyncClient
    from dgemma.errors import DgemmaError

    async def main() -> None:
        client = await AsyncClient.connect(daemon.socket, autostart=False)
        try:
            drafts = []
            res = await client.request("fill", fill_params(), on_draft=drafts.append)
            assert res["completions"] and drafts
            rid = client.new_id()
            seen = asyncio.Event()
            task = asyncio.create_task(client.request("fill", fill_params(max_tokens=256, settings=BUSY),
                                                      on_draft=lambda d: seen.set(), id=rid))
            await asyncio.wait_for(seen.wait(), 60)
            assert await client.cancel(rid) is True
            try:
                await task
                raise AssertionError("not cancelled")
            except DgemmaError as exc:
                assert exc.code == "cancelled"
            # Cancelling the awaiting task cancels the request on the daemon too.
            seen.clear()
            task = asyncio.create_task(client.request("fill", fill_params(max_tokens=256, settings=BUSY),
                                                      on_draft=lambda d: seen.set()))
            await asyncio.wait_for(seen.wait(), 60)
            task.cancel()
            assert (await client.request("ping"))["pong"]
            deadline = time.monotonic() + 60
            while (st_ := await client.request("status"))["running"] is not None:  # BUSY would run for minutes
                assert time.monotonic() < deadline, st_
                await asyncio.sleep(0.05)
            assert st_["queue_depth"] == 0
        finally:
            await client.close()

    asyncio.run(main())
