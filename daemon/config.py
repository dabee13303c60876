"""Where dgemma keeps things, and the user's TOML config (with live reload).

Every location can be overridden by an environment variable so that tests and
side-by-side installs never touch the user's real directories.
"""
from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Awaitable, Callable

import platformdirs

from dgemma.errors import DgemmaError
from dgemma.daemon.protocol import DEFAULT_MAX_FRAME, MIN_FRAME
from dgemma.engine.devices import DTYPE_NAMES, check_device
from dgemma.engine.settings import SamplerSettings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger("dgemma.config")

APP = "dgemma"


# ---- locations ------------------------------------------------------------------------

def runtime_dir() -> Path:
    """Socket, locks, pid and log. Private to the user (0700)."""
    env = os.environ.get("DGEMMA_RUNTIME_DIR")
    if env:
        return Path(env)
    if sys.platform.startswith("linux"):
        # $XDG_RUNTIME_DIR (/run/user/UID) is private and cleared at logout; without it
        # (containers, ssh without logind) a per-user folder in /tmp, checked for owner
        # and mode by ensure_private_dir.
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg and os.path.isdir(xdg):
            return Path(xdg) / APP
        import tempfile
        return Path(tempfile.gettempdir()) / f"{APP}-{os.getuid()}"
    return Path(platformdirs.user_runtime_dir(APP))


def config_dir() -> Path:
    env = os.environ.get("DGEMMA_CONFIG_DIR")
    return Path(env) if env else Path(platformdirs.user_config_dir(APP))


def data_dir() -> Path:
    env = os.environ.get("DGEMMA_DATA_DIR")
    return Path(env) if env else Path(platformdirs.user_data_dir(APP))


def config_path() -> Path:
    return config_dir() / "config.toml"


def socket_path() -> Path:
    env = os.environ.get("DGEMMA_SOCKET")
    return Path(env) if env else runtime_dir() / "daemon.sock"


TCP_INFO = "daemon.tcp.json"


def transport() -> str:
    """"tcp" (loopback TCP + per-user token file) on Windows or with DGEMMA_TRANSPORT=tcp,
    else "unix" (a Unix socket)."""
    if sys.platform == "win32" or os.environ.get("DGEMMA_TRANSPORT", "").lower() == "tcp":
        return "tcp"
    return "unix"


def tcp_info_path(folder: Path) -> Path:
    """The TCP transport's {port, token, pid} file; it lives next to where the socket would."""
    return folder / TCP_INFO


def read_tcp_info(folder: Path) -> tuple[int, str]:
    """(port, token) from the token file. FileNotFoundError when no daemon wrote one;
    ValueError when it is unreadable."""
    import json

    try:
        info = json.loads(tcp_info_path(folder).read_text(encoding="utf-8"))
        return int(info["port"]), str(info["token"])
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{tcp_info_path(folder)} is unreadable ({exc})") from None


def lock_fd(fd: int, blocking: bool = True) -> None:
    """Exclusive lock on an open file; raises BlockingIOError when not `blocking` and
    someone else holds it. Closing the fd releases it."""
    if sys.platform == "win32":
        # Untested here (no Windows CI): msvcrt locks a byte range; LK_LOCK retries for
        # about 10 s and then raises OSError, LK_NBLCK fails at once.
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_LOCK if blocking else msvcrt.LK_NBLCK, 1)
        except OSError as exc:
            raise BlockingIOError(str(exc)) from None
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)


def io_error(exc: OSError, what: str, hint: str = "") -> DgemmaError:
    """An OSError as the one-line `io_error` the command line prints: `what` failed, why, and
    what to do about it."""
    return DgemmaError("io_error", f"{what}: {exc.strerror or exc}" + (f"; {hint}" if hint else ""))


def ensure_private_dir(path: Path) -> Path:
    """Create `path` with mode 0700, or check that the existing folder is private to the user:
    anyone who can reach the socket can make the daemon read prompts and spend the GPU. Only a
    folder dgemma creates here is chmod-ed; an existing one that others can enter (/tmp, a shared
    folder) is refused with the reason, never changed: it is not dgemma's to lock down."""
    try:
        try:
            path.mkdir(mode=0o700, parents=True)
            created = True
        except FileExistsError:
            created = False
        if not hasattr(os, "getuid"):  # Windows: the per-user profile dir is private already
            return path
        if created:
            os.chmod(path, 0o700)  # mkdir's mode went through the umask
        st = path.stat()
        if not stat.S_ISDIR(st.st_mode):
            raise DgemmaError("io_error", f"{path} is not a folder; set DGEMMA_RUNTIME_DIR to a folder of your own")
        if st.st_uid != os.getuid():
            raise DgemmaError("invalid_params", f"{path} belongs to another user (uid {st.st_uid}); "
                                                "set DGEMMA_RUNTIME_DIR to a folder of your own")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise DgemmaError("invalid_params", f"{path} is mode {mode:o}: others can enter it, and dgemma keeps its "
                                                "socket only in a private folder; set DGEMMA_RUNTIME_DIR (or --socket) "
                                                f"to a folder of your own, or `chmod 700 {path}` if it is yours alone")
    except OSError as exc:
        raise io_error(exc, f"cannot create the private folder {path}", "set DGEMMA_RUNTIME_DIR") from None
    return path


# ---- config ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = DEFAULT_MAX_FRAME
    # Requests one connection may have queued or running; more get `too_large`.
    max_pending_per_client: int = 64
    # Drafts waiting to be written to one slow client; newer drafts replace older ones
    # of the same request, and past this many distinct ones drafts are dropped.
    max_queued_drafts: int = 8
    max_tokens: int = 2048
    max_n: int = 8  # the engine's MAX_ALTERNATIVES

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            low, high = LIMIT_RANGES[f.name]
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise DgemmaError("invalid_params", f"limit `{f.name}` must be an integer in {low}..{high}, "
                                                    f"not {value!r:.40}")


# Sane bounds of each limit. The lower ones keep the daemon usable whatever the file says:
# every control request (hello, status, shutdown) fits in MIN_FRAME.
LIMIT_RANGES = {
    "max_frame_bytes": (MIN_FRAME, 1 << 30),
    "max_pending_per_client": (1, 4096),
    "max_queued_drafts": (1, 1024),
    "max_tokens": (1, 1 << 20),
    "max_n": (1, 8),
}


@dataclass(frozen=True)
class Cluster:
    """`[cluster]`: how `dgemma cluster up` serves the model to a team (dgemma.cluster)."""
    host: str = "127.0.0.1"  # the HTTP ingress; another address exposes it (put TLS in front)
    port: int = 8000
    # Fixed replica count; None: one per GPU of the cluster, or one CPU replica where there is none.
    replicas: int | None = None
    # Autoscaling between these counts instead of a fixed one (both or neither).
    min_replicas: int | None = None
    max_replicas: int | None = None
    replica_cpus: float = 1.0  # CPUs each replica reserves (and torch threads on a CPU replica)
    # Requests a replica holds (one runs, the rest queue there); past it Serve tries the next replica.
    max_ongoing_requests: int = 16

    def __post_init__(self) -> None:
        def bad(what: str) -> DgemmaError:
            return DgemmaError("invalid_params", f"[cluster]: {what}")
        if not isinstance(self.host, str) or not self.host:
            raise bad("`host` must be an address such as 127.0.0.1")
        ints = {"port": (1, 65535), "replicas": (1, 4096), "min_replicas": (0, 4096), "max_replicas": (1, 4096),
                "max_ongoing_requests": (1, 1 << 16)}
        for name, (low, high) in ints.items():
            value = getattr(self, name)
            if value is None and name.endswith("replicas"):  # the counts may be left to the cluster
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise bad(f"`{name}` must be an integer in {low}..{high}, not {value!r:.40}")
        if not isinstance(self.replica_cpus, (int, float)) or isinstance(self.replica_cpus, bool) \
                or not 0 < self.replica_cpus <= 1024:
            raise bad(f"`replica_cpus` must be a number in (0, 1024], not {self.replica_cpus!r:.40}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise bad("set both `min_replicas` and `max_replicas` to autoscale, or neither")
        if self.min_replicas is not None:
            if self.replicas is not None:
                raise bad("`replicas` fixes the count; autoscaling (`min_replicas`, `max_replicas`) varies it: pick one")
            if self.min_replicas > self.max_replicas:  # type: ignore[operator]
                raise bad("`min_replicas` is above `max_replicas`")


@dataclass(frozen=True)
class Config:
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    # Keyword arguments for the engine's SamplerSettings (e.g. max_denoising_steps).
    sampler: dict[str, Any] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    # Remote mode: fill and edit go to this team server (`dgemma cluster up`) instead of a local model.
    remote: str | None = None
    # The team server's bearer token: `dgemma cluster up` creates it, clients in remote mode send it.
    token_file: str | None = None
    cluster: Cluster = field(default_factory=Cluster)

    def model_identity(self) -> tuple[Any, ...]:
        """What requires loading the model again when it changes."""
        return (self.model, self.device, self.dtype, self.quantization, self.remote, self.token_file)

    def token_path(self) -> Path:
        return Path(self.token_file) if self.token_file else config_dir() / "cluster.token"


_TOP = {"model", "device", "dtype", "quantization", "sampler", "limits", "remote", "token_file", "cluster"}
DTYPES = ("auto", *DTYPE_NAMES)
QUANTIZATIONS = ("nvfp4", "nf4")


def parse_config(text: str, source: str = "config.toml") -> Config:
    """The config in `text`; DgemmaError(invalid_params) naming `source` for anything that
    would only fail later, at model load or on every request."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DgemmaError("invalid_params", f"{source}: {exc}") from None
    unknown = set(data) - _TOP
    if unknown:
        raise DgemmaError("invalid_params", f"{source}: unknown key(s) {', '.join(sorted(unknown))}; "
                                            f"known: {', '.join(sorted(_TOP))}")
    kwargs: dict[str, Any] = {}
    for key in ("model", "device", "dtype", "quantization", "remote", "token_file"):
        if key in data:
            if not isinstance(data[key], str):
                raise DgemmaError("invalid_params", f"{source}: `{key}` must be a string")
            kwargs[key] = data[key]
    for key in ("model", "token_file"):
        if key in kwargs:
            kwargs[key] = os.path.expanduser(kwargs[key])
    if "remote" in kwargs:
        from dgemma.daemon.remote import check_url
        check_url(kwargs["remote"], f"{source}: `remote`")
    if "device" in kwargs:
        check_device(kwargs["device"], f"{source}: `device`")
    for key, names in (("dtype", DTYPES), ("quantization", QUANTIZATIONS)):
        if key in kwargs and kwargs[key] not in names:
            raise DgemmaError("invalid_params", f"{source}: `{key}` = {kwargs[key]!r} is not one of {', '.join(names)}")
    sampler = data.get("sampler", {})
    if not isinstance(sampler, dict):
        raise DgemmaError("invalid_params", f"{source}: [sampler] must be a table")
    try:
        # Against the built-in defaults: a typo or a bad value is caught here, not on every request.
        SamplerSettings.from_mapping(sampler)
    except DgemmaError as exc:
        raise DgemmaError("invalid_params", f"{source}: [sampler]: {exc.message}") from None
    kwargs["sampler"] = dict(sampler)
    kwargs["limits"] = _table(data, "limits", Limits, source)
    kwargs["cluster"] = _table(data, "cluster", Cluster, source)
    return Config(**kwargs)


def _table(data: dict[str, Any], name: str, cls: type[Any], source: str) -> Any:
    """The `[name]` table as a `cls` dataclass, which checks its own values; unknown keys are errors."""
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise DgemmaError("invalid_params", f"{source}: [{name}] must be a table")
    known = {f.name for f in fields(cls)}
    for key in table:
        if key not in known:
            raise DgemmaError("invalid_params", f"{source}: unknown [{name}] key `{key}`; known: {', '.join(sorted(known))}")
    try:
        return cls(**table)
    except DgemmaError as exc:
        raise DgemmaError("invalid_params", f"{source}: {exc.message}") from None


def load_config(path: Path | None = None) -> Config:
    """The config at `path` (default: the user's); defaults when the file is absent."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise DgemmaError("invalid_params", f"{path}: cannot read ({exc})") from None
    return parse_config(text, str(path))


class ConfigWatcher:
    """Keeps `current` in step with the file; an invalid edit is logged, remembered in
    `error` (so `dgemma status` can show it) and the previous config stays in force."""

    def __init__(self, path: Path, initial: Config,
                 on_change: Callable[[Config, Config], Awaitable[None] | None] | None = None) -> None:
        self.path = path
        self.current = initial
        self.error: str | None = None
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def reload(self, notify: bool = True) -> tuple[Config, bool]:
        """Read the file now. Returns (its config, whether it changed); raises DgemmaError
        (and keeps the old config) when the file is invalid. `notify=False` leaves applying
        a change to the caller."""
        try:
            new = load_config(self.path)
        except DgemmaError as exc:
            self.error = exc.message
            raise
        self.error = None
        changed = new != self.current
        old, self.current = self.current, new
        if changed:
            log.info("config reloaded from %s", self.path)
            if notify and self._on_change is not None:
                res = self._on_change(old, new)
                if asyncio.iscoroutine(res):
                    asyncio.get_running_loop().create_task(res)
        return new, changed

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def _run(self) -> None:
        import watchfiles

        # Watch the folder, not the file: editors replace files by rename, and the file
        # may not exist yet when the daemon starts.
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        name = self.path.name
        async for changes in watchfiles.awatch(folder, stop_event=self._stop, debounce=200, step=50,
                                               recursive=False):
            if not any(Path(p).name == name for _, p in changes):
                continue
            try:
                self.reload()
            except DgemmaError as exc:
                log.error("invalid config, keeping the previous one: %s", exc.message)
