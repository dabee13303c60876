"""The daemon's log: one place that decides what a log record may contain, and a file that
cannot grow without bound.

Clients choose much of what the daemon logs (method names, ids, parameters quoted in error
messages). `SafeFormatter` makes every record one line whatever they send: control characters
(newline, carriage return, ESC, ...) are escaped, the message is cut to MAX_MESSAGE_CHARS, and a
traceback is cut to MAX_TRACEBACK_CHARS with every one of its lines indented, so a line that
starts at column 0 is always the start of a real record. `RotatingLog` rolls `daemon.log` over
to `daemon.log.1`, `.2` past LOG_MAX_BYTES, keeping the daemon's stdout and stderr (where
Python writes what logging does not see) pointed at the current file.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

MAX_MESSAGE_CHARS = 2000
MAX_TRACEBACK_CHARS = 20000
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 2
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# C0 and C1 controls, DEL, and the characters that move text around on a terminal or in an
# editor (line/paragraph separators, bidirectional overrides and isolates).
_UNSAFE = [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPES = {c: repr(chr(c))[1:-1] for c in _UNSAFE}
_ESCAPES_BUT_NEWLINE = {c: e for c, e in _ESCAPES.items() if c != 0x0A}


def escape(text: str, keep_newlines: bool = False) -> str:
    """`text` with its control characters written as Python escapes (\\n, \\x1b, \\u202e)."""
    return text.translate(_ESCAPES_BUT_NEWLINE if keep_newlines else _ESCAPES)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class SafeFormatter(logging.Formatter):
    """Every record on one line (plus an indented traceback), escaped and of bounded size."""

    def __init__(self, fmt: str = FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception as exc:  # a bad format string must not lose the record
            message = f"{record.msg!r} % {record.args!r} ({type(exc).__name__})"
        record.message = escape(_cut(message, MAX_MESSAGE_CHARS))
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        extra = []
        if record.exc_info:
            extra.append(self.formatException(record.exc_info))
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        for block in extra:
            block = escape(_cut(block, MAX_TRACEBACK_CHARS), keep_newlines=True)
            line += "".join(f"\n    {part}" for part in block.rstrip("\n").split("\n"))
        return line


def rotate_if_big(path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> None:
    """Roll `path` over (path.1, path.2, ...) when it is over `max_bytes`, as RotatingLog does."""
    try:
        if path.stat().st_size < max_bytes:
            return
    except OSError:
        return
    for i in range(backups - 1, 0, -1):
        src = path.with_name(f"{path.name}.{i}")
        if src.exists():
            os.replace(src, path.with_name(f"{path.name}.{i + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))


class RotatingLog(logging.handlers.RotatingFileHandler):
    """daemon.log, rolled over past `max_bytes`. With `own_stdio`, file descriptors 1 and 2 follow
    the current file (the daemon's tracebacks from threads, warnings, a crash at exit)."""

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS,
                 own_stdio: bool = False) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self.own_stdio = own_stdio
        self._point_stdio()

    def _point_stdio(self) -> None:
        if self.own_stdio and self.stream is not None:
            self.stream.flush()
            for fd in (1, 2):
                os.dup2(self.stream.fileno(), fd)

    def doRollover(self) -> None:
        super().doRollover()
        self._point_stdio()


def setup(level: int, log_file: Path | None = None) -> logging.Handler:
    """Configure the root logger for the daemon: to `log_file` (rotated, stdout and stderr
    following it) or else to stderr, through SafeFormatter either way."""
    import sys

    handler: logging.Handler
    if log_file is not None:
        handler = RotatingLog(log_file, own_stdio=True)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
