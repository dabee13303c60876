"""Reliability runs (issue 22), bounded in count and time, on this machine's own sockets:

* a fuzz run of 10,000 frames against the real daemon, a real fill after each batch of 500,
  and a check of the daemon's memory;
* 32 concurrent clients that cancel, disconnect mid-stream and drop half-sent frames;
* kill -9 injected before every filesystem step of an edit (each open, rename, remove, chmod,
  chown, mkdir: the file is the old or the new one byte for byte, and undo works);
* the config file flipped 50 times (valid, invalid, model changes, torn writes) under load.

Each prints one summary line (run pytest with -s to see them; BENCHMARKS.md, "Reliability",
records them)."""
from __future__ import annotations

import math
import os
import random
import socket
import stat
import struct
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest

from dgemma.daemon import protocol as proto
from dgemma.errors import DgemmaError
from dgemma.cli.fileedit import UndoStore, apply_edit, read_source
from test_daemon_util import in_threads, FAST_CONFIG, Raw, daemon, dgemma  # noqa: F401  (fixture)
from test_hardening_files import V0, V1, V2, _killed_edit

FILL = {"prefix": "def f(x):\n    return ", "suffix": "\n", "max_tokens": 4}


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _real_fill(daemon) -> None:
    with Raw(daemon.socket, timeout=120) as c:
        m = c.call("fill", {**FILL, "stream": False})[-1]
        assert m["type"] == "result" and m["result"]["completions"], m


# ---- fuzz ---------------------------------------------------------------------------------

INTERESTING: list[Any] = [
    None, True, False, 0, 1, -1, 2, 7, 255, 2**31, 2**53 + 1, 2**63 - 1, -2**63, 2**64 - 1, 0.0, -0.0, 0.5, 1.5,
    1e-320, 1e308, -1e308, math.inf, -math.inf, math.nan, "", "x", "fill", "ping", "agreement", "x" * 300,
    "\n2030-01-01 ERROR forged\x1b[2J", "\u202eevil", b"", b"\x00\xff" * 8, [], [1, "a", None], {}, {"a": 1},
    {1: 2}, {"t_max": 1e308}, {"max_denoising_steps": 0}, {"draws": True}, {"rank_by": 5},
]
METHODS = ["hello", "ping", "status", "fill", "edit", "cancel", "nope", "", "Fill", "x" * 1000, "\x00"]
BASES = {
    # deadline_ms 0: a fill that passes every check is refused when the worker takes it, so the
    # model never runs long on fuzz (a mutation that drops or changes the deadline runs a tiny one).
    "fill": {**FILL, "max_tokens": 2, "deadline_ms": 0, "stream": False, "settings": {"max_denoising_steps": 1}},
    "edit": {**FILL, "selection": "x + 1", "instruction": "simplify", "max_tokens": 2, "deadline_ms": 0,
             "stream": False, "settings": {"max_denoising_steps": 1}},
    "cancel": {"id": 3},
    "hello": {"protocol": 1},
    "ping": {},
    "status": {},
}


def _value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth < 2 and r < 0.1:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 2 and r < 0.2:
        return {rng.choice(["id", "method", "params", "prefix", "t_max", 1, None]): _value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    if r < 0.3:
        return rng.randrange(-2**63, 2**64)
    if r < 0.35:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(12)))
    return rng.choice(INTERESTING)


def _request(rng: random.Random, rid: int) -> dict[Any, Any]:
    method = rng.choice(list(BASES))
    msg: dict[Any, Any] = {"id": rid, "method": method, "params": dict(BASES[method])}
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        where = rng.random()
        if where < 0.15:
            key = rng.choice(["id", "method", "params", "extra"])
            if rng.random() < 0.2:
                msg.pop(key, None)
            else:
                msg[key] = rng.choice(METHODS) if key == "method" and rng.random() < 0.5 else _value(rng)
        elif isinstance(msg.get("params"), dict):
            params = msg["params"]
            keys = list(params) + ["model", "document", "seed", "n", "strength", "bogus", 1]
            key = rng.choice(keys)
            if rng.random() < 0.15:
                params.pop(key, None)
            elif key == "settings" and rng.random() < 0.7:
                params["settings"] = {**params.get("settings", {}),
                                      rng.choice(["t_max", "t_min", "entropy_bound", "draws", "rank_by",
                                                  "stability_threshold", "draft_strength", "nope", 3]): _value(rng)}
                if rng.random() < 0.5:  # and let it reach the engine, should it pass the door
                    params.pop("deadline_ms", None)
            else:
                params[key] = _value(rng)
    return msg


def _frame(rng: random.Random, rid: int) -> bytes:
    """One well-framed frame (its body may be anything)."""
    r = rng.random()
    if r < 0.8:
        try:
            return proto.encode(_request(rng, rid))
        except (OverflowError, TypeError, ValueError):  # not encodable: send garbage instead
            pass
    if r < 0.9:
        try:
            body = msgpack.packb(_value(rng), use_bin_type=True)
        except (OverflowError, TypeError, ValueError):
            body = b"\xc1"
    else:
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    return proto.HEADER.pack(len(body)) + body


def _broken_connection(daemon, rng: random.Random) -> str:
    """A connection that misbehaves at the frame level, then goes away. Returns what it did."""
    kind = rng.choice(["truncated", "oversized", "no-hello", "half-header"])
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    try:
        s.connect(str(daemon.socket))
        proto.recv_frame(s)
        if kind != "no-hello":
            s.sendall(proto.encode(proto.request(0, "hello", {"protocol": 1})))
            assert proto.recv_frame(s)["type"] == "result"
        if kind == "truncated":
            frame = proto.encode(proto.request(1, "fill", BASES["fill"]))
            s.sendall(frame[:rng.randrange(1, len(frame))])
        elif kind == "oversized":
            s.sendall(struct.pack(">I", rng.randrange(16 << 20, 1 << 32)))
            m = proto.recv_frame(s)
            assert m["error"]["code"] == "too_large", m
        elif kind == "no-hello":
            s.sendall(proto.encode(proto.request(1, "ping")))
            assert proto.recv_frame(s)["error"]["code"] == "invalid_request"
        else:
            s.sendall(b"\x00\x00")
    finally:
        s.close()
    return kind


def test_fuzz_10000_frames_with_real_fills_and_bounded_memory(daemon):
    rng = random.Random(22)
    total, batch = 10_000, 500
    pid = Raw(daemon.socket).call("status")[-1]["result"]["pid"]
    codes: Counter[str] = Counter()
    broken: Counter[str] = Counter()
    sent = 0
    rss_start = rss_peak = 0
    rid = 0
    while sent < total:
        with Raw(daemon.socket, timeout=120) as c:
            expected = 0
            for _ in range(batch - 20):
                rid += 1
                c.send_bytes(_frame(rng, rid))
                expected += 1
            # Every well-framed frame gets exactly one final reply (drafts aside).
            got = 0
            while got < expected:
                m = c.recv()
                if m.get("type") in ("result", "error"):
                    got += 1
                    codes[m["error"]["code"] if m["type"] == "error" else "result"] += 1
            sent += expected
        for _ in range(20):
            broken[_broken_connection(daemon, rng)] += 1
            sent += 1
        _real_fill(daemon)
        rss = _rss(pid)
        rss_start = rss_start or rss
        rss_peak = max(rss_peak, rss)
    assert codes["internal"] == 0, codes
    assert "internal error" not in daemon.log()
    growth = rss_peak - rss_start
    print(f"\nRELIABILITY fuzz: {sent} frames, replies {dict(codes)}, broken connections {dict(broken)}, "
          f"daemon RSS {rss_start / 2**20:.0f} MiB after the first batch, peak {rss_peak / 2**20:.0f} MiB")
    assert growth < 128 << 20, growth


# ---- 32 clients ---------------------------------------------------------------------------

def test_32_clients_cancel_and_disconnect_mid_stream(daemon):
    log_before = len(daemon.log())
    outcomes: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()
    params = {**FILL, "max_tokens": 8, "settings": {"max_denoising_steps": 2}}

    def note(what: str) -> None:
        with lock:
            outcomes[what] += 1

    def client(i: int) -> None:
        rng = random.Random(i)
        try:
            for round_ in range(2):
                mode = rng.choice(["wait", "cancel", "drop-after-draft", "drop-at-once", "half-frame"])
                c = Raw(daemon.socket, timeout=120)
                try:
                    rid = c.request("fill", {**params, "seed": i * 10 + round_})
                    if mode == "wait":
                        m = c.until_done(rid)[-1]
                        assert m["type"] == "result", m
                    elif mode == "cancel":
                        first = c.recv()
                        if first["type"] == "draft":
                            cid = c.request("cancel", {"id": rid})
                            done = {}
                            while rid not in done or cid not in done:
                                m = c.recv()
                                if m["type"] != "draft":
                                    done[m["id"]] = m
                            assert done[rid]["type"] == "result" or done[rid]["error"]["code"] == "cancelled", done
                    elif mode == "drop-after-draft":
                        c.recv()
                        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                    elif mode == "half-frame":
                        frame = proto.encode(proto.request(99, "fill", params))
                        c.send_bytes(frame[:len(frame) // 2])
                    note(mode)
                finally:
                    c.close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    in_threads(client, 32, 300)
    assert not errors, errors
    assert sum(outcomes.values()) == 64, outcomes
    # Everyone gone: the daemon forgets them, the worker goes idle, and it serves the next client.
    with Raw(daemon.socket) as c:
        deadline = time.monotonic() + 120
        while True:
            st = c.call("status")[-1]["result"]
            if st["clients"] == 1 and st["running"] is None and st["queue_depth"] == 0:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
    _real_fill(daemon)
    new_log = daemon.log()[log_before:]
    assert "internal error" not in new_log
    print(f"\nRELIABILITY 32 clients: 64 connections {dict(outcomes)}; the daemon logged "
          f"{new_log.count('disconnected with')} clients that left with requests in flight and went idle")


# ---- kill -9 at every write step ----------------------------------------------------------

def test_kill_9_before_every_write_step_of_an_edit(tmp_path):
    """An edit (V1 -> V2, after a real edit V0 -> V1) killed before each of its filesystem
    steps in turn (the writes, and the opens between them): the file is V1 or V2 byte for byte with its mode, and `dgemma undo` walks
    back to V0 whatever the kill left."""
    def setup(k: int) -> tuple[Path, dict[str, str], UndoStore]:
        root = tmp_path / f"k{k}"
        root.mkdir()
        env = dict(os.environ, DGEMMA_DATA_DIR=str(root / "data"), DGEMMA_RUNTIME_DIR=str(root / "run"),
                   DGEMMA_CONFIG_DIR=str(root / "cfg"))
        store = UndoStore(root / "data" / "undo")
        f = root / "calc.py"
        f.write_bytes(V0)
        f.chmod(0o640)
        apply_edit(read_source(f), V1, store)
        return f, env, store

    f, env, _ = setup(0)
    r = _killed_edit(f, V2, 0, env)
    writes = len(r.stdout.splitlines())
    assert f.read_bytes() == V2 and writes >= 8, (r.stdout, r.stderr)
    left: Counter[str] = Counter()
    for k in range(1, writes + 1):
        f, env, store = setup(k)
        r = _killed_edit(f, V2, k, env)
        assert r.returncode == -9, (k, r.stderr)
        data = f.read_bytes()
        assert data in (V1, V2), (k, data)
        assert stat.S_IMODE(f.stat().st_mode) == 0o640
        left["new" if data == V2 else "old"] += 1
        u = dgemma(["undo", str(f)], env, timeout=60)
        assert u.returncode == 0 and "internal" not in u.stderr, (k, u.stderr)
        if data == V2:
            assert f.read_bytes() == V1, k
            store.undo(f)
        assert f.read_bytes() == V0, k
        with pytest.raises(DgemmaError, match="nothing to undo"):
            store.undo(f)
    print(f"\nRELIABILITY kill -9: {writes} filesystem steps per edit, each killed once: the file was the old one "
          f"{left['old']} times and the new one {left['new']} times; undo reached the original every time")


# ---- config watcher -----------------------------------------------------------------------

def test_config_watcher_flipped_50_times_under_load(daemon):
    cfg = Path(daemon.env["DGEMMA_CONFIG_DIR"]) / "config.toml"
    good = cfg.read_text()
    assert good == FAST_CONFIG
    variants = {
        "valid": good,
        "valid-other": good.replace("max_denoising_steps = 2", "max_denoising_steps = 3") + "max_n = 4\n",
        "meta-device": 'device = "meta"\n' + good,
        "tiny-frames": good + "max_frame_bytes = 10\n",
        "hot-sampler": good.replace("max_denoising_steps = 2", "max_denoising_steps = 2\nt_max = 1e308"),
        "torn-write": good[: len(good) // 2],
        "model-change": 'dtype = "fp32"\n' + good,
    }
    rng = random.Random(50)
    stop = threading.Event()
    replies: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def load(i: int) -> None:
        try:
            with Raw(daemon.socket, timeout=120) as c:
                n = 0
                while not stop.is_set():
                    n += 1
                    m = c.call("fill", {**FILL, "seed": n, "stream": n % 2 == 0})[-1]
                    s = c.call("status")[-1]
                    with lock:
                        replies[m["type"] if m["type"] == "result" else m["error"]["code"]] += 1
                        replies["status"] += s["type"] == "result"
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    log_before = daemon.log()
    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    flips: Counter[str] = Counter()
    try:
        for i in range(50):
            name = rng.choice(list(variants)) if i % 7 else "model-change"
            text = variants[name]
            if rng.random() < 0.5:
                cfg.write_text(text)  # in place, as a careless editor does
            else:
                tmp = cfg.with_name(".config.toml.swp")
                tmp.write_text(text)
                os.replace(tmp, cfg)  # as most editors save
            flips[name] += 1
            time.sleep(rng.uniform(0.02, 0.3))
    finally:
        cfg.write_text(good)
        stop.set()
        for t in threads:
            t.join(300)
    assert not errors, errors
    with Raw(daemon.socket) as c:
        res = c.call("reload")[-1]["result"]
        assert res["reloaded"] is True and res["error"] is None and res["state"] == "ready", res
        st = c.call("status")[-1]["result"]
        assert st["config_error"] is None and st["load_error"] is None and st["state"] == "ready", st
    _real_fill(daemon)
    assert set(replies) <= {"result", "status"}, replies
    new_log = daemon.log()[len(log_before):]
    assert "internal error" not in new_log
    print(f"\nRELIABILITY config flips: {sum(flips.values())} writes {dict(flips)}; under load "
          f"{replies['result']} fills and {replies['status']} status requests, all answered; the watcher applied "
          f"{new_log.count('config reloaded from')} changes, refused {new_log.count('invalid config')} invalid "
          f"files and loaded the model {new_log.count(' ready on ')} times")
