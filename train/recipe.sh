#!/usr/bin/env bash
# The bundled model's recipe, one command: three runs of train.train on a 2-core CPU, about five
# hours of wall clock (100 + 100 + 95 minutes), then the copy into daemon/bundled.
#   1. next-token warm-up (30 % of the time), then the block-diffusion objective;
#   2. and 3. the diffusion objective alone, continued from the previous run with a fresh
#      warm-up and cosine schedule (run 3 on another data seed, so it sees other examples).
# The three runs scored on held-out code in daemon/bundled/MODEL_CARD.md ("Training recipe").
#
#     bash train/recipe.sh [OUT_DIR]        # default runs/bundled
set -euo pipefail
out=${1:-runs/bundled}
common=(--no-bf16 --threads 2 --eval-every 200)
python -m train.train "${common[@]}" --minutes 100 --lm-phase 0.3 --out "$out/1"
python -m train.train "${common[@]}" --minutes 100 --lm-phase 0 --lr 1e-3 --init-from "$out/1/latest" --out "$out/2"
python -m train.train "${common[@]}" --minutes 95 --lm-phase 0 --lr 6e-4 --warmup 50 --seed 2 \
    --init-from "$out/2/best" --out "$out/3"
python -m train.train --ship "$out/3/best"
