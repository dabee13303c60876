"""`dgemma doctor`'s checks: GPU and driver, free VRAM against the model's plan, config, model
files, runtime folder, daemon and socket. Each check returns (ok | warn | fail, text) lines."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from dgemma.engine.devices import model_spec
from dgemma.errors import DgemmaError

Check = tuple[str, str]  # (ok | warn | fail, text)


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version as nvidia-smi reports it; None without one."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def _check_torch() -> tuple[list[Check], Any]:
    try:
        import torch
    except Exception as exc:  # deliberate: a broken install fails in many ways (a missing .so: OSError), all reported
        return [("fail", f"torch does not import ({type(exc).__name__}: {exc}); reinstall it: pip install torch")], None
    out: list[Check] = [("ok", f"torch {torch.__version__}")]
    driver = _nvidia_driver()
    if not torch.cuda.is_available():
        if driver and torch.version.cuda is None:
            out.append(("warn", f"NVIDIA driver {driver} is installed but this torch is a CPU build: "
                                "install the CUDA build of torch"))
        elif driver:
            out.append(("warn", f"NVIDIA driver {driver} is installed but torch (CUDA {torch.version.cuda}) sees no "
                                "GPU: the driver may be too old for that CUDA, or CUDA_VISIBLE_DEVICES hides the GPU"))
        else:
            out.append(("warn", "no CUDA GPU visible: the model runs on CPU (fine for the bundled model, "
                                "far too slow for 26B-A4B; install the CUDA build of torch on a GPU machine)"))
        return out, None
    idx = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    free, total = torch.cuda.mem_get_info(idx)
    out.append(("ok", f"GPU {props.name} (compute {props.major}.{props.minor}), NVIDIA driver {driver or '?'}, "
                      f"CUDA runtime {torch.version.cuda}, {fmt_bytes(free)} free of {fmt_bytes(total)}"))
    return out, free


def _plan_bytes(model_path: Path, quantization: str | None) -> tuple[int, str]:
    """Bytes the engine's memory plan needs for the model as the daemon loads it, and how
    its weights are stored then."""
    from dgemma.engine import plan as memory_plan
    from dgemma.quant.meta import load_config as load_model_config
    from dgemma.quant.reader import quant_format

    if quantization is None or quant_format(model_path) is not None:
        return memory_plan.plan_for_checkpoint(str(model_path)).total, "as stored"
    # A bf16 checkpoint quantized while it loads, as load_quantized_into(quantize=) does it:
    # experts in that format, and the layers' Linears in NF4 as well for nf4.
    dense = "nf4" if quantization == "nf4" else None
    plan = memory_plan.plan(load_model_config(str(model_path)), 0, experts_format=quantization, dense_format=dense)
    return plan.total, f"quantized to {quantization} while loading"


def _check_plan(model_path: Path | None, free: int | None, quantization: str | None = None) -> list[Check]:
    """Free VRAM against the model's memory plan (with the configured quantization)."""
    if model_path is None:
        return []
    try:
        need, how = _plan_bytes(model_path, quantization)
    except Exception as exc:  # deliberate: a check that cannot run is a warning, never a doctor that crashes
        return [("warn", f"could not compute the memory plan for {model_path}: {type(exc).__name__}: {exc}")]
    if free is None:
        return [("ok", f"the model's plan ({how}) needs {fmt_bytes(need)} (no GPU to compare with)")]
    if need > free:
        return [("fail", f"the model's plan ({how}) needs {fmt_bytes(need)} but only {fmt_bytes(free)} is free: "
                         "close other GPU programs or choose 4-bit quantization in the config")]
    return [("ok", f"the model's plan ({how}) needs {fmt_bytes(need)}; {fmt_bytes(free)} free")]


def _check_config() -> tuple[list[Check], Any]:
    """The config file's verdict, and the config (None when it is invalid)."""
    from dgemma.daemon.config import load_config

    try:
        return [], load_config()
    except DgemmaError as exc:
        return [("fail", f"config: {exc.message} (fix the file; the daemon uses the previous or default "
                         "config meanwhile)")], None


def _check_model(model: str | None, config: Any) -> tuple[list[Check], Path | None]:
    spec = model_spec(model, config.model if config else None)
    try:
        from dgemma.engine.loading import resolve_model_path
        path = resolve_model_path(spec)
    except DgemmaError as exc:
        return [("fail", exc.message)], None
    weights = sorted(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in weights)
    if not weights:
        return [("fail", f"model {path}: no .safetensors weights (copy the checkpoint there)")], path
    return [("ok", f"model files in {path}: {len(weights)} weight file(s), {fmt_bytes(size)}")], path


def _check_runtime_dir(folder: Path) -> list[Check]:
    if not folder.exists():
        base = folder.parent
        while not base.exists() and base != base.parent:
            base = base.parent
        if base.is_dir() and os.access(base, os.W_OK | os.X_OK):
            return [("ok", f"runtime dir {folder} is created on first use")]
        return [("fail", f"runtime dir {folder} cannot be created ({base} is not a folder you can write to): "
                         "set DGEMMA_RUNTIME_DIR")]
    if not folder.is_dir():
        return [("fail", f"runtime dir {folder} is not a folder: set DGEMMA_RUNTIME_DIR")]
    if not hasattr(os, "getuid"):  # on Windows the user's profile folder is private
        return []
    st = folder.stat()
    if st.st_uid != os.getuid():
        return [("fail", f"{folder} belongs to uid {st.st_uid}, not you: set DGEMMA_RUNTIME_DIR")]
    if stat.S_IMODE(st.st_mode) & 0o077:
        return [("fail", f"{folder} is mode {stat.S_IMODE(st.st_mode):o}, others can enter it: chmod 700 {folder}")]
    return [("ok", f"runtime dir {folder} is private (700)")]


def replica_counts(states: dict[str, int]) -> str:
    """Replicas by state, as Serve counts them: "2 running, 1 starting" ("" for none)."""
    return ", ".join(f"{n} {state.lower()}" for state, n in sorted(states.items()))


def remote_summary(remote: dict[str, Any]) -> str:
    """One line on the team server the daemon forwards to (remote mode): its model and replicas, or
    why it cannot be used."""
    if remote.get("error"):
        return remote["error"]
    replicas = replica_counts(remote.get("replicas") or {}) or "unknown"
    return (f"{remote['url']}: model {remote.get('model') or '-'} on {remote.get('device') or '-'}, "
            f"replicas {replicas}")


def _check_daemon() -> list[Check]:
    from dgemma.daemon.client import Client, DaemonUnavailable
    from dgemma.daemon.config import socket_path

    path = socket_path()
    out = _check_runtime_dir(path.parent)
    try:
        with Client.connect(path, timeout=5) as c:
            st_ = c.request("status")
        out.append(("ok", f"daemon answers at {path} (pid {st_['pid']}, model {st_.get('model') or '-'}, "
                          f"{st_['state']})"))
        if st_["state"] == "error":
            out.append(("fail", f"the daemon could not load its model: {st_['load_error']}"))
        elif st_.get("load_error") and not st_.get("config_error"):  # else config_error below says it
            out.append(("warn", f"the daemon could not reload its model, the previous one serves: "
                                f"{st_['load_error']}"))
        if st_.get("config_error"):
            out.append(("warn", f"daemon config: {st_['config_error']} (the daemon keeps its previous config)"))
        remote = st_.get("remote")
        if remote:
            out.append(("fail" if remote.get("error") else "ok", f"remote: {remote_summary(remote)}"))
    except DaemonUnavailable:
        out.append(("ok", f"no daemon running at {path} (one starts on demand, or: dgemma serve --detach)"))
    if path.exists() and hasattr(os, "getuid"):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            out.append(("fail", f"socket {path} is mode {mode:o}: others may connect; `dgemma stop` and restart"))
        else:
            out.append(("ok", f"socket {path} is mode {mode:o}"))
    return out


def run_checks(model: str | None = None) -> list[Check]:
    checks, free = _check_torch()
    config_checks, config = _check_config()
    model_checks, path = _check_model(model, config)
    plan_checks = _check_plan(path, free, config.quantization if config else None)
    return checks + plan_checks + config_checks + model_checks + _check_daemon()
