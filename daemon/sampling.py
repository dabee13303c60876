"""Sampler settings: the knobs of the block-diffusion loop, validated once at the edge."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from dgemma.daemon.errors import DgemmaError

MAX_DRAWS = 16
RANKINGS = ("agreement", "suffix_fit")


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
    rank_by: str = "agreement"  # or "suffix_fit" (suffix_fit.py): needs an encoder that predicts the next token
    draft_strength: float = 0.0  # > 0: fills also start rows from nearby lines, this share renoised

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_denoising_steps, int) or not 1 <= self.max_denoising_steps <= 1024:
            problems.append("max_denoising_steps must be an integer in 1..1024")
        if not 0 < self.t_min < self.t_max:
            problems.append("temperatures need 0 < t_min < t_max")
        if not self.entropy_bound > 0:
            problems.append("entropy_bound must be > 0")
        if not isinstance(self.stability_threshold, int) or self.stability_threshold < 0:
            problems.append("stability_threshold must be an integer >= 0")
        if not self.confidence_threshold > 0:
            problems.append("confidence_threshold must be > 0")
        if not isinstance(self.draws, int) or not 1 <= self.draws <= MAX_DRAWS:
            problems.append(f"draws must be an integer in 1..{MAX_DRAWS}")
        if not 0.0 <= self.draft_strength < 1.0:
            problems.append("draft_strength must be in [0, 1)")
        if self.rank_by not in RANKINGS:
            problems.append(f"rank_by must be one of {', '.join(RANKINGS)}")
        if problems:
            raise DgemmaError("invalid_params", "Invalid sampler settings: " + "; ".join(problems) + ".")

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None, base: SamplerSettings | None = None) -> SamplerSettings:
        """Overlay known keys of ``values`` (a config file, request params, a generation config)
        on ``base``; unknown keys are an error so typos do not pass silently."""
        base = base or cls()
        values = {k: v for k, v in (values or {}).items() if v is not None}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise DgemmaError("invalid_params", f"Unknown sampler setting(s): {', '.join(unknown)}.")
        try:
            return replace(base, **values)
        except TypeError as exc:
            raise DgemmaError("invalid_params", f"Invalid sampler settings: {exc}.") from None

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
