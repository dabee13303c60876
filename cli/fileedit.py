"""Reading a source file for an edit, writing it back atomically, and the undo store.

The model sees text with "\\n" line endings; the file keeps its own bytes. Only the
edited region is re-encoded (in the file's dominant line ending), so everything outside
it stays byte-identical, mixed line endings and BOM included.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path

from dgemma.daemon.config import data_dir, io_error
from dgemma.errors import DgemmaError
from dgemma.daemon.logs import escape

BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Snapshot:
    """What "the file has not changed" means: same mtime, size and content hash."""
    mtime_ns: int
    size: int
    sha256: str

    @classmethod
    def of(cls, path: Path, data: bytes | None = None) -> "Snapshot":
        st = path.stat()
        if data is None:
            data = path.read_bytes()
        return cls(st.st_mtime_ns, st.st_size, hashlib.sha256(data).hexdigest())


@dataclass
class SourceFile:
    path: Path           # the real file (symlinks resolved: we replace the target)
    shown: str           # the name the user typed, for messages and diffs
    raw: bytes
    bom: bool
    lines: list[bytes]   # with their own line endings
    newline: bytes       # dominant ending, used for generated text
    snapshot: Snapshot
    mode: int

    def text(self, start: int, end: int) -> str:
        """Lines [start, end) (0-based) as "\\n"-terminated text for the model."""
        return "".join(_norm(line) for line in self.lines[start:end])

    @property
    def line_count(self) -> int:
        return len(self.lines)


def _norm(line: bytes) -> str:
    s = line.decode("utf-8")
    if s.endswith("\r\n"):
        return s[:-2] + "\n"
    return s


def shown_name(name: str | os.PathLike[str]) -> str:
    """A file name as messages and diffs show it: on one line (a newline, ESC... escaped)."""
    return escape(str(name))


def resolve(name: str | os.PathLike[str]) -> Path:
    """The real path of an existing file `name` (symlinks resolved: an edit replaces the target);
    a one-line DgemmaError for a missing file, a symlink loop or an unreadable folder."""
    shown = shown_name(name)
    try:
        return Path(name).resolve(strict=True)
    except FileNotFoundError:
        raise DgemmaError("invalid_params", f"{shown}: no such file") from None
    except RuntimeError:  # Python < 3.13 reports a symlink loop this way
        raise DgemmaError("invalid_params", f"{shown}: symlink loop (a link that leads back to itself)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DgemmaError("invalid_params", f"{shown}: symlink loop (a link that leads back to itself)") from None
        raise DgemmaError("invalid_params", f"{shown}: {exc.strerror or exc}") from None


def read_source(name: str | os.PathLike[str]) -> SourceFile:
    shown = shown_name(name)
    real = resolve(name)
    if not real.is_file():
        raise DgemmaError("invalid_params", f"{shown}: not a regular file")
    try:
        raw = real.read_bytes()
        st = real.stat()
    except OSError as exc:
        raise DgemmaError("invalid_params", f"{shown}: cannot read ({exc.strerror or exc})") from None
    bom = raw.startswith(BOM)
    body = raw[len(BOM):] if bom else raw
    if b"\x00" in body[:65536]:
        raise DgemmaError("invalid_params", f"{shown}: binary file (contains NUL bytes); dgemma edits text only")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DgemmaError("invalid_params",
                          f"{shown}: not UTF-8 text (bad byte at offset {exc.start}); dgemma edits UTF-8 only") from None
    lines = body.splitlines(keepends=True)
    # splitlines also splits on \x0b, \x0c, \x1c.. and U+2028 in str, but on bytes only
    # on \n, \r\n and \r, which is what editors and compilers count as lines too.
    crlf = sum(1 for line in lines if line.endswith(b"\r\n"))
    lf = sum(1 for line in lines if line.endswith(b"\n")) - crlf
    newline = b"\r\n" if crlf > lf else b"\n"
    return SourceFile(real, shown, raw, bom, lines, newline,
                      Snapshot(st.st_mtime_ns, st.st_size, hashlib.sha256(raw).hexdigest()),
                      st.st_mode & 0o7777)


def parse_range(spec: str) -> tuple[str, int, int]:
    """FILE:START-END (1-based, inclusive; FILE:N means one line)."""
    # DOTALL: a file name may hold a newline (the shell passes it on as it is).
    m = re.fullmatch(r"(.+):(\d+)(?:-(\d+))?", spec, re.DOTALL)
    if not m:
        raise DgemmaError("invalid_params", f"expected FILE:START-END (1-based lines), got {spec!r:.200}")
    start = int(m.group(2))
    end = int(m.group(3)) if m.group(3) else start
    if start < 1 or end < start:
        raise DgemmaError("invalid_params", f"bad line range {start}-{end}: need 1 <= START <= END")
    return m.group(1), start, end


def parse_position(spec: str) -> tuple[str, int, int]:
    """FILE:LINE:COL (1-based, as compilers print them; COL counts characters)."""
    m = re.fullmatch(r"(.+):(\d+):(\d+)", spec, re.DOTALL)
    if not m:
        raise DgemmaError("invalid_params", f"expected FILE:LINE:COL (1-based), got {spec!r:.200}")
    line, col = int(m.group(2)), int(m.group(3))
    if line < 1 or col < 1:
        raise DgemmaError("invalid_params", f"bad position {line}:{col}: lines and columns start at 1")
    return m.group(1), line, col


def check_range(src: SourceFile, start: int, end: int) -> None:
    n = src.line_count
    if end > n:
        raise DgemmaError("invalid_params", f"{src.shown}: line range {start}-{end} is past the end "
                                            f"(the file has {n} line{'s' if n != 1 else ''})")


def split_at(src: SourceFile, line: int, col: int) -> tuple[str, str]:
    """prefix/suffix text around a 1-based position."""
    n = src.line_count
    if line > max(n, 1) or (n == 0 and col > 1):
        raise DgemmaError("invalid_params", f"{src.shown}: line {line} is past the end (the file has {n} lines)")
    if n == 0:
        return "", ""
    current = _norm(src.lines[line - 1])
    content = current[:-1] if current.endswith("\n") else current
    if col > len(content) + 1:
        raise DgemmaError("invalid_params",
                          f"{src.shown}:{line}: column {col} is past the end of the line ({len(content)} characters)")
    prefix = src.text(0, line - 1) + current[:col - 1]
    suffix = current[col - 1:] + src.text(line, n)
    return prefix, suffix


def replace_lines(src: SourceFile, start: int, end: int, new_text: str) -> bytes:
    """The file's bytes with lines start..end (1-based, inclusive) replaced by `new_text`."""
    new = new_text.replace("\r\n", "\n").encode("utf-8")
    if src.newline != b"\n":
        new = new.replace(b"\n", src.newline)
    out = (BOM if src.bom else b"") + b"".join(src.lines[:start - 1]) + new + b"".join(src.lines[end:])
    return out


def apply_line_edits(src: SourceFile, edits: list[dict]) -> bytes:
    """The file's bytes with the daemon's line edits ({start_line, end_line, text}: 0-based lines of
    the text as sent, end exclusive, sorted) applied; the lines between them keep their own bytes."""
    out, at = [BOM if src.bom else b""], 0
    for e in edits:
        start, end = int(e["start_line"]), int(e["end_line"])
        if not at <= start <= end <= src.line_count:
            raise DgemmaError("internal", f"a line edit {start}-{end} outside {src.shown}'s {src.line_count} lines")
        new = str(e["text"]).replace("\r\n", "\n").encode("utf-8")
        out += src.lines[at:start] + [new.replace(b"\n", src.newline) if src.newline != b"\n" else new]
        at = end
    return b"".join(out + src.lines[at:])


def text_before(src: SourceFile) -> str:
    """The file as its last commit has it (`git show HEAD:FILE`), as model text."""
    def git(*args: str) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(["git", "-C", str(src.path.parent), *args], capture_output=True, timeout=30)
        except FileNotFoundError:
            raise DgemmaError("invalid_params", "git is not installed: give the old version with --after OLDFILE") from None
    top = git("rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise DgemmaError("invalid_params", f"{src.shown} is not in a git repository: give the old version with "
                                            "--after OLDFILE")
    rel = src.path.relative_to(Path(top.stdout.decode().strip()).resolve()).as_posix()
    shown = git("show", f"HEAD:{rel}")
    if shown.returncode != 0:
        raise DgemmaError("invalid_params", f"{src.shown} is not in the last commit: give the old version with "
                                            "--after OLDFILE")
    data = shown.stdout[len(BOM):] if shown.stdout.startswith(BOM) else shown.stdout
    return data.decode("utf-8", "replace").replace("\r\n", "\n")


# ---- atomic write ---------------------------------------------------------------------

def check_writable(path: Path, shown: str | None = None) -> None:
    """Refuse (io_error) to replace a file the user could not open for writing: a read-only
    file stays read-only even though the rename would get past its mode. Root can open any file,
    so for root a file with no write bit at all counts as read-only (as editors treat it)."""
    shown = shown or shown_name(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return  # a new file: nothing to protect
    except OSError as exc:
        raise io_error(exc, f"cannot write {shown}") from None
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        writable = bool(st.st_mode & 0o222)
    else:
        writable = os.access(path, os.W_OK)
    if not writable:
        raise DgemmaError("io_error", f"{shown} is read-only (mode {stat.S_IMODE(st.st_mode):o}); dgemma does not "
                                      "replace a file you could not open for writing: make it writable first")


def atomic_write(path: Path, data: bytes, expected: Snapshot | None, mode: int | None = None) -> Snapshot:
    """Replace `path` by `data` so that a reader (or a crash, or SIGKILL) sees either the
    old file or the new one, never a mix: temp file in the same folder, fsync, rename,
    fsync of the folder. Refuses with `file_changed` when the file on disk no longer
    matches `expected`; the check runs after the temp file is ready, just before the
    rename, to keep the window as small as we can without a lock editors would honour.
    The new file keeps the old one's owner and group (as root, or when the user may set that
    group), or nothing is written; a read-only file is refused (check_writable).
    An OSError (disk full, no permission) becomes a one-line `io_error`; the file is untouched."""
    check_writable(path)
    try:
        return _atomic_write(path, data, expected, mode)
    except OSError as exc:
        raise io_error(exc, f"cannot write {shown_name(path)}") from None


def _keep_owner(fd: int, path: Path) -> None:
    """Give the temp file `path`'s owner and group; refuse when the user may not."""
    if not hasattr(os, "fchown"):
        return
    try:
        old = path.stat()
    except FileNotFoundError:
        return  # checked (file_changed) before the rename
    new = os.fstat(fd)
    if (old.st_uid, old.st_gid) == (new.st_uid, new.st_gid):
        return
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        raise DgemmaError("io_error", f"{shown_name(path)} belongs to uid {old.st_uid}, gid {old.st_gid}: the new version "
                                      "would belong to you instead (an edit replaces the file), so nothing was "
                                      "written") from None


def _atomic_write(path: Path, data: bytes, expected: Snapshot | None, mode: int | None) -> Snapshot:
    folder = path.parent
    _sweep_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".dgemma-tmp", dir=folder)
    try:
        try:
            _keep_owner(fd, path)  # before the mode: a chown may clear set-id bits
            if mode is not None:
                if hasattr(os, "fchmod"):
                    os.fchmod(fd, mode)
                else:  # Windows before Python 3.13
                    os.chmod(tmp, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if expected is not None:
            try:
                now = Snapshot.of(path)
            except FileNotFoundError:
                raise DgemmaError("file_changed", f"{shown_name(path)} was removed since dgemma read it; "
                                                  "nothing written") from None
            if now != expected:
                raise DgemmaError("file_changed", f"{shown_name(path)} changed on disk since dgemma read it; "
                                                  "nothing written")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)
    return Snapshot.of(path, data)


STALE_TEMP_SECONDS = 3600


def _sweep_stale_temps(path: Path) -> None:
    """Remove temp files a killed dgemma left next to `path`. Only old ones: a young one
    may belong to a write in progress."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.dgemma-tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
        except OSError:
            pass


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(dfd)


# ---- undo store -----------------------------------------------------------------------

KEEP_PER_FILE = 20


def _write_durably(path: Path, data: bytes) -> None:
    """`data` into `path` all or nothing: a hidden temp file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def apply_edit(src: SourceFile, new: bytes, store: "UndoStore | None" = None) -> None:
    """Write `new` over `src` with atomic_write, its undo entry saved first (so a crash right after
    the rename still leaves a way back) and discarded when nothing was written. A kill between
    the two leaves an entry for an edit that never happened: `undo` recognises and skips it."""
    check_writable(src.path, src.shown)
    store = store or UndoStore()
    entry = store.save(src.path, src.raw, src.mode, hashlib.sha256(new).hexdigest())
    try:
        atomic_write(src.path, new, src.snapshot, mode=src.mode)
    except BaseException:
        store.discard(entry)
        raise


class UndoStore:
    """Previous versions of files dgemma wrote, newest last, per real path.

    An entry is `STAMP.bak` (the previous bytes) and `STAMP.json` (path, mode, the hashes of the
    previous and the written content), each written to a temp file and renamed, the .json last:
    an entry is complete or absent. `undo` takes the newest entry that matches the file; an entry
    whose edit never reached the file (the file still holds its previous content) and a damaged
    one are set aside, so neither can hide the entries before them."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or data_dir() / "undo"

    def _folder(self, path: Path) -> Path:
        key = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32]
        return self.root / key

    def save(self, path: Path, previous: bytes, mode: int, written_sha256: str) -> Path:
        """Remember `previous` before `path` (a real path) is replaced by content hashing to
        `written_sha256`. Call before the write; `discard` the returned entry if the write is
        refused. An OSError becomes a one-line `io_error` (and the caller then writes nothing)."""
        folder = self._folder(path)
        stamp = f"{time.time_ns():020d}"
        entry = folder / f"{stamp}.json"
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_durably(entry.with_suffix(".bak"), previous)
            meta = {"path": os.path.realpath(path), "mode": mode, "written_sha256": written_sha256,
                    "previous_sha256": hashlib.sha256(previous).hexdigest(), "time": time.time()}
            _write_durably(entry, json.dumps(meta).encode())  # last: it makes the entry
            _fsync_dir(folder)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.discard(entry)
            raise io_error(exc, f"cannot save the undo copy of {shown_name(path)} in {self.root}",
                           "nothing was written") from None
        entries = sorted(folder.glob("*.json"))
        for old in entries[:-KEEP_PER_FILE]:
            self.discard(old)
        self._sweep(folder)
        return entry

    @staticmethod
    def _sweep(folder: Path) -> None:
        """Remove what a killed save left behind: temp files, and copies whose entry was never
        made. Only old ones: a young one may belong to a save in progress."""
        cutoff = time.time() - STALE_TEMP_SECONDS
        for item in folder.iterdir():
            stray = item.name.endswith(".tmp") or (item.suffix == ".bak" and not item.with_suffix(".json").exists())
            try:
                if stray and item.stat().st_mtime < cutoff:
                    item.unlink()
            except OSError:
                pass

    def discard(self, entry: Path) -> None:
        entry.unlink(missing_ok=True)
        entry.with_suffix(".bak").unlink(missing_ok=True)

    def _load(self, entry: Path) -> tuple[dict, bytes] | None:
        """An entry's meta and previous bytes; None when it is damaged (unreadable, cut short)."""
        try:
            meta = json.loads(entry.read_text(encoding="utf-8"))
            previous = entry.with_suffix(".bak").read_bytes()
        except (OSError, ValueError):
            return None
        if not (isinstance(meta, dict) and isinstance(meta.get("written_sha256"), str)):
            return None
        if meta.get("previous_sha256", hashlib.sha256(previous).hexdigest()) != hashlib.sha256(previous).hexdigest():
            return None
        return meta, previous

    def undo(self, name: str | os.PathLike[str]) -> Path:
        """Put back the version before dgemma's last write; refuses if the file was
        changed since (the user's later work would be lost)."""
        shown = shown_name(name)
        path = resolve(name)
        folder = self._folder(path)
        entries = sorted(folder.glob("*.json"), reverse=True) if folder.is_dir() else []
        current = Snapshot.of(path)
        for entry in entries:
            loaded = self._load(entry)
            if loaded is None:  # damaged (a crash of an older dgemma while writing it): it hides nothing
                self.discard(entry)
                continue
            meta, previous = loaded
            if current.sha256 == meta["written_sha256"]:
                # Marked first: an undo killed after its rename is then recognised as done.
                _write_durably(entry, json.dumps({**meta, "undoing": True}).encode())
                atomic_write(path, previous, current, mode=meta.get("mode"))
                self.discard(entry)
                return path
            if current.sha256 == hashlib.sha256(previous).hexdigest():
                self.discard(entry)
                if meta.get("undoing"):
                    return path  # an undo that was killed after it put the file back: done now
                continue  # an edit killed before its rename: it never happened
            raise DgemmaError("file_changed", f"{shown} changed since dgemma edited it; not undoing "
                                              "(your later changes would be lost)")
        raise DgemmaError("invalid_params", f"{shown}: nothing to undo (dgemma has not edited this file)")
