"""Logit quality of 4-bit weights against the bf16 model (and the fp32 one): relative error and
top-1 agreement.

    python bench/quant_quality.py            # tiny random checkpoints (+ the bundled model if present)
    python bench/quant_quality.py --model DIR
    python bench/quant_quality.py --quick    # one tiny random model, 2 prompts: a smoke run

Each model runs one encoder+decoder pass (8 prompts of 64 tokens, one canvas each) in fp32 and in
bf16; each 4-bit recipe then quantizes the bf16 model (as `dgemma quantize` does a bf16 checkpoint)
and runs the same pass in bf16, as the daemon does on a GPU. Its error against the bf16 model is what
4-bit costs; against fp32 it also includes bf16's own rounding (the bf16 row).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import dgemma  # noqa: F401  (first: it moves this folder, whose kernels.py shadows a package, behind site-packages)
import torch
from transformers import DiffusionGemmaForBlockDiffusion

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [  # (label, experts, dense), each on top of the bf16 model
    ("NVFP4 experts", "nvfp4", None),
    ("NVFP4 experts + NVFP4 dense", "nvfp4", "nvfp4"),
    ("NF4 experts", "nf4", None),
    ("NF4 experts + NF4 dense (bnb)", "nf4", "nf4"),
]


def _logits(model, ids, canvas):
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=canvas).logits.float()


def code_inputs(model_dir: Path, canvas_len: int, rows: int = 8, prompt: int = 64, seed: int = 0):
    """Prompts and half-renoised canvases cut from held-out Python files (those the bundled
    model's CORPUS.txt marks 'val'), or None when the corpus or tokenizer is missing."""
    corpus, tok_file = model_dir / "CORPUS.txt", model_dir / "tokenizer.json"
    if not corpus.exists() or not tok_file.exists():
        return None
    from tokenizers import Tokenizer

    lines = corpus.read_text().splitlines()
    root = next((ln.split(" at ", 1)[1] for ln in lines if "standard library at " in ln), None)
    files = [ln.split("\t")[0] for ln in lines if ln.endswith("\tval")]
    if root is None or not files:
        return None
    tok = Tokenizer.from_file(str(tok_file))
    ids: list[int] = []
    for f in files:
        path = Path(root) / f
        if path.exists():
            ids += tok.encode(path.read_text(errors="replace")).ids
    need = prompt + canvas_len
    if len(ids) < rows * need:
        return None
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - need, (rows,), generator=g).tolist()
    windows = torch.tensor([ids[s:s + need] for s in starts])
    canvas = windows[:, prompt:].clone()
    noise = torch.rand(canvas.shape, generator=g) < 0.5  # a canvas mid-denoising
    canvas[noise] = torch.randint(3, tok.get_vocab_size(), (int(noise.sum()),), generator=g)
    return windows[:, :prompt], canvas


def _compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative error, top-1 agreement) of logits against a reference."""
    return ((out - ref).norm() / ref.norm()).item(), (out.argmax(-1) == ref.argmax(-1)).float().mean().item()


def _cells(rel: float, top1: float) -> str:
    """Error and agreement cells; "—" where there is nothing to compare (reference, skipped recipe)."""
    return "— | —" if math.isnan(rel) else f"{rel:.4f} | {top1 * 100:.1f}%"


def evaluate(
    model: DiffusionGemmaForBlockDiffusion, seed: int = 0, inputs: tuple | None = None, rows: int = 8
) -> list[tuple[str, float, float, float, float]]:
    """(recipe, error vs bf16, top-1 vs bf16, error vs fp32, top-1 vs fp32) for bf16 and each recipe;
    NaN where there is nothing to compare."""
    from dgemma.quant.apply import quantize_model

    model = model.float().eval()
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    if inputs is None:
        ids = torch.randint(3, vocab, (rows, 64), generator=g)
        canvas = torch.randint(3, vocab, (rows, model.config.canvas_length or 64), generator=g)
    else:
        ids, canvas = inputs
    ref32 = _logits(model, ids, canvas)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    ref16 = _logits(bf16, ids, canvas)
    out = [("bf16 weights and activations (the reference)", float("nan"), float("nan"), *_compare(ref16, ref32))]
    for label, experts, dense in RECIPES:
        m = copy.deepcopy(bf16)
        try:
            quantize_model(m, experts, dense=dense)
        except ValueError as exc:  # e.g. widths that are not a multiple of NF4's block of 64
            out.append((label, *[float("nan")] * 4))
            print(f"  {label}: skipped ({exc})", file=sys.stderr)
            continue
        m.train()  # bitsandbytes' reference dequantize path on CPU, not its repacked kernel
        logits = _logits(m, ids, canvas)
        out.append((label, *_compare(logits, ref16), *_compare(logits, ref32)))
    return out


def weight_errors() -> list[tuple[str, str, float, float]]:
    """Reconstruction error of one expert-shaped weight [1408, 2816]: (dist, fmt, rel. error, bits/weight)."""
    from dgemma.quant.formats import quantize

    torch.manual_seed(0)  # StudentT.sample takes no generator
    g = torch.Generator().manual_seed(0)
    dists = {
        "gaussian": torch.randn(1408, 2816, generator=g),
        "student-t (df 3)": torch.distributions.StudentT(3.0).sample((1408, 2816)),
    }
    rows = []
    for name, w in dists.items():
        for fmt in ("nvfp4", "nf4"):
            q = quantize(w, fmt)
            rel = ((q.dequantize() - w).norm() / w.norm()).item()
            rows.append((name, fmt, rel, q.nbytes() * 8 / w.numel()))
    return rows


def _step(model_dir: Path) -> str:
    import json

    state = model_dir / "train_state.json"
    return f" (training step {json.loads(state.read_text()).get('step')})" if state.exists() else ""


def _tiny(seed: int, **text) -> DiffusionGemmaForBlockDiffusion:
    sys.path.append(str(ROOT / "tests"))
    from tiny import tiny_config

    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(tiny_config(**text))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory to evaluate instead of the defaults")
    ap.add_argument("--quick", action="store_true",
                    help="2 prompts, no weight table, and without --model only the smallest tiny model")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = 2 if args.quick else 8
    models: list[tuple[str, DiffusionGemmaForBlockDiffusion, tuple | None]] = []
    if args.model:
        m = DiffusionGemmaForBlockDiffusion.from_pretrained(args.model, dtype=torch.float32)
        models.append((args.model, m, code_inputs(Path(args.model), m.config.canvas_length or 64, rows)))
    else:
        models.append(("tiny random (H 64, 4 experts top-2, I 64)", _tiny(0, moe_intermediate_size=64), None))
        bundled = ROOT / "dgemma" / "bundled"
        if not args.quick:
            models.append(("tiny random (H 256, 16 experts top-4, I 128)", _tiny(
                1, hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64, global_head_dim=64,
                num_experts=16, top_k_experts=4, moe_intermediate_size=128, num_hidden_layers=4,
                layer_types=["sliding_attention"] * 3 + ["full_attention"]), None))
        if not args.quick and (bundled / "config.json").exists() and any(bundled.glob("*.safetensors")):
            m = DiffusionGemmaForBlockDiffusion.from_pretrained(bundled, dtype=torch.float32)
            models.append((f"bundled model{_step(bundled)}, held-out stdlib code", m,
                           code_inputs(bundled, m.config.canvas_length)))
    if not args.quick:
        print("| weights | format | rel. error | bits per weight |")
        print("|---|---|---|---|")
        for name, fmt, rel, bits in weight_errors():
            print(f"| {name} [1408 x 2816] | {fmt} | {rel:.4f} | {bits:.3f} |")
        print()
    print("| model | weights | logits rel. error vs bf16 | top-1 vs bf16 | rel. error vs fp32 | top-1 vs fp32 |")
    print("|---|---|---|---|---|---|")
    for name, model, inputs in models:
        for label, rel16, top16, rel32, top32 in evaluate(model, inputs=inputs, rows=rows):
            print(f"| {name} | {label} | {_cells(rel16, top16)} | {_cells(rel32, top32)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
