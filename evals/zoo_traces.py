#!/usr/bin/python3
"""Dumps training traces of a zoo model through the per-layer stream (docs/own-model.md).

Each session is one training haystack (training seeds: disjoint from the evaluation's) of a
task, prefilled in torch, then decoded in trace mode: the questions' tokens are teacher-
forced decode steps and the answers greedy, so one session records several queries and
their cycles (a trace keeps whole cycles of tau steps). The worker writes a session's trace
to its --trace_dir when the session closes: by default this starts the all-in-one with
--trace_dir OUT.

  /usr/bin/python3 evals/zoo_traces.py --model single1 --out /tmp/traces --sessions 40
"""
import argparse
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "zoo"))
from eval_models import Progress, ask, decode_steps, start_server  # noqa: E402
from model import Decoder, load_model  # noqa: E402
import tasks as T  # noqa: E402
from serve import WorkerAttention, prefill_arrays, spec_for  # noqa: E402
from flashmemory_client import DecodeClient  # noqa: E402

SEED_BASE = 1_000_000  # training seeds (< 2**31) the zoo's training runs did not reach


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="zoo model name (evals/zoo/models/NAME.safetensors)")
    ap.add_argument("--out", required=True, help="trace directory (the all-in-one's --trace_dir)")
    ap.add_argument("--sessions", type=int, default=48)
    ap.add_argument("--first", type=int, default=0,
                    help="index of the first session (its seed and task): more traces, or a "
                    "validation set, without repeating earlier ones")
    ap.add_argument("--tasks", default="recall,multiquery,vartrack,passkey")
    ap.add_argument("--contexts", default="8192,16384")
    ap.add_argument("--per_haystack", type=int, default=10, help="questions per session")
    ap.add_argument("--tau", type=int, default=8)
    ap.add_argument("--target", help="decode worker HOST:PORT started with --trace_dir OUT")
    ap.add_argument("--zoo", default=os.path.join(HERE, "zoo", "models"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    model, _ = load_model(os.path.join(a.zoo, f"{a.model}.safetensors"))
    spec = spec_for(model)
    tasks, contexts = a.tasks.split(","), [int(c) for c in a.contexts.split(",")]
    server, target = None, a.target
    if not target:
        tmp = tempfile.mkdtemp(prefix=f"fm-traces-{a.model}-")
        server, target = start_server(tmp, "2GiB", "4GiB",
                                      ["--trace_dir", os.path.abspath(a.out)])
    client = DecodeClient(target, timeout=600)
    prog = Progress(a.sessions, f"{a.model} traces")
    steps = 0
    t0 = time.time()
    try:
        for i in range(a.first, a.first + a.sessions):
            task, ctx = tasks[i % len(tasks)], contexts[(i // len(tasks)) % len(contexts)]
            per = 1 if task == "passkey" else a.per_haystack
            sample = T.make(task, SEED_BASE + i, ctx, per, eval_split=False)
            cache = model.prefill(torch.tensor(sample.haystack))
            sid = f"{a.model}-{task}-{ctx}-{i}"
            n = decode_steps(sample)
            client.open(sid, spec, mode="trace", tau=a.tau, max_tokens=cache.tokens + n + a.tau)
            try:
                pages, keys = prefill_arrays(model, cache, cache.tokens)
                client.prefill(sid, spec, pages, cache.tokens, keys)
                with client.stream() as st:
                    wa = WorkerAttention(st, sid, model, cache)
                    dec = Decoder(model, wa.cache, global_attend=wa)
                    ask(dec, sample)
                    while wa.step % a.tau:  # a trace keeps whole cycles: finish the last
                        dec.step(T.SEP)
                        n += 1
            finally:
                client.close(sid, delete_pages=True)
            steps += n
            prog.tick(sid)
    finally:
        if server:
            server.terminate()
            server.wait(timeout=30)
    print(f"{a.sessions} traces ({steps} decode steps, {steps // a.tau} cycles) in {a.out} "
          f"in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
