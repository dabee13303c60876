"""`dgemma` end to end: edit / fill / undo / status / stop through the session's daemon,
auto-start, --no-daemon, error paths, and SIGKILL at random points during `edit`."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_daemon_util import Raw, daemon, dgemma, isolated_env, short_tmp  # noqa: F401  (fixture)

SOURCE = b"import os\r\n\r\ndef add(a, b):\r\n    return a + b\r\n\r\n\r\ndef mul(a, b):\r\n    return a * b\r\n"
FAST = ["--steps", "2", "--max-tokens", "8", "--seed", "3"]


def _file(tmp_path: Path, data: bytes = SOURCE, mode: int = 0o640) -> Path:
    f = tmp_path / "calc.py"
    f.write_bytes(data)
    os.chmod(f, mode)
    return f


def _one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dgemma: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_edit_dry_run_prints_diff_and_writes_nothing(daemon, tmp_path):
    f = _file(tmp_path)
    r = dgemma(["edit", f"{f}:4-4", "--dry-run", *FAST], daemon.env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("--- a/") and "\n+++ b/" in r.stdout and "-    return a + b" in r.stdout
    assert f.read_bytes() == SOURCE


def test_edit_without_yes_and_without_terminal_only_prints(daemon, tmp_path):
    f = _file(tmp_path)
    r = dgemma(["edit", f"{f}:4-4", *FAST], daemon.env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "@@" in r.stdout
    assert f.read_bytes() == SOURCE


def test_edit_yes_keeps_line_endings_and_mode_then_undo(daemon, tmp_path):
    f = _file(tmp_path, mode=0o751)
    r = dgemma(["edit", f"{f}:4-4", "--yes", *FAST], daemon.env)
    assert r.returncode == 0, r.stderr
    new = f.read_bytes()
    assert new != SOURCE and "applied" in r.stderr
    # Outside the region: byte-identical. Inside: the file's CRLF, no bare LF.
    assert new.startswith(SOURCE[:SOURCE.index(b"    return a + b")])
    assert new.endswith(SOURCE[SOURCE.index(b"\r\n\r\n\r\ndef mul") + 2:])
    assert b"\n" not in new.replace(b"\r\n", b"")
    assert (f.stat().st_mode & 0o7777) == 0o751
    r = dgemma(["undo", str(f)], daemon.env)
    assert r.returncode == 0, r.stderr
    assert f.read_bytes() == SOURCE and (f.stat().st_mode & 0o7777) == 0o751
    assert "nothing to undo" in _one_line_error(dgemma(["undo", str(f)], daemon.env))


def test_edit_on_a_terminal_asks_before_applying(daemon, tmp_path):
    import pty

    f = _file(tmp_path)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "dgemma.daemon.cli", "edit", f"{f}:4-4", *FAST],
                                env=daemon.env, stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        out = b""
        while b"Apply this change?" not in out:
            chunk = os.read(master, 4096)
            assert chunk, out
            out += chunk
        os.write(master, b"y\n")
        assert proc.wait(60) == 0
    finally:
        os.close(master)
    assert f.read_bytes() != SOURCE and b"@@" in out


def test_edit_with_instruction(daemon, tmp_path):
    f = _file(tmp_path)
    r = dgemma(["edit", f"{f}:7-8", "-m", "rename to product", "--yes", *FAST], daemon.env)
    assert r.returncode == 0, r.stderr
    assert f.read_bytes().startswith(SOURCE[:SOURCE.index(b"def mul")])


def test_fill_json(daemon, tmp_path):
    f = _file(tmp_path)
    r = dgemma(["fill", f"{f}:4:12", "--json", *FAST], daemon.env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"middle", "model", "steps", "ms"} and isinstance(out["middle"], str) and out["steps"] >= 1
    assert f.read_bytes() == SOURCE


def test_cli_errors_are_one_line_and_write_nothing(daemon, tmp_path):
    f = _file(tmp_path)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    cases = [
        (["edit", f"{tmp_path}/missing.py:1-2", "--yes"], "no such file"),
        (["edit", f"{tmp_path}/blob.bin:1-1", "--yes"], "binary"),
        (["edit", f"{f}:5-3", "--yes"], "bad line range"),
        (["edit", f"{f}:7-99", "--yes"], "past the end"),
        (["edit", f"{f}", "--yes"], "FILE:START-END"),
        (["edit", f"{f}:1-2", "--yes", "--dry-run"], "contradict"),
        (["fill", f"{f}:99:1"], "past the end"),
        (["fill", f"{f}:1:80"], "past the end of the line"),
        (["edit", f"{f}:4-4", "--yes", "--model", "/no/such/model"], "/no/such/model"),
        (["edit", f"{f}:4-4", "--yes", "--steps", "2", "--max-tokens", "999999"], "max_tokens"),
        (["edit", f"{f}:4-4", "--bogus"], "No such option"),
        (["frobnicate"], "No such command"),
    ]
    for args, words in cases:
        line = _one_line_error(dgemma(args, daemon.env))
        assert words in line, (args, line)
    assert f.read_bytes() == SOURCE


def test_edit_refuses_when_file_changed_during_generation(daemon, tmp_path):
    f = _file(tmp_path)
    with Raw(daemon.socket) as busy:
        # Keep the worker busy so the edit's request waits in the queue while we type.
        rid = busy.request("fill", {"prefix": "x = ", "max_tokens": 256, "settings": {"max_denoising_steps": 48}})
        assert busy.recv()["type"] == "draft"
        proc = subprocess.Popen([sys.executable, "-m", "dgemma.daemon.cli", "edit", f"{f}:4-4", "--yes", *FAST],
                                env=daemon.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while busy.call("status")[-1]["result"]["queue_depth"] == 0:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
            f.write_bytes(SOURCE + b"# typed meanwhile\r\n")
            busy.request("cancel", {"id": rid})
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 1 and "changed on disk" in err and "Traceback" not in err
    assert f.read_bytes() == SOURCE + b"# typed meanwhile\r\n"


def test_status_json_and_unreachable_daemon(daemon, tmp_path):
    r = dgemma(["status", "--json"], daemon.env)
    st = json.loads(r.stdout)
    assert r.returncode == 0 and st["running"] is True and st["socket"] == str(daemon.socket)
    assert st["model"] and st["device"] == "cpu" and st["requests_served"] >= 1
    r = dgemma(["status"], daemon.env)
    assert r.returncode == 0 and "queue" in r.stdout
    nowhere = isolated_env(tmp_path / "none", None)
    assert "no daemon running" in _one_line_error(dgemma(["status"], nowhere))
    r = dgemma(["status", "--json"], nowhere)
    assert r.returncode == 1 and json.loads(r.stdout)["running"] is False
    r = dgemma(["stop"], nowhere)
    assert r.returncode == 0 and "no daemon" in r.stderr


def test_doctor(daemon):
    r = dgemma(["doctor"], daemon.env)
    assert "torch" in r.stdout and "daemon answers" in r.stdout and "mode 600" in r.stdout
    assert "model files in" in r.stdout


def test_autostart_races_start_one_daemon_and_no_daemon_mode(tiny_model_dir, tmp_path):
    root = short_tmp("dga-")
    env = isolated_env(root, tiny_model_dir)
    f = _file(tmp_path)
    try:
        procs = [subprocess.Popen([sys.executable, "-m", "dgemma.daemon.cli", "fill", f"{f}:4:5", *FAST],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        # Meanwhile, the in-process path (no daemon involved).
        r = dgemma(["fill", f"{f}:4:5", "--no-daemon", "--json", *FAST], env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["model"] == tiny_model_dir.name
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        st = json.loads(dgemma(["status", "--json"], env).stdout)
        assert st["running"] and st["served_by_method"]["fill"] == 2
        log = (root / "run" / "daemon.log").read_text()
        assert log.count("listening on") == 1, log
        assert dgemma(["stop"], env).returncode == 0
        assert not (root / "run" / "daemon.sock").exists()
    finally:
        dgemma(["stop"], env)
        shutil.rmtree(root, ignore_errors=True)


def test_sigkill_of_edit_at_random_points_never_leaves_a_partial_file(daemon, tmp_path):
    big = b"".join(b"line_%05d = %d\r\n" % (i, i) for i in range(300))
    ref = _file(tmp_path, big)
    args = ["edit", "", "--yes", *FAST]
    t0 = time.monotonic()
    args[1] = f"{ref}:150-151"
    r = dgemma(args, daemon.env)
    assert r.returncode == 0, r.stderr
    full = time.monotonic() - t0
    new = ref.read_bytes()
    assert new != big
    rng = random.Random(1)
    for i in range(4):
        f = tmp_path / f"k{i}.py"
        f.write_bytes(big)
        args[1] = f"{f}:150-151"
        proc = subprocess.Popen([sys.executable, "-m", "dgemma.daemon.cli", *args], env=daemon.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, full))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert f.read_bytes() in (big, new)


BUNDLED = Path(__file__).resolve().parent.parent / "daemon" / "bundled"


@pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason="the bundled model is not built yet")
def test_fill_with_the_bundled_default_model(tmp_path):
    env = isolated_env(tmp_path / "b", None)
    env.pop("DGEMMA_MODEL", None)
    f = tmp_path / "b.py"
    f.write_text("def add(a, b):\n    return \n")
    r = dgemma(["fill", f"{f}:2:12", "--no-daemon", "--json", "--max-tokens", "16", "--seed", "0"], env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "dgemma-bundled"
