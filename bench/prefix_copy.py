"""What a prefix-cache hit costs to copy back: memory copy bandwidth and an 8k-token 26B-A4B prefix.

    python bench/prefix_copy.py [--repeats 9] [--mib 512]

A prefix-cache entry (engine/prefix_cache.py) lives in host memory; a hit copies it back to the
model's device. The entry of an 8k-token prefix of the 26B-A4B is the plan's KV cache at 8192
tokens with its sliding layers at their window (engine/plan.py `kv_cache_bytes`, 0.35 GiB). This
times `Tensor.copy_` of a buffer of that order:

* host to host, always: what this machine's memory moves (the copy a CPU engine's hit makes);
* pinned host to GPU with non_blocking=True, timed with CUDA events, only where CUDA is available
  (the copy a GPU engine's hit makes, over PCIe or the chip-to-chip link). Without a GPU it prints
  that this figure was not measured.

The implied time of the 8k-token prefix is its bytes over the median bandwidth.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from dgemma.engine.plan import GIB, kv_cache_bytes
from dgemma.quant.meta import load_config
from machine import cpu_name  # bench/ is this script's folder

PREFIX_TOKENS = 8192


def prefix_bytes() -> int:
    """Bytes of a prefix-cache entry of an 8k-token 26B-A4B prefix (keys and values, bf16)."""
    return sum(kv_cache_bytes(load_config("diffusiongemma-26B-A4B"), PREFIX_TOKENS).values())


def bandwidth(copy: Callable[[], float], nbytes: int, repeats: int) -> tuple[float, float]:
    """Median and best bytes per second of `copy`, which returns its own seconds (one warm-up first)."""
    copy()
    rates = [nbytes / copy() for _ in range(repeats)]
    return statistics.median(rates), max(rates)


def host_copy(nbytes: int) -> Callable[[], float]:
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    dst = torch.empty_like(src)

    def run() -> float:
        start = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - start
    return run


def pinned_to_gpu(nbytes: int) -> Callable[[], float]:
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, pin_memory=True)
    dst = torch.empty(src.shape, dtype=src.dtype, device="cuda")
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run() -> float:
        begin.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    return run


def report(repeats: int, mib: int) -> None:
    nbytes, prefix = mib << 20, prefix_bytes()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, load average "
          f"{load:.1f}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"8k-token 26B-A4B prefix-cache entry: {prefix / GIB:.3f} GiB; copies of {mib} MiB, {repeats} repeats\n")
    print("| copy | bandwidth, median (best) | 8k-token prefix, median |\n|---|---|---|")
    copies = {"host to host (torch copy_)": host_copy}
    if torch.cuda.is_available():
        copies[f"pinned host to {torch.cuda.get_device_name()} (non_blocking)"] = pinned_to_gpu
    for label, make in copies.items():
        median, best = bandwidth(make(nbytes), nbytes, repeats)
        print(f"| {label} | {median / 1e9:.1f} GB/s ({best / 1e9:.1f}) | {prefix / median * 1e3:.1f} ms |")
    if not torch.cuda.is_available():
        print("| pinned host to GPU | not measured: no GPU here | - |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--mib", type=int, default=512, help="size of the copied buffer")
    args = parser.parse_args(argv)
    report(args.repeats, args.mib)


if __name__ == "__main__":
    main()
