"""Byte-level BPE tokenizer (vocab 8192) for the bundled dgemma model.

    python -m train.tokenizer            # writes dgemma/bundled/tokenizer.json & co.

Special tokens with fixed ids: <pad>=0, <eos>=1, <bos>=2, <start_of_turn>=3,
<end_of_turn>=4. No normalizer, ByteLevel pre-tokenizer (add_prefix_space=False) and
ByteLevel decoder: decode(encode(s)) == s for any string. No bos is added on encode
(the engine adds it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from train.corpus import is_stdlib, read_sources, write_manifest

VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
BUNDLED = Path(__file__).resolve().parent.parent / "dgemma" / "bundled"


def build_tokenizer(texts, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def save_bundled(tok: Tokenizer, out: Path = BUNDLED) -> None:
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        model_max_length=4096,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    # transformers 5 writes the template to chat_template.jinja; keep a copy in
    # tokenizer_config.json too for readers that only look there.
    import json

    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=BUNDLED)
    args = ap.parse_args(argv)
    sources = read_sources()
    args.out.mkdir(parents=True, exist_ok=True)
    write_manifest(args.out / "CORPUS.txt", sources)
    stdlib = [t for rel, t in sources if is_stdlib(rel)]
    tok = build_tokenizer(stdlib)
    save_bundled(tok, args.out)
    print(f"tokenizer: {tok.get_vocab_size()} tokens, {len(stdlib)} standard-library files -> {args.out}")


if __name__ == "__main__":
    main()
