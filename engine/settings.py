"""Sampler settings: the knobs of the block-diffusion loop, validated once at the edge."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from dgemma.errors import DgemmaError

MAX_DRAWS = 16
RANKINGS = ("agreement", "suffix_fit")
MAX_STEPS = 1024
MAX_LINE_CANVAS = 4096
# Every setting's type and range, checked one by one wherever settings come from (a request, the
# config file, a checkpoint): (kind, low, high, low inclusive, what to say). Numbers must be
# finite; the bounds keep every value representable in the model's float32/bf16 arithmetic.
_SPECS: dict[str, tuple[type, float, float, bool, str]] = {
    "max_denoising_steps": (int, 1, MAX_STEPS, True, f"an integer in 1..{MAX_STEPS}"),
    "t_max": (float, 0.0, 100.0, False, "a number in (0, 100]"),
    "t_min": (float, 0.0, 100.0, False, "a number in (0, 100]"),
    "entropy_bound": (float, 0.0, 1e6, False, "a number in (0, 1e6]"),
    "stability_threshold": (int, 0, MAX_STEPS, True, f"an integer in 0..{MAX_STEPS}"),
    "confidence_threshold": (float, 0.0, 1e6, False, "a number in (0, 1e6]"),
    "draws": (int, 1, MAX_DRAWS, True, f"an integer in 1..{MAX_DRAWS}"),
    "draft_strength": (float, 0.0, 1.0, True, "a number in [0, 1)"),
    "line_canvas": (int, 0, MAX_LINE_CANVAS, True, f"an integer in 0..{MAX_LINE_CANVAS} (0: off)"),
    "line_draws": (int, 1, MAX_DRAWS, True, f"an integer in 1..{MAX_DRAWS}"),
}


def check_setting(name: str, value: Any) -> Any:
    """`value` as setting `name` takes it (an integer for a float setting becomes a float);
    DgemmaError(invalid_params) for a wrong type, a non-finite number or one out of range."""
    if name == "rank_by":
        if value not in RANKINGS or not isinstance(value, str):
            raise DgemmaError("invalid_params", f"Invalid sampler settings: rank_by must be one of {', '.join(RANKINGS)}.")
        return value
    kind, low, high, low_ok, what = _SPECS[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and kind is int:
        ok = isinstance(value, int)
    if ok:
        value = kind(value) if kind is float else value
        ok = math.isfinite(value) and (low <= value if low_ok else low < value) and value <= high
        if name == "draft_strength":
            ok = ok and value < 1.0
    if not ok:
        raise DgemmaError("invalid_params", f"Invalid sampler settings: {name} must be {what}, not {value!r:.40}.")
    return value


def check_settings(values: Any) -> dict[str, Any]:
    """Sampler overrides (a map of known names to values) checked one by one; the checked copy.
    Cross-setting rules (t_min < t_max) are checked when they are laid over their defaults."""
    if not isinstance(values, dict):
        raise DgemmaError("invalid_params", "Sampler settings must be a map.")
    names = {f.name for f in fields(SamplerSettings)}
    unknown = [k for k in values if k not in names]
    if unknown:
        shown = ", ".join(repr(k)[:40] for k in unknown[:8])
        raise DgemmaError("invalid_params", f"Unknown sampler setting(s): {shown}.")
    return {k: check_setting(k, v) for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class SamplerSettings:
    """Defaults are DiffusionGemma's (transformers' generation defaults)."""

    max_denoising_steps: int = 48
    t_max: float = 0.8
    t_min: float = 0.4
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    # Not DiffusionGemma's: which rows dgemma decodes for a request and how it picks among them
    # (docs/engine.md, "Choosing a row"); a checkpoint's dgemma_sampler.json may set them.
    draws: int = 1  # canvases drawn per middle length; the n alternatives are the best distinct ones
    rank_by: str = "agreement"  # or "suffix_fit" (ranking.py): needs an encoder that predicts the next token
    draft_strength: float = 0.0  # > 0: fills also start rows from nearby lines, this share renoised
    # The line plan (docs/engine.md, "One line"): a fill of one line (max_lines=1) decodes a canvas
    # of line_canvas positions (at most the model's; 0 decodes it like any fill), line_draws draws
    # of each of its two middle lengths.
    line_canvas: int = 64
    line_draws: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, check_setting(f.name, getattr(self, f.name)))
        if not self.t_min < self.t_max:
            raise DgemmaError("invalid_params", "Invalid sampler settings: temperatures need 0 < t_min < t_max.")

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None, base: SamplerSettings | None = None) -> SamplerSettings:
        """Overlay known keys of ``values`` (a config file, request params, a generation config)
        on ``base``; unknown keys are an error so typos do not pass silently."""
        base = base or cls()
        return replace(base, **check_settings(values or {}))

    @classmethod
    def from_generation_config(cls, generation_config: Any) -> SamplerSettings:
        """Defaults a checkpoint ships in its generation_config.json."""
        get = lambda name: getattr(generation_config, name, None)  # noqa: E731
        sampler = get("sampler_config")
        bound = getattr(sampler, "entropy_bound", None) if sampler is not None else None
        return cls.from_mapping({
            "max_denoising_steps": get("max_denoising_steps"), "t_max": get("t_max"), "t_min": get("t_min"),
            "entropy_bound": bound, "stability_threshold": get("stability_threshold"),
            "confidence_threshold": get("confidence_threshold"),
        })

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def temperature(self, steps_left: int) -> float:
        """Linear schedule: t_max at the first step, t_min + (t_max - t_min)/N at the last
        (``steps_left`` counts down from N to 1, as in transformers)."""
        return self.t_min + (self.t_max - self.t_min) * (steps_left / self.max_denoising_steps)
