"""Keystroke-to-ghost-text latency through `dgemma lsp`, against the engine's own time.

Per simulated keystroke: a didChange that inserts one character (never the one the
last suggestion starts with, so the cache cannot answer), then an invoked
textDocument/inlineCompletion; the latency is from sending the change to receiving
the ghost text. The engine's own time for that same fill is what the daemon
measured around `engine.fill` (`dgemma.status` returns it), so the difference is
everything dgemma adds: JSON-RPC both ways, context building, the daemon socket,
queueing, post-processing. Debounce is a deliberate wait and is set to 0 here.

A second series types *through* the suggestion: those keystrokes are answered
from the cache without a model call.

    python bench/lsp.py --tiny                  # a tiny random model (CPU-friendly)
    python bench/lsp.py --model DIR --keys 30   # a real checkpoint
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lsprotocol import types as t
from pygls.lsp.client import LanguageClient
from report import pct  # bench/ is this script's folder

ROOT = Path(__file__).resolve().parents[1]
URI = "file:///bench/example.py"
DOC = '''import math


def area(radius: float) -> float:
    """Area of a circle."""
    return math.pi * radius ** 2


def perimeter(radius: float) -> float:
    return '''


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            gpu = out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {gpu}, Python {platform.python_version()}"


def tiny_model(folder: Path) -> Path:
    sys.path.append(str(ROOT / "tests"))
    from tiny import build_tiny_checkpoint  # the tests' tiny random checkpoint

    return build_tiny_checkpoint(folder / "tiny")


async def run(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    client = LanguageClient("dgemma-bench", "0")
    ready = asyncio.Event()

    @client.feature(t.WINDOW_WORK_DONE_PROGRESS_CREATE)
    def _progress_create(params: Any) -> None:
        return None

    @client.feature(t.PROGRESS)
    def _progress(params: Any) -> None:
        return None

    @client.feature(t.WINDOW_SHOW_MESSAGE)
    def _message(params: t.ShowMessageParams) -> None:
        print(f"server: {params.message}", file=sys.stderr)

    @client.feature("dgemma/status")
    def _status(params: Any) -> None:
        if getattr(params, "state", None) in ("ready", "error"):
            ready.set()

    options = {"debounceMs": 0, "maxTokensInvoked": args.max_tokens, "seed": 0}
    if args.steps:
        options["sampler"] = {"max_denoising_steps": args.steps}
    await client.start_io(sys.executable, "-m", "dgemma.cli", "lsp", env=env)
    caps = t.ClientCapabilities(
        text_document=t.TextDocumentClientCapabilities(inline_completion=t.InlineCompletionClientCapabilities()),
        window=t.WindowClientCapabilities(work_done_progress=True))
    await client.initialize_async(t.InitializeParams(capabilities=caps, initialization_options=options))
    client.initialized(t.InitializedParams())
    t0 = time.monotonic()
    await asyncio.wait_for(ready.wait(), 600)
    startup_s = time.monotonic() - t0

    text = DOC
    version = 1
    client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri=URI, language_id="python", version=version, text=text)))

    def pos_end() -> t.Position:
        lines = text.split("\n")
        return t.Position(len(lines) - 1, len(lines[-1]))

    async def keystroke(ch: str) -> tuple[float, str | None]:
        nonlocal text, version
        version += 1
        start = pos_end()
        t_key = time.perf_counter()
        client.text_document_did_change(t.DidChangeTextDocumentParams(
            text_document=t.VersionedTextDocumentIdentifier(uri=URI, version=version),
            content_changes=[t.TextDocumentContentChangePartial(range=t.Range(start, start), text=ch)]))
        text += ch
        res = await client.text_document_inline_completion_async(t.InlineCompletionParams(
            text_document=t.TextDocumentIdentifier(URI), position=pos_end(),
            context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Invoked)))
        ms = (time.perf_counter() - t_key) * 1000
        ghost = None
        if res and res.items:
            ghost = res.items[0].insert_text if isinstance(res.items[0].insert_text, str) else res.items[0].insert_text.value
        return ms, ghost

    async def last_fill() -> dict[str, Any]:
        st = await client.workspace_execute_command_async(t.ExecuteCommandParams(command="dgemma.status"))
        lf = st["last_fill"] if isinstance(st, dict) else getattr(st, "last_fill")
        return lf if isinstance(lf, dict) else {k: getattr(lf, k) for k in ("engine_ms", "queue_ms", "server_ms")}

    # Warm-up: the first fill pays one-off costs (kernels, allocator, prefix cache).
    await keystroke("2")
    rows = []
    ghost: str | None = None
    alphabet = "rxq*+-"
    for i in range(args.keys):
        ch = next(c for c in alphabet[i % len(alphabet):] + alphabet if not (ghost or "").startswith(c))
        ms, ghost = await keystroke(ch)
        lf = await last_fill()
        rows.append({"lsp_ms": ms, "engine_ms": float(lf["engine_ms"]), "queue_ms": float(lf["queue_ms"]),
                     "server_ms": float(lf["server_ms"])})
    # Typing through the last suggestion: served from the cache.
    cached = []
    if ghost:
        for ch in ghost[: min(len(ghost) - 1, 10)]:
            if ch == "\n":
                break
            ms, _ = await keystroke(ch)
            cached.append(ms)

    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()

    lsp = [r["lsp_ms"] for r in rows]
    eng = [r["engine_ms"] for r in rows]
    added = [r["lsp_ms"] - r["engine_ms"] for r in rows]
    return {
        "machine": machine(),
        "model": args.label,
        "keys": args.keys,
        "max_tokens": args.max_tokens,
        "steps": args.steps or "model default",
        "startup_s": startup_s,
        "lsp_ms_p50": statistics.median(lsp), "lsp_ms_p90": pct(lsp, 0.9),
        "engine_ms_p50": statistics.median(eng),
        "added_ms_p50": statistics.median(added), "added_ms_p90": pct(added, 0.9),
        "added_pct_p50": statistics.median([a / e * 100 for a, e in zip(added, eng) if e > 0]),
        "queue_ms_p50": statistics.median(r["queue_ms"] for r in rows),
        "cache_hit_ms_p50": statistics.median(cached) if cached else None,
        "cache_hits": len(cached),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: $DGEMMA_MODEL or the bundled model)")
    ap.add_argument("--tiny", action="store_true", help="build and use a tiny random checkpoint")
    ap.add_argument("--keys", type=int, default=20, help="keystrokes that each cost a model call")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=0, help="max_denoising_steps (0: the model's default)")
    ap.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="dgb-") as tmp:
        root = Path(tmp)
        label = args.model or os.environ.get("DGEMMA_MODEL") or "bundled"
        if args.tiny and not args.model:
            args.model = str(tiny_model(root))
            label = "tiny random checkpoint (tests/tiny.py)"
        env = dict(os.environ)
        for name in ("rt", "cfg", "data"):
            (root / name).mkdir(mode=0o700)
        # A daemon of our own: the bench must not reuse (or stop) the user's.
        env.update(DGEMMA_RUNTIME_DIR=str(root / "rt"), DGEMMA_CONFIG_DIR=str(root / "cfg"),
                   DGEMMA_DATA_DIR=str(root / "data"))
        env.pop("DGEMMA_SOCKET", None)
        if args.model:
            env["DGEMMA_MODEL"] = args.model
        args.label = label
        try:
            res = asyncio.run(run(args, env))
        finally:
            subprocess.run([sys.executable, "-m", "dgemma.cli", "stop"], env=env, capture_output=True,
                           timeout=60)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"machine: {res['machine']}")
    print(f"model: {res['model']}; max_tokens {res['max_tokens']}; steps {res['steps']}; {res['keys']} keystrokes")
    print(f"daemon start + model load: {res['startup_s']:.1f} s")
    print(f"keystroke -> ghost text p50 {res['lsp_ms_p50']:.1f} ms (p90 {res['lsp_ms_p90']:.1f}); "
          f"engine p50 {res['engine_ms_p50']:.1f} ms")
    print(f"added by LSP + daemon: p50 {res['added_ms_p50']:.1f} ms (p90 {res['added_ms_p90']:.1f}), "
          f"{res['added_pct_p50']:.1f}% of the engine time (goal <= 20%)")
    if res["cache_hit_ms_p50"] is not None:
        print(f"typed-through (cache hit, no model call): p50 {res['cache_hit_ms_p50']:.1f} ms "
              f"over {res['cache_hits']} keystrokes")


if __name__ == "__main__":
    main()
