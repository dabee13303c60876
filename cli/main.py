"""The `dgemma` command line.

Every user-facing failure is one line `dgemma: <message>` on stderr and exit code 1,
with nothing written; tracebacks only with DGEMMA_DEBUG=1. torch is imported only by the
commands that run a model in this process (serve, --no-daemon, doctor), so the usual
path through the daemon starts fast.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import typer

from dgemma.cli import cluster
from dgemma.cli import doctor as doctor_checks
from dgemma.cli import quant
from dgemma.cli.doctor import fmt_bytes, remote_summary
from dgemma.cli.process import wait_gone
from dgemma.errors import DgemmaError

if TYPE_CHECKING:
    from dgemma.cli.fileedit import SourceFile

app = typer.Typer(name="dgemma", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fill-in-the-middle and inline edits of code with DiffusionGemma.")

ModelOpt = typer.Option(None, "--model", help="Checkpoint directory or offline hub id (default: config, "
                                              "$DGEMMA_MODEL, then the bundled model).")
NoDaemonOpt = typer.Option(False, "--no-daemon", help="Run the model in this process; start no daemon.")
StepsOpt = typer.Option(None, "--steps", min=1, help="Denoising steps per canvas (sampler max_denoising_steps).")
SeedOpt = typer.Option(None, "--seed", help="Sampling seed, for reproducible output.")


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _status_line(text: str) -> None:
    """A transient line on a terminal's stderr: the next one (or _clear_status_line) replaces it."""
    print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)


def _clear_status_line() -> None:
    _status_line("")


def _loading_notice() -> None:
    _status_line("dgemma: loading model…")


# ---- running a request: through the daemon or in this process ----------------------------

def _run_request(method: str, params: dict[str, Any], *, no_daemon: bool, model: str | None,
                 device: str | None = None) -> dict[str, Any]:
    if no_daemon:
        return _run_in_process(method, params, model=model, device=device)
    from dgemma.daemon.client import Client, ModelLoadFailed, absolute_model_spec

    progress = sys.stderr.isatty()
    params = dict(params, stream=progress)
    if model:
        params["model"] = absolute_model_spec(model)

    def on_draft(d: dict[str, Any]) -> None:
        _status_line(f"denoising: step {d.get('step')}, canvas {d.get('canvas')}")

    with Client.connect(autostart=True, model=model, device=device) as client:
        try:
            try:
                client.wait_loaded(on_loading=_loading_notice if progress else None)
            except ModelLoadFailed as exc:
                # The daemon stays up (its config watcher may heal it): say how to get past it.
                raise DgemmaError(exc.code, f"the daemon has no model: {exc.message} (fix the config, "
                                            "or `dgemma stop`)") from None
            return client.request(method, params, on_draft=on_draft if progress else None)
        finally:
            if progress:
                _clear_status_line()


def _run_in_process(method: str, params: dict[str, Any], *, model: str | None, device: str | None) -> dict[str, Any]:
    from dgemma.daemon.config import load_config

    config = load_config()  # before the imports below pull in torch: a bad file fails at once
    from dgemma.daemon.codec import engine_kwargs, run_request
    from dgemma.daemon.host import default_engine_factory
    from dgemma.engine.devices import model_spec

    kwargs = engine_kwargs(method, params, config.limits)
    # The engine the daemon would build from the same config, in this process.
    engine = default_engine_factory(config, model_spec(model, config.model), device or config.device)
    return run_request(engine, method, kwargs, {**config.sampler, **params.get("settings", {})})


def _settings(steps: int | None) -> dict[str, Any]:
    return {"max_denoising_steps": steps} if steps else {}


# ---- edit / fill / undo -------------------------------------------------------------------

@contextlib.contextmanager
def _too_large(shown: str) -> Iterator[None]:
    """A request the daemon would refuse for its size (the client checks before sending) names the file."""
    from dgemma.daemon.client import RequestTooLarge

    try:
        yield
    except RequestTooLarge as exc:
        raise DgemmaError("too_large", f"{shown} is too large to send to the daemon: {exc.message}") from None


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
    from dgemma.cli.fileedit import check_range, check_writable, parse_range, read_source, replace_lines

    if yes and dry_run:
        raise DgemmaError("invalid_params", "--yes and --dry-run contradict each other")
    name, start, end = parse_range(target)
    src = read_source(name)
    check_range(src, start, end)
    if not dry_run:
        check_writable(src.path, src.shown)  # before the model runs, not after
    prefix, selection, suffix = src.text(0, start - 1), src.text(start - 1, end), src.text(end, src.line_count)
    # No `document`: that would let two shell commands on one file supersede each other.
    # Without an instruction the daemon regenerates the selection (answers.py), with a budget sized
    # from the selection itself, as the engine sizes an edit's.
    params: dict[str, Any] = {"prefix": prefix, "selection": selection, "suffix": suffix, "instruction": message or "",
                              "strength": strength, "seed": seed, "settings": _settings(steps)}
    if max_tokens:
        params["max_tokens"] = max_tokens
    with _too_large(src.shown):
        res = _run_request("edit", params, no_daemon=no_daemon, model=model)
    new_text = res["completions"][0]["text"] if res.get("completions") else ""
    if not new_text:  # the model gave nothing: applying it would delete the lines
        raise DgemmaError("empty", f"the model returned nothing for {src.shown}:{start}-{end}; the file is unchanged")
    new_bytes = replace_lines(src, start, end, new_text)
    if new_bytes == src.raw:
        _say(f"dgemma: no change to {src.shown}:{start}-{end}")
        return
    _offer(src, new_bytes, yes=yes, dry_run=dry_run)


def _offer(src: SourceFile, new_bytes: bytes, *, yes: bool, dry_run: bool) -> None:
    """Print the change as a diff, then apply it (atomically, undoable) if the user says so."""
    from dgemma.cli.fileedit import apply_edit

    label = src.shown.lstrip("/")
    diff = difflib.unified_diff(_display(src.raw), _display(new_bytes), f"a/{label}", f"b/{label}")
    for line in diff:
        sys.stdout.write(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    sys.stdout.flush()
    if dry_run:
        return
    if not yes:
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            _say("dgemma: not applied (use --yes to apply)")  # the diff alone is the answer
            return
        if not typer.confirm("Apply this change?", default=False):
            _say("dgemma: not applied")
            return
    apply_edit(src, new_bytes)
    _say(f"dgemma: applied to {src.shown}; `dgemma undo {src.shown}` restores the previous version")


@app.command(name="next")
def next_edit(
    file: str = typer.Argument(..., metavar="FILE", help="A file you have been editing."),
    after: Optional[Path] = typer.Option(None, "--after", metavar="OLDFILE",
                                         help="FILE as it was before your recent edits (default: its last "
                                              "commit, `git show HEAD:FILE`)."),
    line: Optional[int] = typer.Option(None, "--line", min=1, help="1-based cursor line (default: the last "
                                                                    "line of the last change)."),
    region: int = typer.Option(20, "--region", min=1, max=60, help="Lines the suggestion may change."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Apply without asking."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print the diff."),
    no_daemon: bool = NoDaemonOpt,
    model: Optional[str] = ModelOpt,
    strength: Optional[float] = typer.Option(None, "--strength", min=0.0, max=1.0,
                                             help="Share of the region renoised (default: the daemon's, 0.1)."),
    steps: Optional[int] = StepsOpt,
    seed: Optional[int] = SeedOpt,
) -> None:
    """Propose the edit that follows your uncommitted changes to FILE, as a diff (apply with --yes)."""
    from dgemma.cli.fileedit import apply_line_edits, check_writable, read_source, text_before
    from dgemma.engine.next_edit import lines_of, recent_edits_between

    if yes and dry_run:
        raise DgemmaError("invalid_params", "--yes and --dry-run contradict each other")
    src = read_source(file)
    text = src.text(0, src.line_count)
    if len(lines_of(text)) != src.line_count:
        raise DgemmaError("invalid_params", f"{src.shown}: lines end in a lone carriage return; `dgemma next` "
                                            "reads files whose lines end in \\n or \\r\\n")
    before = read_source(after) if after else None
    old = before.text(0, before.line_count) if before else text_before(src)
    recent = recent_edits_between(old, text)
    if not recent:
        raise DgemmaError("invalid_params", f"{src.shown} has no changes to follow"
                          + (f" against {after}" if after else " since its last commit") +
                          ": edit it first, or give --after OLDFILE")
    if line is not None and line > max(1, src.line_count):
        raise DgemmaError("invalid_params", f"{src.shown}: line {line} is past the end (the file has "
                                            f"{src.line_count} lines)")
    last = recent[-1]
    cursor = line - 1 if line else last.line + max(0, len(lines_of(last.new)) - 1)
    if not dry_run:
        check_writable(src.path, src.shown)
    params: dict[str, Any] = {"text": text, "path": str(src.path), "cursor": {"line": cursor, "character": 0},
                              "recent_edits": [vars(e) for e in recent], "region_lines": region,
                              "strength": strength, "seed": seed, "settings": _settings(steps)}
    with _too_large(src.shown):
        res = _run_request("next_edit", params, no_daemon=no_daemon, model=model)
    if not res["edits"]:
        _say(f"dgemma: no next edit in {src.shown}:{res['region']['start_line'] + 1}-{res['region']['end_line']}")
        return
    _offer(src, apply_line_edits(src, res["edits"]), yes=yes, dry_run=dry_run)


@app.command()
def fill(
    target: str = typer.Argument(..., metavar="FILE:LINE:COL", help="1-based position, as compilers print it."),
    json_out: bool = typer.Option(False, "--json", help="Print {middle, model, steps, ms, prefix_dropped, suffix_dropped} as JSON."),
    no_daemon: bool = NoDaemonOpt,
    model: Optional[str] = ModelOpt,
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Token budget of the middle."),
    lines: Optional[int] = typer.Option(None, "--lines", min=1,
                                        help="At most this many lines (1: the rest of the line, decoded fastest)."),
    steps: Optional[int] = StepsOpt,
    seed: Optional[int] = SeedOpt,
) -> None:
    """Print the text that belongs at FILE:LINE:COL (the file is not changed)."""
    from dgemma.cli.fileedit import parse_position, read_source, split_at

    name, line, col = parse_position(target)
    src = read_source(name)
    prefix, suffix = split_at(src, line, col)
    with _too_large(src.shown):
        # An explicit request: the middle holds at least one token of code (engine/answers.py).
        params = {"prefix": prefix, "suffix": suffix, "max_tokens": max_tokens, "min_tokens": 1, "seed": seed,
                  "settings": _settings(steps)}
        if lines is not None:
            params["max_lines"] = lines
        res = _run_request("fill", params, no_daemon=no_daemon, model=model)
    middle = res["completions"][0]["text"] if res.get("completions") else ""
    if not middle:
        raise DgemmaError("empty", f"the model returned nothing for {src.shown}:{line}:{col}")
    if json_out:
        print(json.dumps({"middle": middle, "model": res.get("model"), "steps": res.get("steps"),
                          "ms": round(float(res.get("ms", 0.0)), 1), "prefix_dropped": res.get("prefix_dropped", 0),
                          "suffix_dropped": res.get("suffix_dropped", 0)}))
    else:
        sys.stdout.write(middle)
        if sys.stdout.isatty() and not middle.endswith("\n"):
            sys.stdout.write("\n")


@app.command()
def undo(file: Path = typer.Argument(..., help="A file `dgemma edit` changed.")) -> None:
    """Put back the version of FILE from before dgemma's last edit."""
    from dgemma.cli.fileedit import UndoStore, shown_name

    UndoStore().undo(file)
    _say(f"dgemma: restored {shown_name(file)}")


# ---- daemon management ------------------------------------------------------------------

@app.command()
def serve(
    detach: bool = typer.Option(False, "--detach", "-d", help="Run in the background (log next to the socket)."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1, cpu (default: config, then auto)."),
    socket: Optional[Path] = typer.Option(None, "--socket", help="Socket path (default: in the runtime dir)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every request."),
    log_file: Optional[Path] = typer.Option(None, "--log-file", hidden=True,
                                            help="Log here, rotated (how a daemon started in the background logs)."),
) -> None:
    """Run the daemon: load the model once and serve editors and the command line."""
    from dgemma.daemon.config import check_device, socket_path

    path = socket or socket_path()
    if device is not None:
        check_device(device, "--device")
    if detach:
        _serve_detached(path, model, device)
        return
    from dgemma.daemon import logs, server
    from dgemma.daemon.config import Config, load_config

    logs.setup(logging.DEBUG if verbose else logging.INFO, log_file)
    config_error = None
    try:
        config = load_config()
    except DgemmaError as exc:
        # An editor auto-starting the daemon should not fail over a config typo; status shows it.
        logging.getLogger("dgemma").error("invalid config, using defaults: %s", exc.message)
        config, config_error = Config(), exc.message
    srv = server.Server(config, model=model, device=device, socket=path, progress=sys.stderr.isatty(),
                        config_error=config_error)
    import asyncio
    asyncio.run(srv.serve_forever())


def _serve_detached(path: Path, model: str | None, device: str | None) -> None:
    """Start the daemon in the background and wait for its model. One that cannot load it
    is stopped again: the user asked for a working daemon, and a retry must not find this one."""
    from dgemma.daemon.client import Client, DaemonUnavailable, _start_lock, daemon_answers, spawn_daemon
    from dgemma.daemon.config import ensure_private_dir

    with _start_lock(ensure_private_dir(path.parent)):
        if daemon_answers(path):
            raise DgemmaError("invalid_request", f"a daemon is already running at {path}")
        pid = spawn_daemon(path, model=model, device=device)
    notice = sys.stderr.isatty()
    logfile = path.parent / "daemon.log"
    with Client.connect(path) as client:
        try:
            client.wait_loaded(on_loading=_loading_notice if notice else None)
        except DaemonUnavailable as exc:
            raise DaemonUnavailable(f"{exc.message} while it loaded the model (log: {logfile})") from None
        except DgemmaError as exc:
            client.request("shutdown")
            wait_gone(pid)
            raise DgemmaError(exc.code, f"{exc.message} (the daemon stopped; log: {logfile})") from None
        finally:
            if notice:
                _clear_status_line()
    print(f"dgemma daemon running (pid {pid}, socket {path})")


@app.command()
def status(json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show the daemon's socket, model, device, memory, queue and uptime."""
    from dgemma.daemon.client import Client, DaemonUnavailable
    from dgemma.daemon.config import socket_path

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
        ("model", st["model"] if st.get("remote") else f"{st.get('model') or '-'} ({st.get('model_spec') or 'bundled'})"),
        ("device", st.get("device") or "-"),
        ("vram", f"{fmt_bytes(vram.get('allocated'))} in use, {fmt_bytes(vram.get('peak'))} peak" if vram else "-"),
        ("queue", f"{st['queue_depth']} waiting, {'1 running' if st['running_request'] else 'none running'}"),
        ("clients", st["clients"]), ("served", st["requests_served"]),
        ("uptime", f"{st['uptime_s']:.0f} s"), ("config", st["config_path"]),
    ]
    if st.get("remote"):
        rows.append(("remote", remote_summary(st["remote"])))
    if st.get("loading"):
        rows.append(("loading", f"{st['loading']} (the model above answers until it is ready)"))
    if st.get("load_error"):
        rows.append(("error", st["load_error"]))
    if st.get("config_error"):
        rows.append(("config error", st["config_error"]))
    for key, value in rows:
        print(f"{key:13} {value}")


@app.command()
def stop() -> None:
    """Stop the daemon (requests in flight end with `cancelled`)."""
    from dgemma.daemon.client import Client, DaemonUnavailable
    from dgemma.daemon.config import socket_path

    try:
        with Client.connect(timeout=10) as c:
            pid = c.request("shutdown").get("pid")
    except DaemonUnavailable:
        _say(f"dgemma: no daemon running at {socket_path()}")
        return
    wait_gone(pid)
    _say(f"dgemma: daemon stopped (pid {pid})")


@app.command()
def doctor(model: Optional[str] = ModelOpt) -> None:
    """Check the GPU, memory against the model's plan, model files, daemon and socket."""
    failed = False
    for level, text in doctor_checks.run_checks(model):
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

quant.register(app)  # `dgemma quantize` and `dgemma plan`, listed after the commands above
cluster.register(app)  # `dgemma cluster up | status | down`


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
    except Exception as exc:  # deliberate: one line, not a traceback, for a bug the user cannot fix
        if os.environ.get("DGEMMA_DEBUG"):
            raise
        _say(f"dgemma: internal error: {type(exc).__name__}: {exc} (DGEMMA_DEBUG=1 shows the traceback)")
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
