"""What the layers above the engine need of it: the daemon's model host and worker, and the command
line's in-process path, see an engine only through `FillEngine`, and get `Result`s and `Draft`s back.

`engine.Engine` is the one implementation; `daemon/host.py`'s `engine_factory` may hand the host any
object of this shape (the tests script one). Nothing here imports torch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dgemma.engine.settings import SamplerSettings


@dataclass
class Completion:
    text: str
    score: float  # mean log-probability of the chosen tokens (and the closing <eos>)
    agreement: float  # mean edit similarity of its first canvas to the request's other first-canvas rows
    fit: float | None  # log p(suffix's first tokens | prefix + first canvas), when ranked by it (ranking.py)
    tokens: int
    finished: bool  # the model closed the middle with <eos> (False: cut by the token budget)


@dataclass
class Draft:
    text: str
    step: int
    canvas: int


@dataclass
class Result:
    completions: list[Completion]
    steps: int = 0
    canvases: int = 0
    rows: int = 0  # canvas rows decoded, over every canvas and batch
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefix_dropped: int = 0  # characters at the start of the prefix the model did not see (engine/window.py)
    suffix_dropped: int = 0  # characters at the end of the suffix it did not see
    ms: float = 0.0
    seed: int = 0
    model: str = ""

    @property
    def text(self) -> str:
        return self.completions[0].text


class CancelSignal(Protocol):
    """Checked between denoising steps (a `threading.Event`, the daemon's `CancelFlag`)."""

    def is_set(self) -> bool: ...


class ReleasableCache(Protocol):
    """Memory that only saves time: the daemon empties it when the GPU runs out."""

    def clear(self) -> None: ...


class FillEngine(Protocol):
    """An engine as the daemon and the command line use it (docs/engine.md, "Python API").
    Not thread-safe: one worker thread calls it."""

    @property
    def model_name(self) -> str:
        """The loaded model's name, as `status` and every result show it."""
        ...

    @property
    def device(self) -> Any:
        """Where the model runs (a torch.device); `status` shows it as a string."""
        ...

    @property
    def prefix_cache(self) -> ReleasableCache: ...

    def fill(self, prefix: str, suffix: str, *, n: int = 1, max_tokens: int = 256, max_lines: int | None = None,
             min_tokens: int = 0, accept: Callable[[str], bool] | None = None, seed: int | None = None,
             settings: SamplerSettings | dict | None = None, on_step: Callable[[Draft], None] | None = None,
             cancel: CancelSignal | None = None, deadline: float | None = None) -> Result: ...

    def edit(self, prefix: str, selection: str, suffix: str, instruction: str, *, n: int = 1,
             strength: float = 0.5, max_tokens: int | None = None, min_tokens: int = 0,
             accept: Callable[[str], bool] | None = None, seed: int | None = None,
             settings: SamplerSettings | dict | None = None, on_step: Callable[[Draft], None] | None = None,
             cancel: CancelSignal | None = None, deadline: float | None = None) -> Result: ...
