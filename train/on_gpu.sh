#!/usr/bin/env bash
# Train the bundled model on a lent GPU machine, which has no network and another Python.
#
# Here, before the call (both folders are git-ignored and travel with the device tool's `carry`):
#   python -m train.corpus pack .corpus/corpus.tar.gz     # the exact files of CORPUS.txt
#   .whl/: a transformers wheel when the machine's is older than pyproject.toml's pin
# There:
#   bash train/on_gpu.sh OUT_DIR --minutes 9 --batch-size 256 ...   # options go to train.train
# OUT_DIR gets the training log and the shipped checkpoint, its weights cut into 15 MB parts
# (the device tool returns files of at most 16 MiB); here `cat model.safetensors.part-* >
# model.safetensors` puts them back together.
set -euo pipefail
out=$1
shift
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p /tmp/corpus "$out"
tar xzf .corpus/corpus.tar.gz -C /tmp/corpus
export DGEMMA_CORPUS_ROOT=/tmp/corpus PYTHONUNBUFFERED=1
python3 -m train.train --out runs/gpu "$@" 2>&1 | tee "$out/train.log"
python3 -m train.train --ship runs/gpu/best --ship-to "$out/bundled"
split -b 15M "$out/bundled/model.safetensors" "$out/bundled/model.safetensors.part-"
rm "$out/bundled/model.safetensors"
