#!/usr/bin/python3
"""Converts a real model's dump into a FlashMemory trace, so that a deployment can train the
indexer for its own model (the decode worker's trace mode writes traces directly).

Input: an .npz with
  hidden      [S, hidden]        hidden state at the indexer's source layer at every step
                                 ([K, hidden] at cycle starts only is held over each cycle)
  index_keys  [Li, C, di]        the index keys of every chunk, after the key side's RoPE and
                                 Hadamard transform (DESIGN §3), as floats
  chunk_mass  [S, C]             attention mass of every chunk at every decode step, averaged
                                 over heads, per layer: [S, L, C] is accepted too
  queries     [K, L, Hq, d]      (optional) the model's decode queries at cycle starts
The model's shape comes from the flags. Keys are compressed to fp8-e4m3 with one fp32 scale
per chunk (scale = max|k| / 448, round to nearest even), exactly as the C++ indexer does.
Golden labels per cycle: the union over its tau steps of the chunks holding the top-p of the
mass in at least m layers (DESIGN §3).

  /usr/bin/python3 trainer/convert_dump.py dump.npz out.safetensors --prefill-tokens 131072 \\
      --layers 4 --q-heads 32 --kv-heads 8 --head-dim 128 --index-heads 16 --hidden-dim 1024
"""
import argparse
import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fm_trace import fp8_e4m3_table, save_safetensors  # noqa: E402


def compress_keys(keys):
    """[Li, C, di] float -> [Li, C, di + 4] uint8 (fp8-e4m3 codes, fp32 scale)."""
    table = fp8_e4m3_table()
    codes_pos = np.arange(128)  # non-negative codes, ascending values (0x7f is NaN)
    vals = table[:127].astype(np.float64)
    amax = np.abs(keys).max(-1, keepdims=True)
    scale = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)
    x = (keys / scale).astype(np.float64)
    mag = np.abs(x)
    # nearest code, ties to the even code (the one with a zero last mantissa bit)
    hi = np.clip(np.searchsorted(vals, mag), 1, 126)
    lo = hi - 1
    dlo, dhi = mag - vals[lo], vals[hi] - mag
    pick = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo % 2 == 0, lo, hi)))
    pick = np.where(mag >= vals[126], 126, pick)
    codes = (codes_pos[pick] | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)
    out = np.concatenate([codes, scale.view(np.uint8).reshape(*scale.shape[:-1], 4)], -1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dump")
    ap.add_argument("out")
    ap.add_argument("--prefill-tokens", type=int, required=True)
    ap.add_argument("--tau", type=int, default=64)
    ap.add_argument("--page-tokens", type=int, default=64)
    ap.add_argument("--chunk-tokens", type=int, default=4)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--q-heads", type=int, required=True)
    ap.add_argument("--kv-heads", type=int, required=True)
    ap.add_argument("--head-dim", type=int, required=True)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--index-heads", type=int, required=True)
    ap.add_argument("--hidden-dim", type=int, required=True)
    ap.add_argument("--top-p", type=float, default=0.6)
    ap.add_argument("--label-layers", type=int, default=1)
    ap.add_argument("--name", default="dump")
    a = ap.parse_args()
    d = np.load(a.dump)
    hidden = d["hidden"].astype(np.float32)
    keys = d["index_keys"].astype(np.float32)
    mass = d["chunk_mass"].astype(np.float64)
    if mass.ndim == 2:
        mass = mass[:, None, :]
    S = mass.shape[0]
    K = S // a.tau
    if hidden.shape[0] == K and K != S:
        hidden = np.repeat(hidden, a.tau, axis=0)
    Li, C, di = keys.shape
    if S % a.tau or hidden.shape[0] != S:
        sys.exit(f"chunk_mass has {S} steps and hidden {hidden.shape[0]} rows; expected whole "
                 f"cycles of tau {a.tau} and one hidden state per step (or per cycle)")
    cpp = a.page_tokens // a.chunk_tokens
    P = (a.prefill_tokens + S + a.page_tokens - 1) // a.page_tokens
    labels = np.zeros((K, C), np.uint8)
    page_mass = np.zeros((S, P), np.float32)
    for s in range(S):
        tokens = a.prefill_tokens + s + 1
        indexed = tokens // a.page_tokens * cpp
        votes = np.zeros(C, np.int32)
        for l in range(mass.shape[1]):
            m = mass[s, l]
            order = np.argsort(-m, kind="stable")
            cum = np.cumsum(m[order])
            n = int(np.searchsorted(cum, a.top_p * m.sum()) + 1)
            votes[order[:n]] += 1
        k = s // a.tau
        first_indexed = (a.prefill_tokens + k * a.tau + 1) // a.page_tokens * cpp
        labels[k, :first_indexed] |= (votes[:first_indexed] >= a.label_layers).astype(np.uint8)
        pm = mass[s].mean(0)
        np.add.at(page_mass[s], np.arange(C) // cpp, pm.astype(np.float32))
        del indexed
    queries = d["queries"].astype(np.float32) if "queries" in d else np.zeros(
        (K, a.layers, a.q_heads, a.head_dim), np.float32)
    meta = {"format": "flashmemory-trace-v1", "spec_name": a.name, "layers": a.layers,
            "q_heads": a.q_heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
            "dtype": a.dtype, "page_tokens": a.page_tokens, "index_layers": Li,
            "index_heads": a.index_heads, "index_dim": di, "chunk_tokens": a.chunk_tokens,
            "hidden_dim": a.hidden_dim, "rope_dims": min(64, di // 2),
            "prefill_tokens": a.prefill_tokens, "steps": S, "tau": a.tau, "seed": 0,
            "world_seed": 0, "top_p": a.top_p, "label_layers": a.label_layers}
    save_safetensors(a.out, {
        "index_keys": compress_keys(keys), "hidden": hidden, "queries": queries,
        "labels": labels, "page_mass": page_mass,
        "needles": np.zeros((0, 2), np.int64), "chunk_topic": np.full(C, -1, np.int32)}, meta)
    print(f"wrote {a.out}: {K} cycles, {C} chunks x {Li} index layers, "
          f"{int(labels.sum())} positive labels")


if __name__ == "__main__":
    main()
