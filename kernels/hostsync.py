"""Count the operators a piece of code dispatches, and the ones that would make the host wait for a GPU.

A CUDA step runs at the speed of its weights only if the host never waits for the device inside it:
every `.item()`, `int(t)`, `bool(t)`, `nonzero()`, boolean-mask index or `.tolist()` copies a result
back and stalls the launch queue until the GPU has caught up, and it also makes the step impossible
to capture in one CUDA graph. Those operators run on any device, so the count is taken on a CPU (or on
fake tensors) through a TorchDispatchMode: what it reports for a CPU run is what the same code does on
a GPU.

What counts as a sync (ATen names): `_local_scalar_dense` (`.item()`, `int()`, `float()`, `bool()`),
`item`, `is_nonzero`, `equal`, `nonzero`, `argwhere`, `masked_select`, `unique` and its variants,
`bincount` and `histc` (their CUDA kernels read the input's range back unless histc is given one),
`repeat_interleave` without `output_size`, `index`/`index_put` with a boolean index (they become
`nonzero`), and a blocking copy between host and device either way (a copy to the device from
pageable memory waits for the stream too). On meta tensors (which stand in for a GPU in the tests),
"device" is meta.
`.tolist()` and `.numpy()` read memory without dispatching an operator, so `SyncCounter` also wraps
those two methods while it is active.
"""

from __future__ import annotations

import collections
import traceback
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators whose result the host must see before it can go on (their output is a Python value or
# has a shape that depends on the data).
SYNC_OPS = frozenset({
    "_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "argwhere", "masked_select",
    "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
    "bincount",
})
_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_"})


def _name(func) -> str:
    return func._schema.name.split("::", 1)[1]


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def sync_reason(func, args, kwargs) -> str | None:
    """Why dispatching ``func`` on these arguments would wait for the device, or None."""
    name = _name(func)
    if name in SYNC_OPS:
        return name
    if name == "histc":
        bounds = [*args[2:4]] + [kwargs[k] for k in ("min", "max") if k in kwargs]
        if len(bounds) < 2 or bounds[0] == bounds[1]:
            return "histc without a range"
    if name == "repeat_interleave" and func._overloadname != "self_int" and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if name in _INDEX_OPS and len(args) > 1:
        if any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1])):
            return f"{name} with a boolean mask"
    if name == "_to_copy" and kwargs.get("device") is not None:
        src, dst = args[0].device.type, torch.device(kwargs["device"]).type
        if src != "cpu" and dst == "cpu":
            return "copy to the host"
        if src == "cpu" and dst != "cpu":
            return "copy from the host"  # a blocking copy from pageable memory waits for the stream
    if name == "copy_":
        dst, src = args[0], args[1]
        if src.device.type != "cpu" and dst.device.type == "cpu":
            return "copy to the host"
        if src.device.type == "cpu" and dst.device.type != "cpu" and src.dim() > 0:
            return "copy from the host"
    return None


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as c: ...`` then ``c.ops`` (every operator dispatched, by name),
    ``c.syncs`` (the ones that would sync, by reason), ``c.where`` (one stack per reason) and
    ``c.views`` (how many of the operators only alias their input: no kernel runs for them)."""

    def __init__(self, stacks: bool = True) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
        self.where: dict[str, str] = {}
        self.views = 0
        self.stacks = stacks
        self._saved: dict[str, object] = {}

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def _note(self, reason: str) -> None:
        self.syncs[reason] += 1
        if self.stacks and reason not in self.where:
            self.where[reason] = "".join(traceback.format_stack(limit=14)[:-3])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[str(func)] += 1
        self.views += func.is_view
        reason = sync_reason(func, args, kwargs)
        if reason is not None:
            self._note(reason)
        return func(*args, **kwargs)

    def __enter__(self):
        for method in ("tolist", "numpy"):
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def wrapped(tensor, *a, _original=original, _method=method, **k):
                self._note(f".{_method}()")
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, method, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        self._saved.clear()
        return super().__exit__(*exc)

    def report(self) -> str:
        return "\n".join(f"{reason} x{n}\n{self.where.get(reason, '')}" for reason, n in self.syncs.items())
