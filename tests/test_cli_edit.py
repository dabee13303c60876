"""`dgemma` end to end on the bundled model: edit / fill / undo / status / stop / doctor
through the session's daemon, auto-start, serve --detach, --no-daemon, error paths, and
SIGKILL at random points during `edit`."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path


from dgemma.engine.answers import regeneration_budget, regeneration_minimum
from dgemma.cli.doctor import _check_plan, _check_runtime_dir, _plan_bytes
from dgemma.engine.loading import BUNDLED_MODEL_DIR
from test_daemon_util import BUSY, FAST_CONFIG, Raw, daemon, dgemma, isolated_env, short_tmp  # noqa: F401  (fixture)

# Line 4 ends in a random tag, so no model (the bundled weights may be retrained) can
# regenerate it unchanged: the edits below always have a diff.
SOURCE = b"import os\r\n\r\ndef add(a, b):\r\n    return a + b  # 9f3c71e2\r\n\r\n\r\ndef mul(a, b):\r\n    return a * b\r\n"
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
    assert r.stderr.strip() == "dgemma: not applied (use --yes to apply)"
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
        proc = subprocess.Popen([sys.executable, "-m", "dgemma.cli", "edit", f"{f}:4-4", *FAST],
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
    assert set(out) == {"middle", "model", "steps", "ms", "prefix_dropped", "suffix_dropped"}
    assert isinstance(out["middle"], str) and out["steps"] >= 1 and out["prefix_dropped"] == out["suffix_dropped"] == 0
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
    # An undo store that cannot be written: a plain one-line error, and the file stays as it was.
    (tmp_path / "blocker").write_text("a file where the data folder should be")
    no_undo = dict(daemon.env, DGEMMA_DATA_DIR=str(tmp_path / "blocker" / "data"))
    line = _one_line_error(dgemma(["edit", f"{f}:4-4", "--yes", *FAST], no_undo))
    assert "cannot save the undo copy" in line and "nothing was written" in line
    assert f.read_bytes() == SOURCE


def test_edit_refuses_when_file_changed_during_generation(daemon, tmp_path):
    f = _file(tmp_path)
    with Raw(daemon.socket) as busy:
        # Keep the worker busy so the edit's request waits in the queue while we type.
        rid = busy.request("fill", {"prefix": "x = ", "max_tokens": 256, "settings": BUSY})
        assert busy.recv()["type"] == "draft"
        proc = subprocess.Popen([sys.executable, "-m", "dgemma.cli", "edit", f"{f}:4-4", "--yes", *FAST],
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
    nowhere = isolated_env(tmp_path / "none")
    assert "no daemon running" in _one_line_error(dgemma(["status"], nowhere))
    r = dgemma(["status", "--json"], nowhere)
    assert r.returncode == 1 and json.loads(r.stdout)["running"] is False
    r = dgemma(["stop"], nowhere)
    assert r.returncode == 0 and "no daemon" in r.stderr


def test_doctor(daemon, tmp_path):
    r = dgemma(["doctor"], daemon.env)
    assert "torch" in r.stdout and "daemon answers" in r.stdout and "mode 600" in r.stdout
    assert "model files in" in r.stdout and "runtime dir" in r.stdout and "the model's plan" in r.stdout
    (tmp_path / "blocker").write_text("x")
    (level, text), = _check_runtime_dir(tmp_path / "blocker" / "run")
    assert level == "fail" and "cannot be created" in text
    assert _check_runtime_dir(tmp_path / "new" / "run")[0][0] == "ok"


def test_doctor_plans_memory_with_the_configured_quantization():
    """A bf16 checkpoint with `quantization = "nvfp4"` is planned as it will be loaded: with
    free memory between the two plans, planning it as bf16 would be a false `fail`."""
    bf16, _ = _plan_bytes(BUNDLED_MODEL_DIR, None)
    nvfp4, how = _plan_bytes(BUNDLED_MODEL_DIR, "nvfp4")
    assert nvfp4 < bf16 and "nvfp4" in how
    free = (bf16 + nvfp4) // 2
    assert _check_plan(BUNDLED_MODEL_DIR, free, None)[0][0] == "fail"
    (level, text), = _check_plan(BUNDLED_MODEL_DIR, free, "nvfp4")
    assert level == "ok" and "nvfp4" in text


def test_regeneration_minimum_asks_code_for_code_and_nothing_for_blank_lines():
    assert regeneration_minimum("   \n\t\n") == 0
    one = regeneration_minimum("    return a + b\n")
    assert 1 <= one < regeneration_budget("    return a + b\n", 4096)
    assert regeneration_minimum("value = compute(item)\n" * 10) > 10 * one // 2


def test_fill_of_one_line_answers_with_code(daemon, tmp_path):
    f = _file(tmp_path)
    r = dgemma(["fill", f"{f}:4:11", "--json", "--lines", "1", *FAST], daemon.env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["middle"].strip() and "\n" not in json.loads(r.stdout)["middle"].strip()


def test_regeneration_budget():
    region = "value = compute(item)\n" * 60  # ~1,300 bytes: far over the old fixed 256 tokens
    small, big = regeneration_budget("x = 1\n", 4096), regeneration_budget(region, 4096)
    assert 64 < small < big and big >= 1.5 * len(region) / 4
    assert regeneration_budget(region, 100) == 100


def test_autostart_races_start_one_daemon_and_no_daemon_mode(tmp_path):
    """Two commands autostart one daemon. Its config file has a typo: the daemon starts on the
    defaults and `status` shows the error, while --no-daemon refuses the invalid file."""
    root = short_tmp("dga-")
    env = isolated_env(root)
    (root / "cfg" / "config.toml").write_text(FAST_CONFIG.replace("max_denoising_steps", "max_denoising_step"))
    f = _file(tmp_path)
    try:
        procs = [subprocess.Popen([sys.executable, "-m", "dgemma.cli", "fill", f"{f}:4:5", *FAST],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        # Meanwhile, the in-process path (no daemon involved): the bundled model by default.
        assert "max_denoising_step" in _one_line_error(dgemma(["fill", f"{f}:4:5", "--no-daemon", *FAST], env))
        valid = dict(env, DGEMMA_CONFIG_DIR=str(root / "valid-cfg"))
        r = dgemma(["fill", f"{f}:4:5", "--no-daemon", "--json", *FAST], valid)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["model"] == "dgemma-bundled"
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        st = json.loads(dgemma(["status", "--json"], env).stdout)
        assert st["running"] and st["served_by_method"]["fill"] == 2
        assert "max_denoising_step" in st["config_error"]
        log = (root / "run" / "daemon.log").read_text()
        assert log.count("listening on") == 1, log
        assert dgemma(["stop"], env).returncode == 0
        assert not (root / "run" / "daemon.sock").exists()
    finally:
        dgemma(["stop"], env)
        shutil.rmtree(root, ignore_errors=True)


def test_a_model_that_does_not_load_is_one_clear_error(tmp_path):
    """Autostarted by a command, the daemon stays up without a model (status explains, and
    its config watcher may heal it); started by `serve --detach`, it is stopped again."""
    root = short_tmp("dgb-")
    env = isolated_env(root)
    f = _file(tmp_path)
    try:
        line = _one_line_error(dgemma(["fill", f"{f}:4:5", "--model", "/no/such/model", *FAST], env))
        assert "has no model" in line and "/no/such/model" in line
        st = json.loads(dgemma(["status", "--json"], env).stdout)
        assert st["state"] == "error" and "/no/such/model" in st["load_error"]
        assert dgemma(["stop"], env).returncode == 0
        line = _one_line_error(dgemma(["serve", "--detach", "--model", "/no/such/model"], env))
        assert "/no/such/model" in line and "the daemon stopped" in line and "daemon.log" in line
        assert "no daemon running" in _one_line_error(dgemma(["status"], env))  # a retry starts afresh
    finally:
        dgemma(["stop"], env)
        shutil.rmtree(root, ignore_errors=True)


def test_sigkill_of_edit_at_random_points_never_leaves_a_partial_file(daemon, tmp_path):
    """`dgemma edit --yes` killed at random points, most kills aimed at the write itself (as
    soon as its temp file shows, or a few milliseconds later): the file is always the whole
    old one or a whole new one, and the only leftovers are the temp files the README documents,
    which a later edit removes once they are an hour old."""
    rng = random.Random(1)
    # Random values: no model, however well trained, regenerates lines 60-61 unchanged.
    lines = [b"v_%05d = '%08x'\r\n" % (i, rng.getrandbits(32)) for i in range(300)]
    big = b"".join(lines)
    head, tail = b"".join(lines[:59]), b"".join(lines[61:])
    f = _file(tmp_path, big)
    args = [sys.executable, "-m", "dgemma.cli", "edit", f"{f}:60-61", "--yes", *FAST]

    def temps() -> set[str]:
        return {p.name for p in tmp_path.glob(".calc.py.*.dgemma-tmp")}

    t0 = time.monotonic()
    assert subprocess.run(args, env=daemon.env, capture_output=True).returncode == 0
    full = time.monotonic() - t0
    assert f.read_bytes() != big
    for i in range(8):
        f.write_bytes(big)
        before = temps()
        proc = subprocess.Popen(args, env=daemon.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i % 4 == 3:
            time.sleep(rng.uniform(0, full))
        else:  # the write takes a few milliseconds: uniform kills would almost never land in it
            while proc.poll() is None and temps() <= before:
                time.sleep(0.0002)
            time.sleep(rng.choice([0.0, rng.uniform(0, 0.004)]))
        proc.kill()  # SIGKILL; a no-op on one that already finished (poll() reaped it)
        proc.wait()
        data = f.read_bytes()
        new = data[len(head):len(data) - len(tail)]
        assert data == big or (data.startswith(head) and data.endswith(tail)
                               and b"\n" not in new.replace(b"\r\n", b"")), data[len(head) - 20:]
    assert {p.name for p in tmp_path.iterdir()} - temps() == {"calc.py"}
    for name in temps():
        os.utime(tmp_path / name, (0, 0))
    assert subprocess.run(args, env=daemon.env, capture_output=True).returncode == 0
    assert temps() == set()
