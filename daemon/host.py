"""The model in service, and the config in force: loading a model, loading the next one beside it
while the first serves and swapping it in between two requests, giving the first up when both do
not fit, and putting a new config in force.

Everything here runs on the daemon's worker thread (the engine is not thread-safe), except the
build of a model loaded beside the one in service: it runs on a short-lived loader thread that
touches no state here and hands the engine back as a scheduler control step.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Callable

from dgemma.daemon.config import Config
from dgemma.daemon.remote import Remote
from dgemma.daemon.scheduler import Scheduler
from dgemma.engine.api import FillEngine
from dgemma.engine.devices import model_spec
from dgemma.errors import DgemmaError

log = logging.getLogger("dgemma.daemon")

# (config, model spec, device) -> the engine to serve; the daemon builds `default_engine_factory`'s, tests script one.
EngineFactory = Callable[[Config, "str | None", "str | None"], FillEngine]


class ModelHost:
    def __init__(self, config: Config, scheduler: Scheduler, engine_factory: EngineFactory,
                 cli_model: str | None = None, cli_device: str | None = None) -> None:
        self.config = config
        self.scheduler = scheduler
        self.engine_factory = engine_factory
        self.cli_model = cli_model
        self.cli_device = cli_device
        # Why the file's latest valid config is not in force (its model did not load).
        self.apply_error: str | None = None
        self.engine: FillEngine | Remote | None = None
        self.model_name: str | None = None
        self.model_spec: str | None = self.spec(config)
        self.device_name: str | None = None
        self.state = "loading"
        self.load_error: DgemmaError | None = None
        self.loads = 0  # successful model loads, so `reload` can tell whether one happened
        self.loading: str | None = None  # the model loading beside the one in service
        self._after_load: list[Callable[[], None]] = []  # config steps waiting for that load

    def spec(self, config: Config) -> str | None:
        """The model `config` asks for, after --model and DGEMMA_MODEL (engine/devices.py)."""
        return model_spec(self.cli_model, config.model)

    def load(self, config: Config) -> bool:
        """Worker thread, with no engine in service (at start-up, after a failed first load, or
        once the old model was given up to make room): load the model `config` asks for while
        requests wait; returns whether it loaded. When it does not, the daemon stays up in state
        `error`, answering fill/edit with the load error, so `dgemma status` can say what went
        wrong."""
        spec = self.spec(config)
        self.state = "loading"
        t0 = time.monotonic()
        log.info("loading model %s", spec or "(bundled)")
        try:
            engine, failure = self._build_engine(config, spec), None
        except Exception as exc:  # deliberate: whatever a load raises, the daemon stays up and says why
            engine, failure = None, exc
        return self._install(spec, engine, failure, t0)

    def load_beside(self, config: Config, done: Callable[[bool], None]) -> None:
        """Worker thread: load `config`'s model on a thread of its own while the engine in service
        goes on serving; between two requests the worker swaps it in, then calls done(loaded).
        A model too big to sit beside the old one is loaded again by `_load`, which gives the
        old one up first."""
        spec = self.spec(config)
        self.loading = spec or "(bundled)"
        t0 = time.monotonic()
        log.info("loading model %s while %s serves", self.loading, self.model_name)

        def build() -> None:
            try:
                engine, failure = self._build_engine(config, spec), None
            except Exception as exc:  # deliberate: as in load(), the worker reports it in install()
                engine, failure = None, exc
            self.scheduler.control(lambda: install(engine, failure))

        def install(engine: FillEngine | Remote | None, failure: Exception | None) -> None:
            self.loading = None
            if is_oom(failure):  # two models rarely fit on one GPU
                self._give_up_engine()
                ok = self.load(config)
            else:
                ok = self._install(spec, engine, failure, t0)
            try:
                done(ok)
            finally:
                waiting, self._after_load = self._after_load, []
                for step in waiting:
                    step()

        threading.Thread(target=build, name="dgemma-load", daemon=True).start()

    def _install(self, spec: str | None, engine: FillEngine | Remote | None, failure: Exception | None, t0: float) -> bool:
        """Worker thread: put a freshly built engine in service, or record why it was not built."""
        if failure is not None:
            if isinstance(failure, DgemmaError):
                error = failure
            else:
                log.error("model load failed", exc_info=failure)
                error = DgemmaError("model_missing", f"cannot load the model: {type(failure).__name__}: {failure}")
            self.load_error = error
            if self.engine is None:
                self.model_spec, self.state = spec, "error"
                log.error("cannot load the model: %s", error.message)
            else:
                self.state = "ready"
                log.error("cannot load the model, %s keeps serving: %s", self.model_name, error.message)
            return False
        assert engine is not None
        replaced = self.engine is not None
        self.engine = engine
        self.model_spec = spec
        self.model_name = engine.model_name
        self.device_name = str(engine.device)
        self.load_error = None
        self.loads += 1
        self.state = "ready"
        if replaced:  # hand the old model's memory back now, not at some later collection
            gc.collect()
            empty_cuda_cache()
        log.info("model %s ready on %s in %.1f s", self.model_name, self.device_name, time.monotonic() - t0)
        return True

    def _build_engine(self, config: Config, spec: str | None) -> FillEngine | Remote:
        if config.remote:  # remote mode: the team server holds the model (daemon/remote.py)
            return Remote(config.remote, config.token_path())
        return self.engine_factory(config, spec, self.cli_device or config.device)

    def _give_up_engine(self) -> None:
        """Worker thread: unload the engine in service, for a new model that does not fit beside it."""
        log.warning("the new model does not fit next to %s; unloading that one first", self.model_name)
        self.engine = None
        self.model_name = self.device_name = None
        gc.collect()
        empty_cuda_cache()

    def config_changed(self, old: Config, new: Config) -> None:
        """The config watcher's callback: the file's new config goes in force between requests."""
        self.config_step(lambda: self.switch_config(new))

    def config_step(self, step: Callable[[], None]) -> None:
        """Run `step` on the worker thread between requests, after any model load in flight:
        a config decides against the model actually in force, and loads never overlap."""
        def run() -> None:
            if self.loading:
                self._after_load.append(run)
            else:
                step()
        self.scheduler.control(run)

    def switch_config(self, new: Config, force_model: bool = False, then: Callable[[], None] | None = None) -> None:
        """Worker thread, between requests: put `new` in force, loading its model first when
        the model settings changed (or `force_model`), then call `then`. The engine in service
        keeps serving while the new model loads. When that model does not load, the previous
        config and engine stay in force and config_error says why."""
        model_changed = new.model_identity() != self.config.model_identity()

        def commit(loaded: bool) -> None:
            if not loaded and model_changed:
                assert self.load_error is not None
                self.apply_error = f"the model it names did not load: {self.load_error.message}"
            else:
                self.config = new
                self.apply_error = None
            if then is not None:
                then()

        if not (force_model or model_changed):
            if self.engine is not None:
                self.load_error = None  # an earlier failed model change is moot: this config's model serves
            commit(True)
        elif self.engine is not None:
            self.load_beside(new, commit)
        else:
            commit(self.load(new))


def is_oom(exc: BaseException) -> bool:
    try:
        import torch
    except ImportError:
        return False
    oom = getattr(torch.cuda, "OutOfMemoryError", None) or getattr(torch, "OutOfMemoryError", None)
    return oom is not None and isinstance(exc, oom)


def failure_error(engine: FillEngine | Remote | None, exc: Exception) -> DgemmaError:
    """The wire error for an exception a request raised (the caller logs it, with its context).
    Out of memory gives back what the prefix cache holds (it only saves prefill time) and the CUDA
    cache, and the server goes on; anything else is a bug: `internal`."""
    if is_oom(exc):
        if engine is not None and not isinstance(engine, Remote):
            engine.prefix_cache.clear()
        empty_cuda_cache()
        return DgemmaError("out_of_memory", "the GPU ran out of memory on this request; try a shorter context "
                                            "or fewer candidates")
    return DgemmaError("internal", f"internal error: {type(exc).__name__}: {exc}")


def empty_cuda_cache() -> None:
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except (ImportError, RuntimeError):  # no torch, or a CUDA error: there is nothing to hand back
        pass


def default_engine_factory(config: Config, model: str | None, device: str | None, progress: bool = False) -> FillEngine:
    from dgemma.engine.engine import Engine
    from dgemma.engine.loading import load_model

    return Engine(load_model(model, device=device, dtype=config.dtype, quantize=config.quantization,
                             progress=progress))
