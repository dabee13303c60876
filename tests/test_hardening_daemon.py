"""Issue 22, the daemon's side: bad parameters are `invalid_params` (never `internal`), ids are
checked, what a client sends is capped and escaped before it is echoed or logged, the log
rotates, strangers on the TCP port are held to a deadline, a small frame limit and a cap, and no
config value can lock clients (or `dgemma status` / `dgemma stop`) out. Real daemons on real
sockets, on the bundled model."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dgemma.daemon import protocol as proto
from test_daemon_util import FAST_CONFIG, Raw, daemon, dgemma, isolated_env, short_tmp  # noqa: F401  (fixture)

BASE = {"prefix": "def f(x):\n", "suffix": "\n", "max_tokens": 4, "stream": False}


def _final(c: Raw) -> dict[str, Any]:
    while (m := c.recv())["type"] == "draft":
        pass
    return m


def test_bad_parameters_are_invalid_params_never_internal(daemon):
    """Item 1: wrong types and out-of-range or non-finite numbers anywhere in a request are the
    client's mistake, and say so; ids that are not an integer or a string are not echoed."""
    inf, nan = float("inf"), float("nan")
    cases = [
        {"settings": {1: 2}},
        {"settings": {b"t_max": 0.5}},
        {"settings": {"t_max": 1e308}},
        {"settings": {"t_max": inf}},
        {"settings": {"t_min": nan}},
        {"settings": {"entropy_bound": -inf}},
        {"settings": {"confidence_threshold": 1e300}},
        {"settings": {"entropy_bound": "x"}},
        {"settings": {"draws": True}},
        {"settings": {"max_denoising_steps": 2.5}},
        {"settings": {"stability_threshold": -1}},
        {"settings": {"rank_by": ["agreement"]}},
        {"settings": {"draft_strength": 1.0}},
        {"settings": "fast"},
        {"deadline_ms": inf},
        {"deadline_ms": nan},
        {"deadline_ms": -1},
        {"seed": "7"},
        {"n": 2**63},
        {"max_tokens": -2**63},
        {"document": 5},
        {"stream": "yes"},
        {"model": "m" * 100_000},
    ]
    with Raw(daemon.socket) as c:
        for extra in cases:
            c.send(proto.request(1, "fill", {**BASE, **extra}))
            m = _final(c)
            assert m["type"] == "error" and m["error"]["code"] == "invalid_params", (extra, m)
            assert len(m["error"]["message"]) <= proto.MAX_MESSAGE_CHARS, extra
        edit = {**BASE, "selection": "x", "instruction": "y"}
        for extra in ({"strength": nan}, {"strength": inf}, {"strength": 2}):
            c.send(proto.request(2, "edit", {**edit, **extra}))
            m = _final(c)
            assert m["error"]["code"] == "invalid_params", (extra, m)
        # Ids: booleans, floats, maps and over-long strings are not ids; they are never echoed.
        for bad in (True, False, 1.5, {"a": 1}, [1], b"id", "i" * (proto.MAX_ID_CHARS + 1)):
            c.send({"id": bad, "method": "ping"})
            m = c.recv()
            assert m["type"] == "error" and m["error"]["code"] == "invalid_request" and m["id"] is None, (bad, m)
        assert c.call("ping")[-1]["result"]["pong"] is True
        ok = c.call("fill", {**BASE, "seed": 2**64 - 1, "settings": {"t_max": 1, "t_min": 0.5}})[-1]
        assert ok["type"] == "result", ok
    assert "internal error" not in daemon.log()


def test_echoes_and_log_lines_are_capped_and_escaped(daemon):
    """Item 3: a 3 MB request of junk gets a small reply and a short log line; a method name
    with a newline or ESC cannot forge a log line."""
    log = daemon.root / "run" / "daemon.log"
    before = log.stat().st_size
    big = "x" * 1_500_000
    with Raw(daemon.socket) as c:
        for i in range(20):
            c.send({"id": big, "method": big})
            m = c.recv()
            assert m["type"] == "error" and m["id"] is None
            assert len(proto.encode(m)) < 2048
            c.send({"id": i, "method": big})
            m = c.recv()
            assert m["id"] == i and m["error"]["code"] == "invalid_request" and len(proto.encode(m)) < 2048
        forged = "nope\n2030-01-01 00:00:00,000 ERROR dgemma.daemon: forged\x1b[2K\r"
        c.send({"id": "f", "method": forged})
        m = c.recv()
        assert m["error"]["code"] == "invalid_request" and "\\n" in m["error"]["message"]
        assert c.call("ping")[-1]["result"]["pong"]
    line = daemon.wait_for_log(r"'f' rejected")
    assert "\\n2030-01-01" in line and "\\x1b" in line
    text = log.read_text()
    assert not any(ln.startswith("2030-01-01") or "\x1b" in ln for ln in text.splitlines())
    assert log.stat().st_size - before < 64 * 1024  # 41 requests, 120 MB of junk


def test_log_file_rotates_and_keeps_stderr_in_the_current_file(tmp_path):
    """Item 3: daemon.log rolls over to .1 and .2 past its size; Python's own stderr output
    (thread tracebacks, warnings) follows the current file."""
    script = r"""
import logging, sys
from pathlib import Path
from dgemma.daemon import logs
h = logs.RotatingLog(Path(sys.argv[1]), max_bytes=4000, backups=2, own_stdio=True)
h.setFormatter(logs.SafeFormatter())
log = logging.getLogger("t"); log.addHandler(h); log.setLevel(logging.INFO)
for i in range(400):
    log.info("record %d %s", i, "z" * 40)
print("from stderr after rollover", file=sys.stderr, flush=True)
"""
    path = tmp_path / "daemon.log"
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=60)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["daemon.log", "daemon.log.1", "daemon.log.2"], names
    assert all((tmp_path / n).stat().st_size <= 4000 for n in names)
    assert "from stderr after rollover" in path.read_text()
    assert "record 399" in path.read_text()


def test_safe_formatter_one_line_per_record():
    from dgemma.daemon.logs import MAX_MESSAGE_CHARS, SafeFormatter

    fmt = SafeFormatter("%(levelname)s %(message)s")
    rec = logging.LogRecord("x", logging.WARNING, __file__, 1, "m=%s", ("a\nb\x1b[31m\u202e" + "y" * 10**6,), None)
    out = fmt.format(rec)
    assert "\n" not in out and "\x1b" not in out and "\u202e" not in out and len(out) < MAX_MESSAGE_CHARS + 100
    try:
        raise ValueError("evil\nERROR forged")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    lines = fmt.format(rec).split("\n")
    assert lines[0] == "ERROR boom" and all(ln.startswith("    ") for ln in lines[1:]), lines


def _stop_for_sure(env: dict[str, str], root: Path) -> None:
    """`dgemma stop`, and SIGTERM to the daemon's pid should it not answer (a daemon locked out of
    its own control requests must not outlive the test)."""
    dgemma(["stop"], env, timeout=60)
    try:
        os.kill(json.loads((root / "run" / "daemon.pid").read_text())["pid"], signal.SIGTERM)
    except (OSError, ValueError, KeyError):
        pass
    shutil.rmtree(root, ignore_errors=True)


def _tcp_info(root: Path) -> dict[str, Any]:
    return json.loads((root / "run" / "daemon.tcp.json").read_text())


def _assert_closed(s: socket.socket) -> None:
    """The daemon closed `s` (its handler has finished: the close comes last)."""
    try:
        assert s.recv(1) == b""
    except ConnectionResetError:
        pass


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_tcp_strangers_get_a_deadline_a_small_frame_limit_and_a_cap():
    """Item 9: before `hello` succeeds a connection may send frames of 64 KiB at most, must say
    hello within PREAUTH_TIMEOUT_S, and only MAX_PREAUTH_CONNECTIONS may wait at once."""
    root = short_tmp("dgh9-")
    env = isolated_env(root)
    env["DGEMMA_TRANSPORT"] = "tcp"
    held: list[socket.socket] = []
    try:
        assert dgemma(["serve", "--detach"], env).returncode == 0
        info = _tcp_info(root)
        port, pid = info["port"], info["pid"]

        def stranger() -> socket.socket:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            held.append(s)
            return s

        rss0 = _rss(pid)
        # Twelve strangers each start an 8 MiB frame: refused at the length prefix, nothing buffered.
        for _ in range(12):
            s = stranger()
            assert proto.recv_frame(s)["type"] == "hello"
            s.sendall(struct.pack(">I", 8 << 20) + b"x" * 65536)
            m = proto.recv_frame(s)
            assert m["error"]["code"] == "too_large" and str(proto.PREAUTH_MAX_FRAME) in m["error"]["message"]
            _assert_closed(s)
        # Fill the waiting room with idle strangers; the next ones are turned away at once.
        t0 = time.monotonic()
        idle = [stranger() for _ in range(proto.MAX_PREAUTH_CONNECTIONS)]
        for s in idle:
            assert proto.recv_frame(s)["type"] == "hello"
        for _ in range(5):
            s = stranger()
            assert proto.recv_frame(s)["type"] == "hello"
            m = proto.recv_frame(s)
            assert m["error"]["code"] == "too_large" and "waiting for their hello" in m["error"]["message"]
            _assert_closed(s)
        # The idle ones are closed at the deadline (bounded wait).
        for s in idle:
            m = proto.recv_frame(s)
            assert m["error"]["code"] == "invalid_request" and "hello" in m["error"]["message"]
            _assert_closed(s)
        waited = time.monotonic() - t0
        assert waited < proto.PREAUTH_TIMEOUT_S + 20
        assert _rss(pid) - rss0 < 48 << 20
        # The daemon serves its real clients (and the waiting room is empty again).
        s = stranger()
        proto.recv_frame(s)
        s.sendall(proto.encode(proto.request(1, "hello", {"protocol": 1, "token": info["token"]})))
        assert proto.recv_frame(s)["type"] == "result"
        s.sendall(proto.encode(proto.request(2, "status")))
        assert proto.recv_frame(s)["result"]["clients"] == 1
    finally:
        for s in held:
            s.close()
        _stop_for_sure(env, root)


def test_no_config_value_locks_clients_out():
    """Item 10: `max_frame_bytes = 10` and `device = "meta"` are refused as invalid (status says
    why, the previous config stays); `dgemma status`, fills and `dgemma stop` keep working."""
    root = short_tmp("dgh10-")
    env = isolated_env(root)
    cfg = root / "cfg" / "config.toml"
    cfg.write_text(FAST_CONFIG.replace("[limits]\n", "[limits]\nmax_frame_bytes = 10\n"))
    try:
        r = dgemma(["serve", "--detach"], env)
        assert r.returncode == 0, r.stderr
        r = dgemma(["status", "--json"], env)
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["state"] == "ready" and "max_frame_bytes" in st["config_error"]
        with Raw(root / "run" / "daemon.sock") as c:
            assert c.greeting["max_frame"] >= proto.MIN_FRAME
            assert c.call("fill", BASE)[-1]["type"] == "result"
            cfg.write_text('device = "meta"\n' + FAST_CONFIG)
            err = c.call("reload")[-1]
            assert err["error"]["code"] == "invalid_params" and "meta" in err["error"]["message"]
            assert c.call("fill", BASE)[-1]["type"] == "result"
            assert "meta" in c.call("status")[-1]["result"]["config_error"]
        r = dgemma(["serve", "--device", "meta"], env)
        assert r.returncode == 1 and "meta" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        r = dgemma(["stop"], env, timeout=60)
        assert r.returncode == 0 and "stopped" in r.stderr
    finally:
        _stop_for_sure(env, root)


def test_device_and_limits_are_checked_where_torch_runs():
    from dgemma.daemon.config import Limits, parse_config
    from dgemma.errors import DgemmaError
    from dgemma.engine.loading import pick_device

    for bad in ('device = "meta"', 'device = "cuda:x"', 'device = "cpu:0:1"', "[limits]\nmax_frame_bytes = 10",
                "[limits]\nmax_n = 9", "[limits]\nmax_queued_drafts = 0", "[limits]\nmax_tokens = true"):
        try:
            parse_config(bad)
        except DgemmaError as exc:
            assert exc.code == "invalid_params" and exc.message.startswith("config.toml: "), bad
        else:
            raise AssertionError(f"accepted: {bad}")
    for bad in ("meta", "cuda:99" if _has_cuda() else "cuda", "xla", "mps" if not _has_mps() else "meta"):
        try:
            pick_device(bad)
        except DgemmaError as exc:
            assert exc.code == "invalid_params"
        else:
            raise AssertionError(f"accepted: {bad}")
    assert str(pick_device("cpu")) == "cpu"
    try:
        Limits(max_frame_bytes=10)
    except DgemmaError:
        pass
    else:
        raise AssertionError("Limits(max_frame_bytes=10) accepted")


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _has_mps() -> bool:
    import torch
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
