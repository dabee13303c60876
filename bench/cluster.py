"""Fills per second from a team server (`dgemma cluster up`) with one replica and with two, in one run.

    python bench/cluster.py [--clients 4] [--seconds 20] [--replicas 1,2]

Starts a local Ray cluster in a private temporary folder (your own config and runtime folders
are not touched), deploys the bundled model with each replica count in turn, and runs `--clients`
threads, each filling in its own document as fast as it is answered, through the daemon's remote
client (the path an editor's request takes after the local daemon). The documents are chosen so
that each replica serves as many as the others. Every replica reserves one CPU and computes on one
thread, so the ratio shows how the application scales with replicas, not how fast one CPU is.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import cpu_name

from dgemma.daemon.remote import Remote

FILL = {"prefix": "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return ",
        "suffix": "\n\n\nprint(mean([1, 2, 3]))\n", "max_tokens": 16}
SAMPLER = "[sampler]\nmax_denoising_steps = 4\n"


def dgemma(args: list[str], env: dict[str, str], cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "dgemma.cli", *args], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"dgemma {' '.join(args)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout) if "--json" in args else {}


def spread_documents(remote: Remote, clients: int, replicas: int) -> list[str]:
    """`clients` documents, as many on each replica as on any other."""
    per = -(-clients // replicas)
    homes: dict[str, list[str]] = {}
    for i in range(1000):
        doc = f"file:///bench/doc{i}.py"
        bucket = homes.setdefault(remote.status(doc)["replica"], [])
        if len(bucket) < per:
            bucket.append(doc)
        chosen = [d for b in homes.values() for d in b]
        if len(homes) >= replicas and len(chosen) >= clients and all(len(b) == per for b in homes.values()):
            return chosen[:clients]
    raise SystemExit("could not spread the documents over the replicas")


def measure(remote: Remote, documents: list[str], seconds: float) -> tuple[float, int]:
    """(fills per second, fills) over `seconds`, one thread per document."""
    for doc in documents:  # warm each replica's prefix cache, as an editor's first keystroke does
        remote.forward("fill", FILL, document=doc)
    done = [0] * len(documents)
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        seed = 0
        while time.monotonic() < stop:
            remote.forward("fill", {**FILL, "seed": seed}, document=documents[i])
            done[i] += 1
            seed += 1
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(documents))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - t0), sum(done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--replicas", default="1,2")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dgbench-", dir="/tmp"))
    env = {**os.environ, "DGEMMA_RUNTIME_DIR": str(root / "run"), "DGEMMA_CONFIG_DIR": str(root / "cfg")}
    (root / "cfg").mkdir()
    rates = {}
    try:
        for n in (int(x) for x in args.replicas.split(",")):
            (root / "cfg" / "config.toml").write_text(f"{SAMPLER}\n[cluster]\nreplicas = {n}\nport = 18399\n")
            st = dgemma(["cluster", "up", "--json", "--num-cpus", str(max(2, n))], env, root)
            remote = Remote(st["url"], root / "cfg" / "cluster.token")
            rate, fills = measure(remote, spread_documents(remote, args.clients, n), args.seconds)
            rates[n] = rate
            print(f"{n} replica(s): {rate:.2f} fills/s ({fills} fills, {args.clients} clients, {args.seconds:.0f} s)",
                  flush=True)
    finally:
        subprocess.run([sys.executable, "-m", "dgemma.cli", "cluster", "down"], env=env, cwd=root,
                       capture_output=True, timeout=300)
        shutil.rmtree(root, ignore_errors=True)
    if 1 in rates and len(rates) > 1:
        for n, rate in rates.items():
            if n != 1:
                print(f"{n} replicas / 1 replica: {rate / rates[1]:.2f}x")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
