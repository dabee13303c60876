"""Language-server settings, from ``initializationOptions`` or ``workspace/didChangeConfiguration``.

Editors send camelCase (``debounceMs``) or snake_case; both are accepted, and
the options may sit at the top level or under a ``dgemma`` key (VS Code sends
its whole settings section that way).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from dgemma.lsp.context import Budget


@dataclass(frozen=True)
class Settings:
    # Wait this long after the last keystroke before asking the model; a burst
    # of typing then costs one call. Invoked triggers never wait.
    debounce_ms: int = 100
    # Automatic triggers are skipped with more text than this right of the cursor.
    max_line_suffix: int = 8
    # Middle tokens the model may write: short for ghost text while typing,
    # longer when the user explicitly asks.
    max_tokens_automatic: int = 128
    max_tokens_invoked: int = 256
    # Ghost text longer than this many lines is cut (automatic triggers only).
    max_lines_automatic: int = 16
    # The context window's budget (lsp/context.py decides its defaults).
    prefix_tokens: int = Budget.prefix_tokens
    suffix_tokens: int = Budget.suffix_tokens
    extra_tokens: int = Budget.extra_tokens
    chunk_lines: int = Budget.chunk_lines
    ring_size: int = 16
    # Candidates the daemon decodes for one fill.
    n: int = 1
    # Fixed seed for reproducible completions (tests, benchmarks); None = random.
    seed: int | None = None
    # Edit strength: share of the selection renoised before a rewrite.
    strength: float = 0.5
    # Sampler overrides sent with each request (e.g. {"max_denoising_steps": 16}
    # for faster, rougher ghost text); the daemon's config supplies the rest.
    sampler: dict[str, Any] = field(default_factory=dict)
    # Seconds before retrying a daemon whose model failed to load.
    retry_after_s: float = 30.0
    # Next-edit suggestions (dgemma/nextEdit): answered at all; sent unasked after an edit and a
    # pause of next_edit_debounce_ms (clients that show them opt in); lines the edit may change.
    next_edit: bool = True
    next_edit_notify: bool = False
    next_edit_debounce_ms: int = 500
    next_edit_region_lines: int = 20

    @property
    def budget(self) -> Budget:
        return Budget(self.prefix_tokens, self.suffix_tokens, self.extra_tokens, self.chunk_lines)

    def merged(self, options: Any) -> tuple["Settings", list[str]]:
        """A copy with the known keys of ``options`` applied, and what was wrong with them: a bad
        value keeps the current one rather than breaking the server, and is reported. Unknown keys
        are ignored (a client may keep its own settings in the same section)."""
        if not isinstance(options, dict):
            return self, []
        if isinstance(options.get("dgemma"), dict):
            options = options["dgemma"]
        known = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        problems: list[str] = []
        for key, value in options.items():
            name = re.sub(r"(?<!^)(?=[A-Z])", "_", str(key)).lower()
            if name not in known:
                continue
            current = getattr(self, name)
            try:
                # By name first: the seed's current value may be an int, and None (random) is valid.
                if name == "seed":
                    changes[name] = None if value is None else int(value)
                elif isinstance(current, bool):
                    changes[name] = bool(value)
                elif isinstance(current, int) and not isinstance(current, bool):
                    changes[name] = int(value)
                elif isinstance(current, float):
                    changes[name] = float(value)
                elif name == "sampler":
                    if not isinstance(value, dict):
                        raise TypeError(name)
                    changes[name] = dict(value)
                else:
                    changes[name] = value
            except (TypeError, ValueError):
                problems.append(f"setting `{key}`: {value!r:.40} is not a valid {known[name].type}; "
                                f"keeping {current!r:.40}")
        return dataclasses.replace(self, **changes), problems
