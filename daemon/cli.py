"""The `dgemma` command line.

Every user-facing failure is one line `dgemma: <message>` on stderr and exit code 1,
with nothing written; tracebacks only with DGEMMA_DEBUG=1. torch is imported only by the
commands that run a model in this process (serve, --no-daemon, doctor), so the usual
path through the daemon starts fast.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from .errors import DgemmaError

app = typer.Typer(name="dgemma", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fill-in-the-middle and inline edits of code with DiffusionGemma.")

ModelOpt = typer.Option(None, "--model", help="Checkpoint directory or offline hub id (default: config, "
                                              "$DGEMMA_MODEL, then the bundled model).")
NoDaemonOpt = typer.Option(False, "--no-daemon", help="Run the model in this process; start no daemon.")
StepsOpt = typer.Option(None, "--steps", min=1, help="Denoising steps per canvas (sampler max_denoising_steps).")
SeedOpt = typer.Option(None, "--seed", help="Sampling seed, for reproducible output.")


def _say(message: str) -> None:
    print(message, file=sys.stderr)


# ---- running a request: through the daemon or in this process ----------------------------

def _run_request(method: str, params: dict[str, Any], *, no_daemon: bool, model: str | None,
                 device: str | None = None) -> dict[str, Any]:
    if no_daemon:
        return _run_in_process(method, params, model=model, device=device)
    from .client import Client

    progress = sys.stderr.isatty()
    params = dict(params, stream=progress)
    if model:
        params["model"] = model

    def on_draft(d: dict[str, Any]) -> None:
        print(f"\rdenoising: step {d.get('step')}, canvas {d.get('canvas')}   ", end="", file=sys.stderr, flush=True)

    with Client.connect(autostart=True, model=model, device=device) as client:
        try:
            return client.request(method, params, on_draft=on_draft if progress else None)
        finally:
            if progress:
                print("\r\033[K", end="", file=sys.stderr, flush=True)


def _run_in_process(method: str, params: dict[str, Any], *, model: str | None, device: str | None) -> dict[str, Any]:
    from .config import load_config
    from .server import engine_kwargs, result_payload

    config = load_config()
    kwargs = engine_kwargs(method, params, config.limits)
    settings = {**config.sampler, **params.get("settings", {})}
    spec = model or os.environ.get("DGEMMA_MODEL") or config.model
    from .engine import Engine
    from .loading import load_model

    loaded = load_model(spec, device=device or config.device, dtype=config.dtype, quantize=config.quantization)
    engine = Engine(loaded)
    fn = engine.fill if method == "fill" else engine.edit
    res = fn(**kwargs, settings=settings or None)
    return result_payload(res, loaded.name)


def _settings(steps: int | None) -> dict[str, Any]:
    return {"max_denoising_steps": steps} if steps else {}


# ---- edit / fill / undo -------------------------------------------------------------------

def _display(data: bytes) -> list[str]:
    # Split on "\n" only: str.splitlines would also split on form feeds and U+2028.
    text = data.decode("utf-8", "replace").replace("\r\n", "\n")
    lines = text.split("\n")
    out = [line + "\n" for line in lines[:-1]]
    return out + [lines[-1]] if lines[-1] else out


@app.command()
def edit(
    target: str = typer.Argument(..., metavar="FILE:START-END", help="File and 1-based inclusive line range."),
    message: Optional[str] = typer.Option(None, "-m", "--message", help="Instruction; without it the lines are "
                                                                       "regenerated as fill-in-the-middle."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Apply without asking."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print the diff."),
    no_daemon: bool = NoDaemonOpt,
    model: Optional[str] = ModelOpt,
    strength: float = typer.Option(0.5, "--strength", min=0.0, max=1.0, help="Share of the selection renoised (edit)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="Token budget of the new text."),
    steps: Optional[int] = StepsOpt,
    seed: Optional[int] = SeedOpt,
) -> None:
    """Rewrite lines START..END of FILE and show the diff (apply with --yes)."""
    from .fileedit import UndoStore, atomic_write, check_range, parse_range, read_source, replace_lines

    if yes and dry_run:
        raise DgemmaError("invalid_params", "--yes and --dry-run contradict each other")
    name, start, end = parse_range(target)
    src = read_source(name)
    check_range(src, start, end)
    prefix, selection, suffix = src.text(0, start - 1), src.text(start - 1, end), src.text(end, src.line_count)
    # No `document`: that would let two shell commands on one file supersede each other.
    params: dict[str, Any] = {"prefix": prefix, "suffix": suffix, "seed": seed, "settings": _settings(steps)}
    if max_tokens:
        params["max_tokens"] = max_tokens
    if message is not None:
        params.update(selection=selection, instruction=message, strength=strength)
        res = _run_request("edit", params, no_daemon=no_daemon, model=model)
    else:
        res = _run_request("fill", params, no_daemon=no_daemon, model=model)
    new_text = res["completions"][0]["text"] if res.get("completions") else ""
    # The range is whole lines: keep it whole lines so the next line is not glued on.
    if new_text and selection.endswith("\n") and not new_text.endswith("\n"):
        new_text += "\n"
    new_bytes = replace_lines(src, start, end, new_text)
    if new_bytes == src.raw:
        _say(f"dgemma: no change to {src.shown}:{start}-{end}")
        return
    label = src.shown.lstrip("/")
    diff = difflib.unified_diff(_display(src.raw), _display(new_bytes), f"a/{label}", f"b/{label}")
    for line in diff:
        sys.stdout.write(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    sys.stdout.flush()
    if dry_run:
        return
    if not yes:
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            return  # not interactive and not told to apply: the diff is the answer
        if not typer.confirm("Apply this change?", default=False):
            _say("dgemma: not applied")
            return
    store = UndoStore()
    entry = store.save(src.path, src.raw, src.mode, hashlib.sha256(new_bytes).hexdigest())
    try:
        atomic_write(src.path, new_bytes, src.snapshot, mode=src.mode)
    except BaseException:
        store.discard(entry)
        raise
    _say(f"dgemma: applied to {src.shown}; `dgemma undo {src.shown}` restores the previous version")


@app.command()
def fill(
    target: str = typer.Argument(..., metavar="FILE:LINE:COL", help="1-based position, as compilers print it."),
    json_out: bool = typer.Option(False, "--json", help="Print {middle, model, steps, ms} as JSON."),
    no_daemon: bool = NoDaemonOpt,
    model: Optional[str] = ModelOpt,
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Token budget of the middle."),
    steps: Optional[int] = StepsOpt,
    seed: Optional[int] = SeedOpt,
) -> None:
    """Print the text that belongs at FILE:LINE:COL (the file is not changed)."""
    from .fileedit import parse_position, read_source, split_at

    name, line, col = parse_position(target)
    src = read_source(name)
    prefix, suffix = split_at(src, line, col)
    res = _run_request("fill", {"prefix": prefix, "suffix": suffix, "max_tokens": max_tokens, "seed": seed,
                                "settings": _settings(steps)},
                       no_daemon=no_daemon, model=model)
    middle = res["completions"][0]["text"] if res.get("completions") else ""
    if json_out:
        print(json.dumps({"middle": middle, "model": res.get("model"), "steps": res.get("steps"),
                          "ms": round(float(res.get("ms", 0.0)), 1)}))
    else:
        sys.stdout.write(middle)
        if sys.stdout.isatty() and not middle.endswith("\n"):
            sys.stdout.write("\n")


@app.command()
def undo(file: Path = typer.Argument(..., help="A file `dgemma edit` changed.")) -> None:
    """Put back the version of FILE from before dgemma's last edit."""
    from .fileedit import UndoStore

    UndoStore().undo(file)
    _say(f"dgemma: restored {file}")


# ---- daemon management ------------------------------------------------------------------

@app.command()
def serve(
    detach: bool = typer.Option(False, "--detach", "-d", help="Run in the background (log next to the socket)."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1, cpu (default: config, then auto)."),
    socket: Optional[Path] = typer.Option(None, "--socket", help="Socket path (default: in the runtime dir)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every request."),
) -> None:
    """Run the daemon: load the model once and serve editors and the command line."""
    from .config import socket_path

    path = socket or socket_path()
    if detach:
        from .client import _start_lock, daemon_answers, spawn_daemon
        from .config import ensure_private_dir

        with _start_lock(ensure_private_dir(path.parent)):
            if daemon_answers(path):
                raise DgemmaError("invalid_request", f"a daemon is already running at {path}")
            pid = spawn_daemon(path, model=model, device=device)
        print(f"dgemma daemon running (pid {pid}, socket {path})")
        return
    from . import server
    from .config import Config, load_config

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config()
    except DgemmaError as exc:
        # An editor auto-starting the daemon should not fail over a config typo; status shows it.
        logging.getLogger("dgemma").error("invalid config, using defaults: %s", exc.message)
        config = Config()
    srv = server.Server(config, model=model, device=device, socket=path, progress=sys.stderr.isatty())
    import asyncio
    asyncio.run(srv.serve_forever())


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


@app.command()
def status(json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show the daemon's socket, model, device, memory, queue and uptime."""
    from .client import Client, DaemonUnavailable
    from .config import socket_path

    try:
        with Client.connect(timeout=10) as c:
            st = c.request("status")
    except DaemonUnavailable:
        if json_out:
            print(json.dumps({"running": False, "socket": str(socket_path())}))
            raise typer.Exit(1)
        raise DgemmaError("unavailable", f"no daemon running at {socket_path()}")
    st["running_request"] = st.pop("running", None)
    st["running"] = True
    if json_out:
        print(json.dumps(st))
        return
    vram = st.get("vram") or {}
    rows = [
        ("socket", st["socket"]), ("pid", st["pid"]), ("state", st["state"]),
        ("model", f"{st.get('model') or '-'} ({st.get('model_spec') or 'bundled'})"),
        ("device", st.get("device") or "-"),
        ("vram", f"{_fmt_bytes(vram.get('allocated'))} in use, {_fmt_bytes(vram.get('peak'))} peak" if vram else "-"),
        ("queue", f"{st['queue_depth']} waiting, {'1 running' if st['running_request'] else 'none running'}"),
        ("clients", st["clients"]), ("served", st["requests_served"]),
        ("uptime", f"{st['uptime_s']:.0f} s"), ("config", st["config_path"]),
    ]
    if st.get("load_error"):
        rows.append(("error", st["load_error"]))
    if st.get("config_error"):
        rows.append(("config error", st["config_error"]))
    for key, value in rows:
        print(f"{key:13} {value}")


@app.command()
def stop() -> None:
    """Stop the daemon (requests in flight end with `cancelled`)."""
    from .client import Client, DaemonUnavailable
    from .config import socket_path

    try:
        with Client.connect(timeout=10) as c:
            pid = c.request("shutdown").get("pid")
    except DaemonUnavailable:
        _say(f"dgemma: no daemon running at {socket_path()}")
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        raise DgemmaError("internal", f"the daemon (pid {pid}) did not stop within 30 s")
    _say(f"dgemma: daemon stopped (pid {pid})")


def _alive(pid: Any) -> bool:
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


# ---- doctor -------------------------------------------------------------------------------

Check = tuple[str, str]  # (ok | warn | fail, text)


def _check_torch() -> tuple[list[Check], Any]:
    try:
        import torch
    except Exception as exc:
        return [("fail", f"torch does not import ({exc}); reinstall it: pip install torch")], None
    out: list[Check] = [("ok", f"torch {torch.__version__}")]
    if not torch.cuda.is_available():
        out.append(("warn", "no CUDA GPU visible: the model runs on CPU (fine for the bundled model, "
                            "far too slow for 26B-A4B; install the CUDA build of torch on a GPU machine)"))
        return out, None
    idx = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    free, total = torch.cuda.mem_get_info(idx)
    out.append(("ok", f"GPU {props.name} (compute {props.major}.{props.minor}), CUDA {torch.version.cuda}, "
                      f"{_fmt_bytes(free)} free of {_fmt_bytes(total)}"))
    return out, free


def _check_plan(model_path: Path | None, free: int | None) -> list[Check]:
    """Free VRAM against dgemma.quant's memory plan, when that module offers one."""
    try:
        from dgemma.quant import plan as quant_plan  # type: ignore[attr-defined]
    except Exception:
        return []
    fn = next((getattr(quant_plan, n) for n in ("plan_for_checkpoint", "memory_plan", "plan") if
               callable(getattr(quant_plan, n, None))), None)
    if fn is None or model_path is None:
        return []
    try:
        plan = fn(model_path)
        need = plan if isinstance(plan, int) else next(
            int(getattr(plan, n)) for n in ("total_bytes", "total", "bytes") if hasattr(plan, n))
    except Exception as exc:
        return [("warn", f"could not compute the memory plan for {model_path}: {type(exc).__name__}: {exc}")]
    if free is None:
        return [("ok", f"the model's plan needs {_fmt_bytes(need)} (no GPU to compare with)")]
    if need > free:
        return [("fail", f"the model's plan needs {_fmt_bytes(need)} but only {_fmt_bytes(free)} is free: "
                         "close other GPU programs or choose 4-bit quantization in the config")]
    return [("ok", f"the model's plan needs {_fmt_bytes(need)}; {_fmt_bytes(free)} free")]


def _check_model(model: str | None) -> tuple[list[Check], Path | None]:
    from .config import load_config

    try:
        config = load_config()
        config_note: list[Check] = []
    except DgemmaError as exc:
        config, config_note = None, [("fail", f"config: {exc.message} (fix the file; the daemon uses the "
                                              "previous or default config meanwhile)")]
    spec = model or os.environ.get("DGEMMA_MODEL") or (config.model if config else None)
    try:
        from .loading import resolve_model_path
        path = resolve_model_path(spec)
    except DgemmaError as exc:
        return config_note + [("fail", exc.message)], None
    weights = sorted(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in weights)
    if not weights:
        return config_note + [("fail", f"model {path}: no .safetensors weights (copy the checkpoint there)")], path
    return config_note + [("ok", f"model files in {path}: {len(weights)} weight file(s), {_fmt_bytes(size)}")], path


def _check_daemon() -> list[Check]:
    from .client import Client, DaemonUnavailable
    from .config import socket_path

    path = socket_path()
    out: list[Check] = []
    folder = path.parent
    if folder.exists() and hasattr(os, "getuid"):  # on Windows the user's profile folder is private
        st = folder.stat()
        if st.st_uid != os.getuid():
            out.append(("fail", f"{folder} belongs to uid {st.st_uid}, not you: set DGEMMA_RUNTIME_DIR"))
        elif stat.S_IMODE(st.st_mode) & 0o077:
            out.append(("fail", f"{folder} is mode {stat.S_IMODE(st.st_mode):o}, others can enter it: chmod 700 {folder}"))
        else:
            out.append(("ok", f"runtime dir {folder} is private (700)"))
    try:
        with Client.connect(path, timeout=5) as c:
            st_ = c.request("status")
        out.append(("ok", f"daemon answers at {path} (pid {st_['pid']}, model {st_.get('model') or '-'}, "
                          f"{st_['state']})"))
        if st_.get("load_error"):
            out.append(("fail", f"the daemon could not load its model: {st_['load_error']}"))
        if st_.get("config_error"):
            out.append(("warn", f"the daemon keeps its previous config: {st_['config_error']}"))
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
    model_checks, path = _check_model(model)
    return checks + _check_plan(path, free) + model_checks + _check_daemon()


@app.command()
def doctor(model: Optional[str] = ModelOpt) -> None:
    """Check the GPU, memory against the model's plan, model files, daemon and socket."""
    failed = False
    for level, text in run_checks(model):
        print(f"{level:5} {text}")
        failed |= level == "fail"
    if failed:
        raise typer.Exit(1)


@app.command()
def lsp() -> None:
    """Run the language server on stdio; editors start this (see editors/)."""
    from dgemma.lsp.server import main as serve_lsp  # pygls is only loaded for this command

    serve_lsp()


# ---- entry point --------------------------------------------------------------------------

def _register_plugins() -> None:
    """Other components add commands (`dgemma quant ...`); a missing or broken one must
    not take the rest of the command line down."""
    try:
        from dgemma.quant import cli as quant_cli
        quant_cli.register(app)
    except Exception as exc:
        if os.environ.get("DGEMMA_DEBUG"):
            _say(f"dgemma: quant commands unavailable: {type(exc).__name__}: {exc}")


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(Exit, ClickException, Abort) classes: recent typer vendors click as typer._click
    and defines Exit/Abort itself; older typer uses click's."""
    mods = []
    for name in ("typer", "typer._click.exceptions", "click.exceptions"):
        try:
            mods.append(__import__(name, fromlist=["_"]))
        except ImportError:
            pass

    def classes(name: str) -> tuple[type, ...]:
        found = {getattr(m, name) for m in mods if isinstance(getattr(m, name, None), type)}
        return tuple(found) or (type(f"_No{name}", (Exception,), {}),)
    return classes("Exit"), classes("ClickException"), classes("Abort")


def main(argv: list[str] | None = None) -> None:
    _register_plugins()
    exit_exc, click_exc, abort_exc = _click_exceptions()
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="dgemma", standalone_mode=False)
    except exit_exc as exc:
        sys.exit(exc.exit_code)
    except click_exc as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # bare `dgemma`: the help text, not an error
            sys.exit(0)
        # Usage errors follow the same rule as every other error: one line, exit 1.
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "dgemma"
        _say(f"dgemma: {exc.format_message()} (see `{where} --help`)")
        sys.exit(1)
    except abort_exc:
        _say("dgemma: aborted")
        sys.exit(1)
    except DgemmaError as exc:
        _say(f"dgemma: {exc.message}")
        sys.exit(1)
    except KeyboardInterrupt:
        _say("dgemma: interrupted")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    except Exception as exc:
        if os.environ.get("DGEMMA_DEBUG"):
            raise
        _say(f"dgemma: internal error: {type(exc).__name__}: {exc} (DGEMMA_DEBUG=1 shows the traceback)")
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
