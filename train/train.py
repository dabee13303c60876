"""Train the small DiffusionGemma code model that dgemma bundles.

    bash train/recipe.sh runs/bundled        # what shipped: tokenizer + one 115-minute run, ~2 hours
    python -m train.train --minutes 115 --no-bf16 --threads 2 --lm-phase 0.3 --out runs/a    # that run
    python -m train.train --steps 4000 --out runs/a            # step-based, fully deterministic
    python -m train.train --init-from runs/a/best --lm-phase 0 --lr 1e-3 --out runs/b   # continue
    python -m train.train --ship runs/b/best                   # copy into dgemma/bundled

The first --lm-phase of the schedule trains the shared encoder/decoder weights as a causal
language model on code alone (`lm_loss`): every token of a row is supervised, so the stack
learns code much faster than from the diffusion loss, which then adapts it to canvases.

The model's own objective (block diffusion with uniform-token noise): the clean prefix
goes through the encoder (causal, writes the KV cache), the canvas through the decoder;
canvas slots are corrupted to uniform random tokens at a per-example rate r ~ U(0, 1),
the loss is cross-entropy on the clean target at every non-pinned canvas position.
Half of the steps first run a detached pass and feed its logits back as
`self_conditioning_logits` (pinned positions as one-hot). Canvas layouts: see
train/data.py and docs/engine.md. Seeds are fixed; data order depends only on --seed.

The diffusion loss supervises only the ~20 middle tokens of each canvas, while the causal
encoder pass over the (up to 128-token) prefix is computed anyway and gets no signal. A
next-token loss on that pass (`--ar-weight`, through the same tied, soft-capped LM head)
supervises the shared weights on every prefix token for ~25 % more compute per step.
Checkpoints are still selected on the diffusion validation loss alone.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from train.config import VOCAB_SIZE, model_config, save_sampler_config
from train.corpus import MANIFEST, manifest_mismatch, read_sources, split
from train.data import Batcher, ExampleMaker, collate, lm_batch
from train.head_loss import softcapped_cross_entropy
from train.quickfill import pinned_onehot_logits, quick_fill

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "dgemma" / "bundled"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def next_token_loss(model, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the causal encoder's prediction of each next prefix token."""
    if ids.shape[1] < 2:  # a batch cut down to its <bos>: nothing to predict
        return hidden.new_zeros(())
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return softcapped_cross_entropy(h, model.lm_head.weight, ids[:, 1:].reshape(-1), model.final_logit_softcapping)[0]


def diffusion_loss(model, batch, gen: torch.Generator, self_condition: bool):
    """(diffusion loss, accuracy on the free slots, next-token loss of the encoder pass)."""
    x = batch["input_ids"]
    target, pinned, base = batch["target"], batch["pinned"], batch["base"]
    B, C = target.shape
    # Drawn on the CPU generator whatever the device: a run's noise depends on --seed alone.
    rate = torch.rand(B, 1, generator=gen).to(x.device)
    noise_mask = (torch.rand(B, C, generator=gen).to(x.device) < rate) & ~pinned
    noise = torch.randint(0, VOCAB_SIZE, (B, C), generator=gen).to(x.device)
    canvas = torch.where(noise_mask, noise, base)
    canvas = torch.where(pinned, target, canvas)
    sc = None
    if self_condition:
        with torch.no_grad():
            first = model(input_ids=x, decoder_input_ids=canvas, use_cache=True).logits
        sc = pinned_onehot_logits(first.detach(), target, pinned)
    out = model.model(input_ids=x, decoder_input_ids=canvas, self_conditioning_logits=sc, use_cache=True)
    free = ~pinned
    loss, acc = softcapped_cross_entropy(out.last_hidden_state[free], model.lm_head.weight, target[free],
                                         model.final_logit_softcapping)
    return loss, acc, next_token_loss(model, out.encoder_last_hidden_state, x)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token loss of the causal encoder alone over (B, L) code rows: the warm-up phase."""
    return next_token_loss(model, model.model.encoder(input_ids=ids).last_hidden_state, ids)


def make_val_batches(tok, val_sources, n: int, max_prefix: int, seed: int = 1234):
    maker = ExampleMaker(tok, val_sources, max_prefix=max_prefix, seed=seed)
    b = Batcher(maker, batch_size=16, pool_batches=n)
    return [collate(b.next_examples()) for _ in range(n)]


def make_val_fills(val_sources, n: int = 12, seed: int = 99):
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        _, text = rng.choice(val_sources)
        lines = text.splitlines(keepends=True)
        if len(lines) < 10:
            continue
        i = rng.randrange(3, len(lines) - 3)
        if not lines[i].strip() or len(lines[i]) > 100:
            continue
        a = sum(len(l) for l in lines[:i])
        cases.append((text[:a], lines[i], text[a + len(lines[i]):]))
    return cases


@torch.no_grad()
def evaluate(model, val_batches, val_fills, tok, seed: int = 0):
    """(validation diffusion loss, its next-token loss on the encoder pass, line exact match)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    losses, ar_losses = [], []
    for vb in val_batches:
        loss, _, ar = diffusion_loss(model, vb, gen, self_condition=False)
        losses.append(loss.item())
        ar_losses.append(ar.item())
    exact = 0
    for prefix, middle, suffix in val_fills:
        m = min(60, max(8, len(tok.encode(middle).ids) + 4))
        got = quick_fill(model, tok, prefix, suffix, m=m, generator=gen)
        exact += got.strip() == middle.strip()
    model.train()
    return sum(losses) / len(losses), sum(ar_losses) / len(ar_losses), exact / len(val_fills)


def save_checkpoint(model, path: Path, meta: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    save_sampler_config(path)
    for name in TOKENIZER_FILES:  # a checkpoint directory must be loadable on its own
        if (BUNDLED / name).is_file():
            shutil.copy(BUNDLED / name, path / name)
    (path / "train_state.json").write_text(json.dumps(meta, indent=2) + "\n")


def ship(src: Path, dst: Path = BUNDLED, dtype: str = "bfloat16") -> None:
    """Write the checkpoint at `src` into the package data folder (bf16, no vision tower)."""
    from safetensors.torch import load_file, save_file
    from transformers import DiffusionGemmaConfig

    cfg = DiffusionGemmaConfig.from_pretrained(str(src))
    cfg.dtype = dtype
    state = load_file(str(src / "model.safetensors"))
    dt = getattr(torch, dtype)
    state = {k: v.to(dt).contiguous() for k, v in state.items() if "vision" not in k}
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(dst / "model.safetensors", 0o644)  # package data: world-readable
    cfg.save_pretrained(str(dst))
    save_sampler_config(dst)
    meta = json.loads((src / "train_state.json").read_text())
    (dst / "train_state.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"shipped {src} -> {dst} ({(dst / 'model.safetensors').stat().st_size / 1e6:.1f} MB)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="wall-clock budget: cosine schedule over time, stop when spent")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-prefix", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ar-weight", type=float, default=0.5,
                    help="weight of the next-token loss on the causal encoder pass (0: diffusion only)")
    ap.add_argument("--lm-phase", type=float, default=0.5,
                    help="fraction of the schedule spent first on next-token prediction alone (0: none)")
    ap.add_argument("--lm-length", type=int, default=256, help="tokens per row in the next-token phase")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bundled")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on a CPU (1 is fastest on a shared, oversubscribed CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to train (default: cuda when there is one)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bf16 autocast for the forward/backward (weights and optimizer stay fp32)")
    ap.add_argument("--ship", type=Path, default=None, help="only ship this checkpoint")
    ap.add_argument("--ship-to", type=Path, default=BUNDLED, help="where --ship writes (default: dgemma/bundled)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start from this checkpoint's weights (continued training, new schedule)")
    ap.add_argument("--stop-file", type=Path, default=None,
                    help="stop cleanly (after a final checkpoint) when this file exists")
    args = ap.parse_args(argv)
    if args.ship:
        ship(args.ship, args.ship_to)
        return

    from transformers import DiffusionGemmaForBlockDiffusion

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tok = Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))
    sources = read_sources()
    mismatch = manifest_mismatch(sources)
    train_src, val_src = split(sources)
    log(f"corpus: {len(train_src)} train files, {len(val_src)} val files, "
        + (f"NOT the files of {MANIFEST.name}: {mismatch}" if mismatch else f"as listed in {MANIFEST.name}"))
    if args.init_from:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(args.init_from, dtype=torch.float32)
    else:
        model = DiffusionGemmaForBlockDiffusion(model_config(args.preset))
    device = torch.device(args.device)
    model.to(device)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "vision" not in n)
    log(f"model: {n_params / 1e6:.2f} M parameters (without the vision stub)")
    model.train()

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.ndim >= 2 and "vision" not in n else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    def progress(step):
        """Fraction of the schedule done: by steps, or by wall time with --minutes (the
        CPU may be shared, so a time budget is the reliable way to finish on time)."""
        if args.minutes:
            return (time.time() - t0) / (args.minutes * 60)
        return step / args.steps

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = max(0.0, progress(step))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    maker = ExampleMaker(tok, train_src, max_prefix=args.max_prefix, seed=args.seed)
    batcher = Batcher(maker, batch_size=args.batch_size)
    val_batches = [to_device(b, device) for b in make_val_batches(tok, val_src, 6, args.max_prefix)]
    val_fills = make_val_fills(val_src)
    gen = torch.Generator().manual_seed(args.seed + 1)
    sc_rng = random.Random(args.seed + 2)

    args.out.mkdir(parents=True, exist_ok=True)
    best = float("inf")
    t0 = time.time()
    run_loss = run_acc = run_ar = 0.0
    ntok = 0
    total_steps = args.steps if not args.minutes else 10**9
    for step in range(total_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        warm_up = progress(step) < args.lm_phase
        if warm_up:
            ids = lm_batch(maker, args.batch_size, args.lm_length).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                ar_loss = lm_loss(model, ids)
            loss = acc = torch.zeros(())  # no diffusion pass: logged as 0
            total = ar_loss
            ntok += ids.numel()
        else:
            batch = to_device(collate(batcher.next_examples()), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss, acc, ar_loss = diffusion_loss(model, batch, gen, self_condition=sc_rng.random() < 0.5)
            total = loss + args.ar_weight * ar_loss
            ntok += batch["input_ids"].numel() + batch["target"].numel()
        opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run_loss += loss.item()
        run_acc += acc.item()
        run_ar += ar_loss.item()
        if (step + 1) % 25 == 0:
            el = time.time() - t0
            log(f"step {step + 1} loss {run_loss / 25:.3f} acc {run_acc / 25:.3f} next-token {run_ar / 25:.3f} "
                f"gnorm {gnorm:.2f} lr {lr_at(step):.2e} {ntok / el:.0f} tok/s {el / (step + 1):.2f} s/step")
            run_loss = run_acc = run_ar = 0.0
        stop = args.stop_file is not None and args.stop_file.exists()
        stop = stop or (args.minutes and progress(step) >= 1.0)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps or stop:
            vloss, vnext, vexact = evaluate(model, val_batches, val_fills, tok)
            meta = {"step": step + 1, "val_loss": vloss, "val_next_token_loss": vnext, "val_line_exact": vexact,
                    "train_seconds": round(time.time() - t0), "params": n_params,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "torch": torch.__version__, "python": sys.version.split()[0]}
            save_checkpoint(model, args.out / "latest", meta)
            if vloss < best and not warm_up:  # the diffusion loss means little before that phase
                best = vloss
                if (args.out / "best").exists():
                    shutil.rmtree(args.out / "best")
                shutil.copytree(args.out / "latest", args.out / "best")
            log(f"eval step {step + 1}: val loss {vloss:.3f} (best {best:.3f}) next-token {vnext:.3f} "
                f"line exact {vexact:.3f}{' (next-token phase)' if warm_up else ''}")
        if stop:
            log("time budget spent or stop file found: stopping")
            break
    log(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
