"""Helpers shared by the daemon and CLI tests (no tests here): an isolated environment,
one real daemon subprocess on a real socket per session, on the bundled model, and a raw
protocol connection."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dgemma.daemon import protocol as proto

# Two denoising steps per canvas keep a request short on the bundled model (a step takes tens
# of milliseconds on a busy 2-core CPU). Tests check shapes and outcomes, never generated text:
# the bundled weights may be retrained.
FAST_CONFIG = """\
[sampler]
max_denoising_steps = 2

[limits]
max_tokens = 512
"""

# Sampler settings for a request that runs until it is cancelled, whatever the weights: a
# canvas may stop early only after `stability_threshold` unchanged steps, so this one runs all
# 1,024 steps (a minute or more). Tests that need a busy worker use it instead of a slow model.
BUSY = {"max_denoising_steps": 1024, "stability_threshold": 1024}


def isolated_env(root: Path) -> dict[str, str]:
    """Environment for a subprocess that must never touch the user's real directories, on
    the bundled model."""
    env = dict(os.environ)
    env.update(DGEMMA_RUNTIME_DIR=str(root / "run"), DGEMMA_CONFIG_DIR=str(root / "cfg"),
               DGEMMA_DATA_DIR=str(root / "data"), PYTHONUNBUFFERED="1")
    env.pop("DGEMMA_SOCKET", None)
    env.pop("DGEMMA_MODEL", None)
    (root / "cfg").mkdir(parents=True, exist_ok=True)
    (root / "cfg" / "config.toml").write_text(FAST_CONFIG)
    return env


def short_tmp(prefix: str) -> Path:
    """Unix socket paths are limited to ~107 bytes; pytest's tmp paths can be long."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def dgemma(args: list[str], env: dict[str, str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dgemma.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


class Daemon:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.socket = root / "run" / "daemon.sock"

    def start(self) -> None:
        r = dgemma(["serve", "--detach"], self.env)  # returns once the model is loaded
        assert r.returncode == 0, r.stderr
        with Raw(self.socket) as c:
            assert c.call("status")[-1]["result"]["state"] == "ready"
            # Warm up, so tests wait only for their own work.
            c.call("fill", {"prefix": "def f(x):\n", "suffix": "\n", "max_tokens": 4})

    def stop(self) -> None:
        dgemma(["stop"], self.env, timeout=60)

    def log(self) -> str:
        try:
            return (self.root / "run" / "daemon.log").read_text()
        except OSError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 30) -> str:
        """The first log line matching the regex `pattern`: the daemon logs from its own
        threads, after it has answered."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(f"^.*{pattern}.*$", self.log(), re.MULTILINE)
            if found:
                return found.group(0)
            assert time.monotonic() < deadline, f"no log line matches {pattern!r}:\n{self.log()[-3000:]}"
            time.sleep(0.05)


_SESSION: dict[str, Daemon] = {}


@pytest.fixture(scope="session")
def daemon() -> Any:
    """The session's daemon on the bundled model (started once even when several test
    modules import this fixture)."""
    if "d" not in _SESSION:
        root = short_tmp("dgd-")
        d = Daemon(root, isolated_env(root))
        d.start()
        _SESSION["d"] = d
    d = _SESSION["d"]
    yield d
    if _SESSION.get("d") is d:
        del _SESSION["d"]
        d.stop()
        shutil.rmtree(d.root, ignore_errors=True)


def in_threads(target: Any, count: int, timeout: float) -> None:
    """Run target(i) for i in range(count), each on its own thread, and wait for all of them."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


class Raw:
    """A bare protocol connection, for tests that need to misbehave."""

    def __init__(self, path: Path, hello: bool = True, timeout: float = 60) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.greeting = self.recv()
        self.ids = iter(range(1, 1 << 30))
        if hello:
            msgs = self.call("hello", {"protocol": proto.PROTOCOL_VERSION})
            assert msgs[-1]["type"] == "result", msgs

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(proto.encode(msg))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        return proto.recv_frame(self.sock, 1 << 30)

    def request(self, method: str, params: dict[str, Any] | None = None, id: Any = None) -> Any:
        rid = next(self.ids) if id is None else id
        self.send(proto.request(rid, method, params))
        return rid

    def until_done(self, rid: Any) -> list[dict[str, Any]]:
        """Messages for `rid` up to and including its result or error."""
        out = []
        while True:
            msg = self.recv()
            if msg.get("id") != rid:
                continue
            out.append(msg)
            if msg["type"] in ("result", "error"):
                return out

    def call(self, method: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self.until_done(self.request(method, params))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Raw":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
