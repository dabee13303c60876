"""Reading, splitting and atomically rewriting source files, and the undo store."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from dgemma.daemon import protocol as proto
from dgemma.errors import DgemmaError
from dgemma.cli.fileedit import (
    Snapshot, UndoStore, atomic_write, check_range, parse_position, parse_range, read_source, replace_lines,
    split_at,
)


def test_frame_roundtrip_and_limits():
    msg = {"id": 7, "method": "fill", "params": {"prefix": "é" * 10, "n": 2}}
    data = proto.encode(msg)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert proto.decode_body(data[4:]) == msg
    with pytest.raises(DgemmaError) as exc:
        proto.decode_body(b"\x91\x01")  # a list
    assert exc.value.code == "invalid_request"
    with pytest.raises(DgemmaError):
        proto.check_request({"id": True, "method": "ping"})
    assert proto.check_request({"id": "a", "method": "ping", "params": None}) == ("a", "ping", {})
    assert proto.param({"x": 1}, "x", float) == 1.0
    with pytest.raises(DgemmaError):
        proto.param({"x": 1}, "x", int, max=0)


def test_parse_targets():
    assert parse_range("a.py:3-5") == ("a.py", 3, 5)
    assert parse_range("C:/x.py:4") == ("C:/x.py", 4, 4)
    assert parse_position("dir/a:b.py:2:7") == ("dir/a:b.py", 2, 7)
    for bad in ("a.py", "a.py:0-2", "a.py:5-3", "a.py:x-y"):
        with pytest.raises(DgemmaError):
            parse_range(bad)
    with pytest.raises(DgemmaError):
        parse_position("a.py:1:0")


def test_crlf_bom_and_mixed_endings_survive_outside_the_region(tmp_path):
    f = tmp_path / "w.py"
    raw = b"\xef\xbb\xbfa = 1\r\nb = 2\r\nc = 3\nd = 4\r\n"
    f.write_bytes(raw)
    src = read_source(f)
    assert src.bom and src.newline == b"\r\n" and src.line_count == 4
    assert src.text(0, 2) == "a = 1\nb = 2\n"
    out = replace_lines(src, 2, 2, "B = 2\nBB = 3\n")
    assert out == b"\xef\xbb\xbfa = 1\r\nB = 2\r\nBB = 3\r\nc = 3\nd = 4\r\n"
    check_range(src, 4, 4)
    with pytest.raises(DgemmaError):
        check_range(src, 4, 5)


def test_split_at_position(tmp_path):
    f = tmp_path / "p.py"
    f.write_bytes(b"def f(x):\r\n    return x\r\n")
    prefix, suffix = split_at(read_source(f), 2, 5)
    assert prefix == "def f(x):\n    " and suffix == "return x\n"
    with pytest.raises(DgemmaError):
        split_at(read_source(f), 2, 40)
    with pytest.raises(DgemmaError):
        split_at(read_source(f), 9, 1)


def test_refuses_binary_missing_and_non_utf8(tmp_path):
    (tmp_path / "bin").write_bytes(b"\x7fELF\x00\x01")
    (tmp_path / "latin").write_bytes("café".encode("latin-1"))
    for name, words in (("bin", "binary"), ("latin", "UTF-8"), ("nope", "no such file")):
        with pytest.raises(DgemmaError) as exc:
            read_source(tmp_path / name)
        assert words in exc.value.message


def test_atomic_write_keeps_mode_and_refuses_changed_file(tmp_path):
    f = tmp_path / "m.sh"
    f.write_bytes(b"echo 1\n")
    os.chmod(f, 0o751)
    snap = Snapshot.of(f)
    atomic_write(f, b"echo 2\n", snap, mode=0o751)
    assert f.read_bytes() == b"echo 2\n" and (f.stat().st_mode & 0o7777) == 0o751
    f.write_bytes(b"echo 3\n")  # someone else wrote meanwhile
    with pytest.raises(DgemmaError) as exc:
        atomic_write(f, b"echo 4\n", snap)
    assert exc.value.code == "file_changed"
    assert f.read_bytes() == b"echo 3\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.sh"]  # no temp file left behind


def test_undo_store(tmp_path):
    f = tmp_path / "u.py"
    f.write_bytes(b"one\n")
    store = UndoStore(tmp_path / "undo")
    import hashlib
    store.save(f, b"one\n", 0o644, hashlib.sha256(b"two\n").hexdigest())
    atomic_write(f, b"two\n", None)
    store.undo(f)
    assert f.read_bytes() == b"one\n"
    with pytest.raises(DgemmaError):
        store.undo(f)  # nothing left
    store.save(f, b"one\n", 0o644, hashlib.sha256(b"two\n").hexdigest())
    f.write_bytes(b"user typed more\n")
    with pytest.raises(DgemmaError) as exc:
        store.undo(f)
    assert exc.value.code == "file_changed" and f.read_bytes() == b"user typed more\n"


WRITER = r"""
import sys
from pathlib import Path
from dgemma.cli.fileedit import atomic_write
path, size = Path(sys.argv[1]), int(sys.argv[2])
print("go", flush=True)
i = 0
while True:
    i += 1
    atomic_write(path, bytes([65 + i % 26]) * size, None)
"""


def test_sigkill_during_atomic_writes_never_leaves_a_partial_file(tmp_path):
    f = tmp_path / "big.txt"
    size = 8 << 20
    f.write_bytes(b"A" * size)
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(f), str(size)], stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"go\n"
        time.sleep(rng.uniform(0.01, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        data = f.read_bytes()
        assert len(data) == size and data == data[:1] * size
    # Temp files of killed writers are swept by a later write once they are old.
    for tmp in tmp_path.glob(".big.txt.*.dgemma-tmp"):
        os.utime(tmp, (0, 0))
    atomic_write(f, b"done", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]


def test_filesystem_errors_are_one_line_errors_and_lose_nothing(tmp_path):
    from dgemma.daemon.config import ensure_private_dir

    blocker = tmp_path / "blocker"  # a file where a folder should be: fails even for root
    blocker.write_text("x")
    src = tmp_path / "a.py"
    src.write_bytes(b"one\n")
    with pytest.raises(DgemmaError) as exc:
        ensure_private_dir(blocker / "run")
    assert exc.value.code == "io_error" and str(blocker / "run") in exc.value.message
    with pytest.raises(DgemmaError) as exc:
        UndoStore(blocker / "undo").save(src, b"one\n", 0o644, "0" * 64)
    assert exc.value.code == "io_error" and "undo copy" in exc.value.message
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DgemmaError) as exc:
        atomic_write(folder, b"two\n", None)  # the rename onto a folder fails
    assert exc.value.code == "io_error" and str(folder) in exc.value.message and "\n" not in exc.value.message
    assert src.read_bytes() == b"one\n" and blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.py", "blocker", "folder"]  # no temp file left
