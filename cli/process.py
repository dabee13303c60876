"""Whether a process is alive, and waiting for one to exit: on Windows without signals."""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from dgemma.errors import DgemmaError


def wait_gone(pid: Any, timeout: float = 30) -> None:
    """Wait for a daemon told to shut down to exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.05)
    if alive(pid):
        raise DgemmaError("internal", f"the daemon (pid {pid}) did not stop within {timeout:.0f} s")


def alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    if sys.platform == "win32":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
        if not handle:
            return False
        try:
            return kernel32.WaitForSingleObject(handle, 0) == 0x102  # WAIT_TIMEOUT: still running
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (tests start the daemon themselves) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
