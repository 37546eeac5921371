#!/usr/bin/python3
"""docs/own-model.md's recipe end to end on the zoo's single1, as a user runs it: dump
traces through the stream (trace mode) -> train the token_query lsa tower -> load it into a
running all-in-one -> evaluate lsa against dense with scripts/eval_models.sh's engine.

Checks: every session left a trace of whole cycles; the trainer picked the token_query
tower for them and wrote weights of that kind; the evaluation served lsa with them without
a failed prediction, and dense through the worker equalled torch (--check).
"""
import glob
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "trainer"))
from fm_trace import Trace, load_safetensors  # noqa: E402

PY = "/usr/bin/python3"


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(r.stdout[-3000:], flush=True)
    if r.returncode != 0:
        sys.exit(f"FAILED ({r.returncode}): {' '.join(cmd)}")
    return r.stdout


def main():
    tmp = tempfile.mkdtemp(prefix="fm-recipe-")
    traces, weights = os.path.join(tmp, "traces"), os.path.join(tmp, "single1.lsa.safetensors")
    out = run([PY, os.path.join(HERE, "zoo_traces.py"), "--model", "single1", "--out", traces,
               "--sessions", "10", "--contexts", "2048", "--per_haystack", "4", "--threads", "1"])
    assert "10 traces" in out, out
    paths = sorted(glob.glob(os.path.join(traces, "*.safetensors")))
    assert len(paths) == 10, paths
    for p in paths:
        t = Trace(p)
        assert t.steps > 0 and t.steps % t.tau == 0, (p, t.steps, t.tau)
        assert t.hidden_dim == t.index_layers * t.q_heads * t.head_dim, p
    out = run([PY, os.path.join(ROOT, "trainer", "train_indexer.py"), "--train",
               os.path.join(traces, "*.safetensors"), "--out", weights, "--epochs", "3",
               "--threads", "1"])
    assert "token_query tower" in out, out
    _, meta = load_safetensors(weights)
    assert meta["tower"] == "token_query", meta
    rows_path = os.path.join(tmp, "rows.json")
    out = run([PY, os.path.join(HERE, "eval_models.py"), "--quick", "--check", "--threads", "1",
               "--models", "single1", "--tasks", "recall", "--policies", "dense,lsa",
               "--miss_ratios", "0", "--lsa_weights", weights, "--json", rows_path,
               "--cache", os.path.join(tmp, "cache")])
    assert f"served with {weights}" in out, out
    rows = json.load(open(rows_path))
    lsa = [r for r in rows if r["policy"] == "lsa"]
    assert len(lsa) == 1 and lsa[0]["n"] == 4, rows
    assert lsa[0]["prediction_failures"] == 0, lsa
    assert 0 < lsa[0]["footprint"] < 1, lsa
    print(f"recipe: lsa exact match {lsa[0]['exact_match']:.2f} (dense "
          f"{[r for r in rows if r['policy'] == 'dense'][0]['exact_match']:.2f}), footprint "
          f"{lsa[0]['footprint']:.3f}")
    subprocess.run(["rm", "-rf", tmp])


if __name__ == "__main__":
    main()
