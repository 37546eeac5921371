#!/usr/bin/env bash
# Trains a shipped indexer checkpoint: SPEC=bench (default) -> models/lsa-bench.safetensors,
# SPEC=long -> models/lsa-long.safetensors. Generates training traces (seeds 1000.. and
# 3000..) and validation traces (seeds 2000..) with fmctl gen, then runs the PyTorch
# trainer with its defaults (trainer/train_indexer.py). About 20-40 minutes on 2 cores.
# Evaluation (fm-bench indexer) uses other seeds (900001..). WORK=DIR keeps the traces.
set -euo pipefail
cd "$(dirname "$0")/.."
SPEC=${SPEC:-bench}
OUT=${1:-models/lsa-$SPEC.safetensors}
if [[ -n "${WORK:-}" ]]; then mkdir -p "$WORK"; KEEP=1; else WORK=$(mktemp -d); KEEP=0; fi
bash scripts/build.sh >/dev/null
build/bin/fmctl gen --spec "$SPEC" --tokens 16384 --steps 512 --seed 1000 --count 160 \
  --focus-steps 120 --needles 12 --tau 64 --out "$WORK" | tail -1
build/bin/fmctl gen --spec "$SPEC" --tokens 65536 --steps 512 --seed 3000 --count 40 \
  --focus-steps 120 --needles 12 --tau 64 --out "$WORK" | tail -1
build/bin/fmctl gen --spec "$SPEC" --tokens 32768 --steps 512 --seed 2000 --count 6 --tau 64 \
  --out "$WORK" | tail -1
/usr/bin/python3 trainer/train_indexer.py --train "$WORK/$SPEC-*-s[13]*.safetensors" \
  --val "$WORK/$SPEC-*-s2*.safetensors" --out "$OUT"
((KEEP)) || rm -rf "$WORK"
