"""A daemon of the benchmark's own (temporary runtime, config and data folders), so that a user's
daemon and config are never touched, and its client once the model is loaded."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def private_daemon(model: str | None = None) -> Iterator[Any]:
    """A connected `daemon.client.Client` of a fresh daemon serving ``model`` (default: bundled);
    the daemon is shut down and its folders removed on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="dgb-", dir="/tmp"))  # short: a socket path has a length limit
    os.environ.update(DGEMMA_RUNTIME_DIR=str(tmp / "run"), DGEMMA_CONFIG_DIR=str(tmp / "cfg"),
                      DGEMMA_DATA_DIR=str(tmp / "data"))
    os.environ.pop("DGEMMA_SOCKET", None)
    if model:
        os.environ["DGEMMA_MODEL"] = str(Path(model).resolve())
    from dgemma.daemon.client import Client, ModelLoadFailed, ensure_daemon
    from dgemma.daemon.config import socket_path

    sock = socket_path()
    try:
        ensure_daemon(sock)
        client = Client.connect(sock)
        try:
            client.wait_loaded()
        except ModelLoadFailed as exc:
            sys.exit(f"daemon could not load the model: {exc.message}")
        yield client
        client.request("shutdown")
        client.close()
    finally:
        time.sleep(0.5)
        shutil.rmtree(tmp, ignore_errors=True)
