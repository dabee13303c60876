"""The TCP transport (Windows' transport, selected here with DGEMMA_TRANSPORT=tcp): a real
daemon subprocess on the bundled model on loopback with a per-user token file, reached
through the same client auto-discovery, and refusing connections that do not present the token."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from dgemma.daemon import protocol as proto
from dgemma.daemon.client import AsyncClient, Client
from test_daemon_util import dgemma, isolated_env, short_tmp


@pytest.fixture(scope="module")
def tcp_daemon(monkeypatch_module: pytest.MonkeyPatch) -> Any:
    root = short_tmp("dgt-")
    env = isolated_env(root)
    env["DGEMMA_TRANSPORT"] = "tcp"
    # This process's clients must discover the same daemon through the same variables.
    for key in ("DGEMMA_TRANSPORT", "DGEMMA_RUNTIME_DIR", "DGEMMA_CONFIG_DIR", "DGEMMA_DATA_DIR"):
        monkeypatch_module.setenv(key, env[key])
    monkeypatch_module.delenv("DGEMMA_SOCKET", raising=False)
    r = dgemma(["serve", "--detach"], env)  # returns once the model is loaded
    try:
        assert r.returncode == 0, r.stderr + r.stdout
        with Client.connect() as c:
            assert c.request("status")["state"] == "ready"
        yield root
    finally:
        dgemma(["stop"], env, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def token_file(root: Path) -> Path:
    return root / "run" / "daemon.tcp.json"


def raw_connect(root: Path) -> socket.socket:
    info = json.loads(token_file(root).read_text())
    sock = socket.create_connection(("127.0.0.1", info["port"]), timeout=30)
    assert proto.recv_frame(sock)["type"] == "hello"  # the server's greeting
    return sock


def assert_closed(sock: socket.socket) -> None:
    with pytest.raises((proto.ConnectionClosed, ConnectionError)):
        # Anything still sent after the refusal goes nowhere; the stream ends.
        sock.sendall(proto.encode(proto.request(9, "ping")))
        proto.recv_frame(sock)


def test_token_file_private_and_loopback_only(tcp_daemon: Path) -> None:
    path = token_file(tcp_daemon)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    info = json.loads(path.read_text())
    assert len(bytes.fromhex(info["token"])) == 32 and isinstance(info["pid"], int)
    assert not (tcp_daemon / "run" / "daemon.sock").exists()
    port = info["port"]
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                listening.add(local.rsplit(":", 1)[0])
    assert listening == {"0100007F"}, listening  # 127.0.0.1 only, no IPv6, no 0.0.0.0


def test_client_pings_and_fills_over_tcp(tcp_daemon: Path) -> None:
    with Client.connect() as c:
        assert c.request("ping")["pong"] is True
        st = c.request("status")
        assert st["transport"] == "tcp" and st["socket"].startswith("tcp://127.0.0.1:")
        drafts: list[dict[str, Any]] = []
        res = c.request("fill", {"prefix": "def f(x):\n", "suffix": "\n", "max_tokens": 4}, on_draft=drafts.append)
        assert res["completions"] and drafts

    async def go() -> dict[str, Any]:
        client = await AsyncClient.connect(autostart=True)  # finds the running daemon, starts none
        try:
            assert (await client.request("ping"))["pong"] is True
            return await client.request("fill", {"prefix": "x = ", "suffix": "\n", "max_tokens": 4})
        finally:
            await client.close()
    assert asyncio.run(go())["completions"]


def test_wrong_token_is_refused_and_closed(tcp_daemon: Path) -> None:
    with raw_connect(tcp_daemon) as sock:
        sock.sendall(proto.encode(proto.request(1, "hello", {"protocol": proto.PROTOCOL_VERSION, "token": "00" * 32})))
        msg = proto.recv_frame(sock)
        assert msg["type"] == "error" and msg["error"]["code"] == "unauthorized" and msg["id"] == 1
        assert_closed(sock)


def test_request_without_token_is_refused(tcp_daemon: Path) -> None:
    with raw_connect(tcp_daemon) as sock:
        sock.sendall(proto.encode(proto.request(1, "ping")))
        msg = proto.recv_frame(sock)
        assert msg["type"] == "error" and msg["error"]["code"] == "unauthorized"
        assert_closed(sock)
    with raw_connect(tcp_daemon) as sock:  # a hello without a token is no better
        sock.sendall(proto.encode(proto.request(1, "hello", {"protocol": proto.PROTOCOL_VERSION})))
        assert proto.recv_frame(sock)["error"]["code"] == "unauthorized"
        assert_closed(sock)
    # The daemon is unharmed.
    with Client.connect() as c:
        assert c.request("ping")["pong"] is True


def test_token_file_removed_on_shutdown() -> None:
    """A second daemon of its own (the module's keeps running): stop removes the file."""
    root = short_tmp("dgt2-")
    env = isolated_env(root)
    env["DGEMMA_TRANSPORT"] = "tcp"
    try:
        assert dgemma(["serve", "--detach"], env).returncode == 0
        assert token_file(root).exists()
        r = dgemma(["stop"], env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert not token_file(root).exists()
        assert not (root / "run" / "daemon.pid").exists()
    finally:
        dgemma(["stop"], env, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
