#!/usr/bin/env bash
# The bundled model's recipe, one command, about two hours on a 2-core CPU:
#   1. the tokenizer (deterministic: the same tokenizer.json on the same Python) and the corpus
#      manifest, into dgemma/bundled;
#   2. one train.train run of 115 minutes: next-token prediction for the first 30 % of the time,
#      then the block-diffusion objective (with the next-token loss alongside);
#   3. its best checkpoint (validation diffusion loss), copied into dgemma/bundled in bf16.
# Scored on held-out code in dgemma/bundled/MODEL_CARD.md. The schedule follows the wall clock,
# so the step count depends on the machine; `pip install $(python -m train.corpus pins)` first
# to read exactly the corpus the shipped model read.
#
#     bash train/recipe.sh [OUT_DIR]        # default runs/bundled
set -euo pipefail
out=${1:-runs/bundled}
python -m train.tokenizer
python -m train.train --no-bf16 --threads 2 --eval-every 200 --minutes 115 --lm-phase 0.3 --out "$out"
python -m train.train --ship "$out/best"
