"""Logit quality of 4-bit weights against the fp32 model: relative error and top-1 agreement.

    python bench/quant_quality.py            # tiny random checkpoints (+ the bundled model if present)
    python bench/quant_quality.py --model DIR

Each model runs one encoder+decoder pass (8 prompts of 64 random tokens, one canvas each) in fp32 as
the reference, then the same pass with bf16 weights and with each 4-bit recipe.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from transformers import DiffusionGemmaForBlockDiffusion

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [  # (label, experts, dense)
    ("bf16 weights", None, None),
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


def evaluate(
    model: DiffusionGemmaForBlockDiffusion, seed: int = 0, inputs: tuple | None = None
) -> list[tuple[str, float, float]]:
    from dgemma.quant.apply import quantize_model

    model = model.float().eval()
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    if inputs is None:
        ids = torch.randint(3, vocab, (8, 64), generator=g)
        canvas = torch.randint(3, vocab, (8, model.config.canvas_length or 64), generator=g)
    else:
        ids, canvas = inputs
    ref = _logits(model, ids, canvas)
    rows = []
    for label, experts, dense in RECIPES:
        m = copy.deepcopy(model)
        if experts is None:
            m = m.to(torch.bfloat16)
        else:
            try:
                quantize_model(m, experts, dense=dense)
            except ValueError as exc:  # e.g. widths that are not a multiple of NF4's block of 64
                rows.append((label, float("nan"), float("nan")))
                print(f"  {label}: skipped ({exc})", file=sys.stderr)
                continue
            m.train()  # bitsandbytes' reference dequantize path on CPU, not its repacked kernel
        out = _logits(m, ids, canvas)
        rel = ((out - ref).norm() / ref.norm()).item()
        top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        rows.append((label, rel, top1))
    return rows


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
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_config

    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(tiny_config(**text))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory to evaluate instead of the defaults")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    models: list[tuple[str, DiffusionGemmaForBlockDiffusion, tuple | None]] = []
    if args.model:
        m = DiffusionGemmaForBlockDiffusion.from_pretrained(args.model, dtype=torch.float32)
        models.append((args.model, m, code_inputs(Path(args.model), m.config.canvas_length or 64)))
    else:
        models.append(("tiny random (H 64, 4 experts top-2, I 64)", _tiny(0, moe_intermediate_size=64), None))
        models.append(("tiny random (H 256, 16 experts top-4, I 128)", _tiny(
            1, hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64, global_head_dim=64,
            num_experts=16, top_k_experts=4, moe_intermediate_size=128, num_hidden_layers=4,
            layer_types=["sliding_attention"] * 3 + ["full_attention"]), None))
        bundled = ROOT / "daemon" / "bundled"
        if (bundled / "config.json").exists() and any(bundled.glob("*.safetensors")):
            m = DiffusionGemmaForBlockDiffusion.from_pretrained(bundled, dtype=torch.float32)
            models.append((f"bundled model{_step(bundled)}, held-out stdlib code", m,
                           code_inputs(bundled, m.config.canvas_length)))
    print("| weights | format | rel. error | bits per weight |")
    print("|---|---|---|---|")
    for name, fmt, rel, bits in weight_errors():
        print(f"| {name} [1408 x 2816] | {fmt} | {rel:.4f} | {bits:.3f} |")
    print()
    print("| model | weights | logits rel. error | top-1 agreement |")
    print("|---|---|---|---|")
    for name, model, inputs in models:
        for label, rel, top1 in evaluate(model, inputs=inputs):
            print(f"| {name} | {label} | {rel:.4f} | {top1 * 100:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
