"""Issue 22, the files' side: undo survives an interrupted edit and a damaged entry, edits keep
owner and group and respect read-only files, symlink loops and oversized files are one-line
errors, names with a newline work, and dgemma never changes the mode of a folder it did not
make. Real files, real processes (kill -9 included), the session's daemon where a model runs."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dgemma.errors import DgemmaError
from dgemma.cli.fileedit import UndoStore, apply_edit, atomic_write, read_source, replace_lines
from test_daemon_util import daemon, dgemma, isolated_env, short_tmp  # noqa: F401  (fixture)

V0 = b"import os\n\ndef add(a, b):\n    return a + b  # 5be1c0de\n"
V1 = V0.replace(b"a + b", b"b + a")
V2 = V0.replace(b"a + b", b"sum((a, b))")
FAST = ["--steps", "2", "--max-tokens", "8", "--seed", "3"]

# Runs apply_edit (what `dgemma edit --yes` calls) in a process of its own that SIGKILLs itself
# just before its Nth filesystem step: an audit event that opens a file or folder (for reading
# or writing), renames, removes, chmods, chowns or makes a folder. argv: file, new bytes (hex),
# N (0: never). Prints the steps it took, one a line.
KILLED_EDIT = r"""
import os, signal, sys
from dgemma.cli.fileedit import apply_edit, read_source
path, new, kill_at = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
steps = []
def hook(event, args):
    if event not in ("open", "os.rename", "os.remove", "os.chmod", "os.chown", "os.mkdir", "os.rmdir"):
        return
    steps.append(f"{event} {args[0]} {args[1] if event == 'os.rename' else ''}")
    if len(steps) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
src = read_source(path)
sys.addaudithook(hook)
apply_edit(src, new)
print("\n".join(steps))
"""


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, DGEMMA_DATA_DIR=str(tmp_path / "data"), DGEMMA_RUNTIME_DIR=str(tmp_path / "run"),
               DGEMMA_CONFIG_DIR=str(tmp_path / "cfg"))
    env.pop("DGEMMA_SOCKET", None)
    return env


def _killed_edit(f: Path, new: bytes, kill_at: int, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", KILLED_EDIT, str(f), new.hex(), str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=60)


def _one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dgemma: ") and "Traceback" not in r.stderr, r.stderr
    assert "internal error" not in r.stderr, r.stderr
    return lines[0]


def test_an_edit_killed_before_its_rename_does_not_block_undo(tmp_path):
    """Item 4: kill -9 between saving the undo copy and the rename leaves an entry for an edit
    that never happened; `dgemma undo` skips it and undoes the earlier, real edit."""
    env = _env(tmp_path)
    f = tmp_path / "calc.py"
    f.write_bytes(V0)
    apply_edit(read_source(f), V1, UndoStore(tmp_path / "data" / "undo"))
    assert f.read_bytes() == V1
    # The edit's steps, in order: kill it just before the rename onto the file.
    steps = _killed_edit(f, V2, 0, env).stdout.splitlines()
    rename = next(i for i, step in enumerate(steps, 1) if step.startswith("os.rename") and step.endswith(str(f)))
    dgemma(["undo", str(f)], env)  # back to V1 ...
    assert f.read_bytes() == V1
    r = _killed_edit(f, V2, rename, env)  # ... and killed just before the rename
    assert r.returncode == -9 and f.read_bytes() == V1
    r = dgemma(["undo", str(f)], env)
    assert r.returncode == 0, r.stderr
    assert f.read_bytes() == V0
    assert "nothing to undo" in _one_line_error(dgemma(["undo", str(f)], env))


def test_a_damaged_undo_entry_hides_nothing(tmp_path):
    """Item 4: an entry whose JSON was cut short (an older dgemma killed while writing it) or
    whose copy is missing is set aside; the real edits before it stay undoable."""
    env = _env(tmp_path)
    store = UndoStore(tmp_path / "data" / "undo")
    f = tmp_path / "calc.py"
    f.write_bytes(V0)
    apply_edit(read_source(f), V1, store)
    folder = next((tmp_path / "data" / "undo").iterdir())
    (folder / "99999999999999999999.json").write_text('{"path": "x", "mode": 420, "writ')
    (folder / "99999999999999999998.json").write_text(json.dumps({"written_sha256": "0" * 64}))  # no .bak
    r = dgemma(["undo", str(f)], env)
    assert r.returncode == 0, r.stderr
    assert f.read_bytes() == V0


def test_undo_killed_after_its_rename_is_not_repeated(tmp_path):
    """An undo killed after putting the file back (before dropping its entry) counts as done:
    running undo again does not also undo the edit before it."""
    env = _env(tmp_path)
    store = UndoStore(tmp_path / "data" / "undo")
    f = tmp_path / "calc.py"
    f.write_bytes(V0)
    apply_edit(read_source(f), V1, store)
    apply_edit(read_source(f), V2, store)
    newest = sorted(next((tmp_path / "data" / "undo").iterdir()).glob("*.json"))[-1]
    meta = json.loads(newest.read_text())
    # The state such a kill leaves: entry marked, file put back, entry still there.
    newest.write_text(json.dumps({**meta, "undoing": True}))
    atomic_write(f, V1, None)
    r = dgemma(["undo", str(f)], env)
    assert r.returncode == 0, r.stderr
    assert f.read_bytes() == V1
    assert dgemma(["undo", str(f)], env).returncode == 0 and f.read_bytes() == V0


def _as_user(uid: int, fn, *args) -> tuple[int, str]:
    """Run fn(*args) in a forked child that dropped root for `uid`; (exit code, message)."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()

    def run() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        try:
            fn(*args)
            child.send((0, ""))
        except DgemmaError as exc:
            child.send((1, f"{exc.code}: {exc.message}"))
        except BaseException as exc:  # reported, not raised: the parent asserts on it
            child.send((2, f"{type(exc).__name__}: {exc}"))

    p = ctx.Process(target=run)
    p.start()
    p.join(60)
    return parent.recv() if parent.poll(5) else (3, f"exit {p.exitcode}")


def _edit_in_place(path: str, new: bytes) -> None:
    src = read_source(path)
    atomic_write(src.path, new, src.snapshot, mode=src.mode)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to own files as others")
def test_edits_keep_owner_and_group_and_refuse_read_only_files(daemon, tmp_path):
    """Item 5: run as root, an edit of another user's 0640 file keeps that user as owner and
    group; a 0444 file is refused (by root and by its own unprivileged owner); a user who could
    write a file but not give the new version its owner is refused too."""
    base = short_tmp("dgown-")  # pytest's tmp_path sits in a 0700 folder of root's: others cannot reach it
    base.chmod(0o755)
    try:
        _ownership_cases(daemon, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _ownership_cases(daemon, tmp_path: Path) -> None:
    f = tmp_path / "theirs.py"
    f.write_bytes(V0)
    os.chown(f, 4242, 4343)
    f.chmod(0o640)
    r = dgemma(["edit", f"{f}:4-4", "--yes", *FAST], daemon.env)
    assert r.returncode == 0, r.stderr
    st = f.stat()
    assert f.read_bytes() != V0 and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4242, 4343, 0o640)
    # Read-only: refused before the model runs, as root ...
    ro = tmp_path / "ro.py"
    ro.write_bytes(V0)
    ro.chmod(0o444)
    line = _one_line_error(dgemma(["edit", f"{ro}:4-4", "--yes", *FAST], daemon.env))
    assert "read-only" in line and ro.read_bytes() == V0
    with pytest.raises(DgemmaError, match="read-only"):
        atomic_write(ro, V1, None)
    # ... and by its unprivileged owner.
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 4242, 4242)
    mine = home / "mine.py"
    mine.write_bytes(V0)
    os.chown(mine, 4242, 4242)
    mine.chmod(0o444)
    code, message = _as_user(4242, _edit_in_place, str(mine), V1)
    assert code == 1 and "read-only" in message, message
    assert mine.read_bytes() == V0 and stat.S_IMODE(mine.stat().st_mode) == 0o444
    # A file others may write, in a folder of the user's: the new version would change owner.
    shared = home / "shared.py"
    shared.write_bytes(V0)
    os.chown(shared, 4343, 4343)
    shared.chmod(0o666)
    code, message = _as_user(4242, _edit_in_place, str(shared), V1)
    assert code == 1 and "uid 4343" in message and "nothing was written" in message, message
    assert shared.read_bytes() == V0 and shared.stat().st_uid == 4343
    # Their own writable file: fine.
    mine.chmod(0o644)
    assert _as_user(4242, _edit_in_place, str(mine), V1) == (0, "")
    assert mine.read_bytes() == V1 and mine.stat().st_uid == 4242


def test_read_only_file_refused_for_its_owner(tmp_path):
    """Item 5 without root: the owner of a 0444 file gets a clear refusal, the file is unchanged."""
    f = tmp_path / "ro.py"
    f.write_bytes(V0)
    f.chmod(0o444)
    with pytest.raises(DgemmaError) as exc:
        apply_edit(read_source(f), V1, UndoStore(tmp_path / "undo"))
    assert exc.value.code == "io_error" and "read-only" in exc.value.message
    assert f.read_bytes() == V0 and not (tmp_path / "undo").exists()


def test_symlink_loop_is_a_one_line_error(daemon, tmp_path):
    """Item 6."""
    loop = tmp_path / "loop.py"
    loop.symlink_to(tmp_path / "other.py")
    (tmp_path / "other.py").symlink_to(loop)
    for args in (["edit", f"{loop}:1-1", "--yes"], ["fill", f"{loop}:1:1"], ["undo", str(loop)]):
        assert "symlink loop" in _one_line_error(dgemma(args, daemon.env)), args


def test_too_large_file_is_refused_before_sending(daemon, tmp_path):
    """Item 7: a file over the daemon's frame limit is refused by the client with a clear
    message (no broken pipe), and the daemon is unharmed."""
    big = tmp_path / "big.py"
    line = b"value = 'abcdefghijklmnopqrstuvwxyz0123456789'\n"
    big.write_bytes(line * (12_000_000 // len(line)))
    before = big.read_bytes()
    for args in (["fill", f"{big}:2:1"], ["edit", f"{big}:2-2", "--yes"]):
        msg = _one_line_error(dgemma(args, daemon.env))
        assert "too large" in msg and "big.py" in msg and "Broken pipe" not in msg, msg
    assert big.read_bytes() == before
    r = dgemma(["status", "--json"], daemon.env)
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "ready"


def test_a_file_name_with_a_newline_can_be_addressed(daemon, tmp_path):
    """Item 7: FILE:LINE:COL and FILE:START-END accept any name; messages and the diff header
    show it escaped, on one line."""
    f = tmp_path / "odd\nname.py"
    f.write_bytes(V0)
    r = dgemma(["fill", f"{f}:4:12", *FAST], daemon.env)
    assert r.returncode == 0, r.stderr
    r = dgemma(["edit", f"{f}:4-4", "--dry-run", *FAST], daemon.env)
    assert r.returncode == 0, r.stderr
    head = r.stdout.splitlines()[:2]
    assert head[0].startswith("--- a/") and head[0].endswith("odd\\nname.py") and head[1].startswith("+++ b/")
    r = dgemma(["edit", f"{f}:4-4", "--yes", *FAST], daemon.env)
    assert r.returncode == 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert dgemma(["undo", str(f)], daemon.env).returncode == 0 and f.read_bytes() == V0


def test_dgemma_never_chmods_a_folder_it_did_not_make(tmp_path):
    """Item 8: a runtime folder (or --socket folder) that exists and is not private is refused
    with the reason and left as it is; a folder dgemma makes is 0700."""
    shared = short_tmp("dgshared-")
    try:
        shared.chmod(0o1777)
        env = isolated_env(tmp_path)
        env["DGEMMA_RUNTIME_DIR"] = str(shared)
        f = tmp_path / "a.py"
        f.write_bytes(V0)
        line = _one_line_error(dgemma(["fill", f"{f}:4:1"], env))
        assert str(shared) in line and "1777" in line and "DGEMMA_RUNTIME_DIR" in line
        line = _one_line_error(dgemma(["serve", "--detach"], env))
        assert "1777" in line
        env = isolated_env(tmp_path)
        line = _one_line_error(dgemma(["serve", "--detach", "--socket", str(shared / "x.sock")], env))
        assert "1777" in line
        assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
        assert not any(shared.iterdir())
    finally:
        try:  # should the guard fail, the daemon it let start must not outlive the test
            os.kill(json.loads((shared / "daemon.pid").read_text())["pid"], signal.SIGTERM)
        except (OSError, ValueError, KeyError):
            pass
        shutil.rmtree(shared, ignore_errors=True)
    from dgemma.daemon.config import ensure_private_dir

    made = ensure_private_dir(tmp_path / "fresh" / "run")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert ensure_private_dir(made) == made  # an existing private folder is fine


def test_undo_entries_are_complete_or_absent(tmp_path):
    """Each undo entry is written to a temp file and renamed; nothing else is left behind."""
    store = UndoStore(tmp_path / "undo")
    f = tmp_path / "a.py"
    f.write_bytes(V0)
    apply_edit(read_source(f), V1, store)
    folder = next((tmp_path / "undo").iterdir())
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and names[0].endswith(".bak") and names[1].endswith(".json"), names
    meta = json.loads((folder / names[1]).read_text())
    assert meta["previous_sha256"] == hashlib.sha256(V0).hexdigest()
    assert meta["written_sha256"] == hashlib.sha256(V1).hexdigest()
    assert replace_lines(read_source(f), 1, 1, "import sys\n").startswith(b"import sys\n")
