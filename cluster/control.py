"""`dgemma cluster up | status | down`: the Serve application on a Ray cluster.

`up` connects to the cluster at `--address` (a `ray start --head` on one of the team's machines);
without one it starts a local head on this machine, records that in the runtime folder and `down`
stops it again. Ray keeps serving after the command returns: Serve's controller is detached.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dgemma.daemon.config import Config, ensure_private_dir, runtime_dir
from dgemma.daemon.remote import create_token, token_digest
from dgemma.errors import DgemmaError

READY_TIMEOUT_S = 600.0  # a 26B model loads in minutes; the bundled one in seconds
CONNECT_TIMEOUT_S = 5.0


def _state_file() -> Path:
    return runtime_dir() / "cluster.json"


def _ray() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401  (the extra installs both)
    except ImportError:
        raise DgemmaError("invalid_request", 'team serving needs Ray Serve: pip install "dgemma[cluster]"') from None
    return ray


def _ray_cli() -> str:
    """The `ray` command of the Ray this Python imports."""
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_cli is None:
        raise DgemmaError("invalid_request", "the `ray` command is not installed beside this Python")
    return ray_cli


def _start_local_head(num_cpus: int | None) -> str:
    """`ray start --head` on this machine, on loopback, no dashboard; returns its address."""
    # On 127.0.0.1: a head `up` starts is this machine's alone (a team's spans machines: README).
    cmd = [_ray_cli(), "start", "--head", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
           "--include-dashboard=false", "--port=0"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    # Out of the caller's folder: Ray's workers must not import a checkout's folders (dgemma/__init__.py).
    out = subprocess.run(cmd, cwd=str(ensure_private_dir(runtime_dir())), capture_output=True, text=True)
    if out.returncode != 0:
        raise DgemmaError("io_error", f"`ray start --head` failed: {(out.stderr or out.stdout).strip()[-500:]}")
    address = _read_address()
    if address is None:
        raise DgemmaError("io_error", "`ray start --head` did not say where the cluster listens")
    return address


def _read_address() -> str | None:
    """The address of the Ray cluster this machine runs (what `ray start` records), if any."""
    try:
        from ray._private.services import get_ray_address_from_environment
        return get_ray_address_from_environment("auto", None)
    except Exception:  # no local cluster; Ray raises ConnectionError or its own types here
        return None


def _check_reachable(address: str) -> None:
    """ConnectionError unless something listens at a `host:port` address: ray.init would retry a
    dead one for minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", "local", ray://: Ray resolves those itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConnectionError(exc.strerror or str(exc)) from None


def _recorded() -> dict[str, Any]:
    """Where `up` last deployed ({address, started_here}), so `status` and `down` need no --address."""
    try:
        state = json.loads(_state_file().read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def connect(address: str | None, *, start: bool = False, num_cpus: int | None = None) -> Any:
    """ray.init on the cluster at `address` (default: the one `up` used, or this machine's); with
    `start` (`up`), a local head is started when none runs, and the address is recorded."""
    ray = _ray()
    recorded = _recorded()
    if address is None and recorded.get("address"):
        try:
            _check_reachable(recorded["address"])
        except ConnectionError:  # a head that is gone (a reboot): forget it, and `up` starts anew
            _state_file().unlink(missing_ok=True)
            recorded = {}
    address = address or recorded.get("address") or _read_address()
    started_here = address is not None and address == recorded.get("address") and recorded.get("started_here", False)
    if address is None:
        if not start:
            raise DgemmaError("unavailable", "no Ray cluster here; run `dgemma cluster up` (or pass --address)")
        address, started_here = _start_local_head(num_cpus), True
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's progress lines are not the CLI's output
    try:
        _check_reachable(address)
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, namespace="dgemma",
                 configure_logging=False)
    except ConnectionError as exc:
        raise DgemmaError("unavailable", f"cannot reach the Ray cluster at {address}: {exc}") from None
    if start:
        _state_file().write_text(json.dumps({"address": address, "started_here": started_here}))
    return ray


def up(config: Config, *, address: str | None, model: str | None, device: str | None,
       num_cpus: int | None = None, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """Deploy (or redeploy) the application; returns what `status` says once every replica runs."""
    from ray import serve

    from dgemma.cluster.app import APP_NAME, build

    token = create_token(config.token_path())
    ray = connect(address, start=True, num_cpus=num_cpus)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    c = config.cluster
    serve.start(http_options={"host": c.host, "port": c.port})
    serve.run(build(config, token_digest(token), model=model, device=device, gpus=gpus), name=APP_NAME,
              route_prefix="/", blocking=False)
    deadline = time.monotonic() + timeout_s
    while True:
        st = status_info(config)
        if st["status"] == "RUNNING":
            return st
        if st["status"] in ("DEPLOY_FAILED", "UNHEALTHY") or time.monotonic() > deadline:
            raise DgemmaError("model_missing", f"the application did not start ({st['status']}): "
                                               f"{st['message'] or 'see `ray logs`'}")
        time.sleep(0.5)


def status_info(config: Config) -> dict[str, Any]:
    """Serve's view of the application (call after `connect`)."""
    from ray import serve

    from dgemma.cluster.app import APP_NAME, DEPLOYMENT

    app = serve.status().applications.get(APP_NAME)
    c = config.cluster
    url = f"http://{c.host}:{c.port}"
    if app is None:
        return {"status": "NOT_DEPLOYED", "message": "", "replicas": {}, "url": url}
    dep = app.deployments.get(DEPLOYMENT)
    return {"status": str(app.status.value), "message": app.message or (dep.message if dep else ""),
            "replicas": {str(k): int(v) for k, v in (dep.replica_states if dep else {}).items()}, "url": url}


def down(address: str | None) -> bool:
    """Delete the application; stop the local head `up` started. Returns whether anything ran."""
    recorded = _recorded()
    try:
        ray = connect(address)
    except DgemmaError:
        _state_file().unlink(missing_ok=True)
        return False
    from ray import serve

    serve.shutdown()
    ray.shutdown()  # this driver first: `ray stop` would otherwise print its processes' deaths here
    if recorded.get("started_here") and address in (None, recorded.get("address")):
        subprocess.run([_ray_cli(), "stop"], capture_output=True, text=True)
    _state_file().unlink(missing_ok=True)
    return True
