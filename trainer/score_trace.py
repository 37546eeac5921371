#!/usr/bin/python3
"""Scores one cycle of a trace with the trainer's tower: writes logits [Li, C] (the chunks
the indexer holds at the cycle start) to a safetensors file. The C++ parity test compares
them with fm-indexer's own scores.

  /usr/bin/python3 trainer/score_trace.py --trace T --weights W --cycle 1 --out logits.safetensors
"""
import argparse
import sys

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fm_indexer import QueryTower  # noqa: E402
from fm_trace import Trace, save_safetensors  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--cycle", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    t = Trace(a.trace)
    tower = QueryTower.load(a.weights)
    s0 = a.cycle * t.tau
    n = t.indexed_chunks(s0)
    keys = torch.from_numpy(t.decoded_keys()[:, :n])
    with torch.no_grad():
        q, w = tower(torch.from_numpy(t.hidden[s0].copy())[None], torch.tensor([t.tokens_at(s0)]))
        logits = QueryTower.logits(q[0], w[0], keys).numpy().astype(np.float32)
    save_safetensors(a.out, {"logits": logits}, {"cycle": a.cycle, "chunks": n})
    print(f"scored {n} chunks x {t.index_layers} layers of cycle {a.cycle}")


if __name__ == "__main__":
    main()
