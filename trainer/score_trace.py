#!/usr/bin/python3
"""Scores one cycle of a trace with the trainer's tower: writes logits [Li, C] (the chunks
the indexer holds at the cycle start) to a safetensors file, or for a token_query tower
page_scores [P] (the pages of those chunks). The C++ parity test compares them with
fm-indexer's own scores.

  /usr/bin/python3 trainer/score_trace.py --trace T --weights W --cycle 1 --out logits.safetensors
"""
import argparse
import sys

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fm_indexer import QueryTower  # noqa: E402
from fm_trace import Trace, load_safetensors, save_safetensors  # noqa: E402
import token_query as tq  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--cycle", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    t = Trace(a.trace)
    s0 = a.cycle * t.tau
    n = t.indexed_chunks(s0)
    if load_safetensors(a.weights)[1].get("tower") == "token_query":
        tower = tq.TokenQueryTower.load(a.weights)
        keys = t.decoded_keys()[:, :n]
        k = torch.from_numpy(keys.reshape(keys.shape[0], n * t.chunk_tokens, t.kv_heads, t.head_dim))
        scale = float(t.meta.get("softmax_scale", 0) or 0) or t.head_dim ** -0.5
        with torch.no_grad():
            q = tower(torch.from_numpy(t.hidden[s0].copy()))
            score = tq.page_log_shares(q, k, t.page_tokens, scale).exp().flatten(0, 1).max(0).values
        save_safetensors(a.out, {"page_scores": score.numpy().astype(np.float32)},
                         {"cycle": a.cycle, "chunks": n})
        print(f"scored {score.shape[0]} pages ({n} chunks) of cycle {a.cycle} (token_query)")
        return
    tower = QueryTower.load(a.weights)
    keys = torch.from_numpy(t.decoded_keys()[:, :n])
    with torch.no_grad():
        q, w = tower(torch.from_numpy(t.hidden[s0].copy())[None], torch.tensor([t.tokens_at(s0)]))
        logits = QueryTower.logits(q[0], w[0], keys).numpy().astype(np.float32)
    save_safetensors(a.out, {"logits": logits}, {"cycle": a.cycle, "chunks": n})
    print(f"scored {n} chunks x {t.index_layers} layers of cycle {a.cycle}")


if __name__ == "__main__":
    main()
