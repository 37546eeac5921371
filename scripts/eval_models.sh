#!/usr/bin/env bash
# Accuracy of sparse decoding on the zoo's trained models (evals/eval_models.py): every
# global attention layer served by a FlashMemory worker through the per-layer stream, per
# policy x footprint cap x context, against the same model decoding densely in torch.
#   bash scripts/eval_models.sh --quick
#   bash scripts/eval_models.sh --contexts 65536 --caps 0.05 --policies dense,model_query,quest
# Flags: --models --tasks --policies --caps --contexts --n --per_haystack --miss_ratio
#        --target HOST:PORT --quick --json FILE --plots DIR (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x build/bin/flashmemory ]] || bash scripts/build.sh >/dev/null
export UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo}
exec /usr/bin/python3 evals/eval_models.py "$@"
