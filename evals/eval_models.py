#!/usr/bin/python3
"""Accuracy of sparse decoding on trained models: the zoo's models answer the zoo's tasks
with every global attention layer served by a FlashMemory decode worker, per policy,
footprint cap and context, against the same model decoding densely in torch.

  bash scripts/eval_models.sh --quick                     # CI: 4K, a few questions
  bash scripts/eval_models.sh --contexts 65536 --caps 0.05 --policies dense,model_query,quest
  bash scripts/eval_models.sh --json docs/plots/accuracy.json --plots docs/plots

Each haystack is prefilled in torch once (cached under --cache) and asked several questions
in turn in one session per (policy, cap): the questions' tokens are decode steps, so a
question that turns to a page nobody predicted is the case the lookahead must handle.
Per cell: exact match with a 95 % Wilson interval, n, mass recall (the share of the dense
attention mass the served attention covered, mean over steps, layers and heads), the
share of answers whose needle pages were all resident when they were decoded, footprint
(peak resident pages / pages of the history), stalls per step, decode tokens/s (the
worker's step latency as the client sees it), torch's dense exact match on the same
questions, and the miss checks' page fetches.
"""
import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "zoo"))
from model import Decoder, load_model  # noqa: E402
import tasks as T  # noqa: E402
from serve import PAGE, DenseRecorder, WorkerAttention, prefill_arrays, spec_for  # noqa: E402
from flashmemory_client import DecodeClient, IndexerClient  # noqa: E402

POLICIES = ["dense", "oracle", "model_query", "lsa", "quest", "sink_recency", "recency", "random"]


def wilson(k, n, z=1.96):
    if n == 0:
        return 0.0, 0.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


class Progress:
    def __init__(self, total, label):
        self.total, self.done, self.label, self.t0 = total, 0, label, time.time()

    def tick(self, what=""):
        self.done += 1
        el = time.time() - self.t0
        eta = el / self.done * (self.total - self.done)
        bar = "#" * int(30 * self.done / self.total)
        if not sys.stderr.isatty() and self.done < self.total and self.done % 10:
            return
        cr = "\r" if sys.stderr.isatty() else ""
        sys.stderr.write(f"{cr}{self.label} [{bar:<30s}] {self.done}/{self.total} "
                         f"{el:5.0f}s eta {eta:5.0f}s {what[:40]:<40s}")
        sys.stderr.flush()
        if self.done == self.total or not sys.stderr.isatty():
            sys.stderr.write("\n")


def start_server(tmp, reserve, ram, extra=()):
    ready = os.path.join(tmp, "ready")
    binary = os.path.join(os.environ.get("FM_BIN_DIR", os.path.join(ROOT, "build", "bin")),
                          "flashmemory")
    log = open(os.path.join(tmp, "server.log"), "w")
    p = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", "0", "--ready_file", ready,
                          "--data_dir", os.path.join(tmp, "data"), "--ram_bytes", ram,
                          "--reserve_bytes", reserve, *extra], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(600):
        if os.path.exists(ready) and os.path.getsize(ready) > 0:
            break
        if p.poll() is not None:
            raise RuntimeError(f"flashmemory exited: see {tmp}/server.log")
        time.sleep(0.1)
    with open(ready) as f:
        return p, "127.0.0.1:" + f.readline().strip()


def model_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def haystack(model, mhash, task, context, seed, per_hay, cache_dir):
    """(sample, torch prefill cache), the cache computed once and kept on disk."""
    s = T.make(task, seed, context, per_hay)
    path = os.path.join(cache_dir, f"{mhash}-{task}-{context}-{seed}-{per_hay}.pt")
    if os.path.exists(path):
        return s, torch.load(path)
    c = model.prefill(torch.tensor(s.haystack))
    torch.save(c, path + ".tmp")
    os.replace(path + ".tmp", path)
    return s, c


def _clone(c):
    import copy
    out = copy.copy(c)
    out.k = dict(c.k)
    out.v = dict(c.v)
    out.canon = dict(c.canon)
    out.__dict__.pop("_room", None)  # appends must not share the original's spare room
    return out


def ask(dec, sample, on_answer=None):
    """Asks every question in turn; returns [(correct, generated)] per question."""
    res = []
    logits = dec.cache.logits
    for qi, q in enumerate(sample.questions):
        gen, want = [], []
        for prompt, answer in T.segments(q):
            for tok in prompt:
                logits = dec.step(tok)
            for a in answer:
                if on_answer:
                    on_answer(qi, len(want))
                nxt = int(logits.argmax())
                gen.append(nxt)
                want.append(a)
                logits = dec.step(nxt)
        logits = dec.step(T.SEP)
        res.append((gen == want, gen))
    return res


def needles_of(question, j):
    """The needle positions answer token j of a question is read from: its own where each
    answer token has one (recall, multiquery, passkey), the hop's record for vartrack's names
    (none for its `=`), every one otherwise (frequent)."""
    n_answer = sum(len(a) for _, a in T.segments(question))
    needles = question[2]
    if len(needles) == n_answer:
        return [needles[j]]
    if n_answer == 2 * len(needles) - 1:
        return [needles[j // 2]] if j % 2 == 0 else []
    return needles


def decode_steps(sample):
    return sum(sum(len(p) + len(a) for p, a in T.segments(q)) + 1 for q in sample.questions)


def run_cell(client, model, spec, sample, cache, policy, cap, sid, oracle_mass, miss_ratio=0.0,
             tau=8, lag=2):
    """One session: prefill the haystack, ask its questions. Returns a dict of results."""
    tokens = cache.tokens
    pages, keys = prefill_arrays(model, cache, tokens)
    steps = decode_steps(sample)
    mode = "dense" if policy == "dense" else "sparse"
    client.open(sid, spec, mode=mode, budget=cap if mode == "sparse" else 1.0, tau=tau,
                switch_lag=lag,
                policy="default" if policy == "dense" else policy, max_tokens=tokens + steps,
                oracle_page_mass=oracle_mass if policy == "oracle" else None,
                miss_ratio=miss_ratio if mode == "sparse" else 0.0)
    try:
        client.prefill(sid, spec, pages, tokens, keys)
        resident = []
        with client.stream() as st:
            wa = WorkerAttention(st, sid, model, _clone(cache))
            dec = Decoder(model, wa.cache, global_attend=wa)

            def probe(qi, j):
                need = sorted({n // PAGE for n in needles_of(sample.questions[qi], j)})
                if need:
                    r = client.stats(sid, probe_pages=need)["probe_resident"]
                    resident.append(all(r))
            res = ask(dec, sample, probe)
        stats = client.stats(sid)
    finally:
        client.close(sid, delete_pages=True)
    return {"correct": [r[0] for r in res], "generated": [r[1] for r in res], "recall": float(np.mean(wa.recall)),
            "needle_resident": float(np.mean(resident)) if resident else 1.0,
            "footprint": stats["footprint"], "stalls": stats["stalls"], "steps": stats["steps"],
            "surprise_fetches": stats["surprise_fetches"], "seconds": wa.seconds,
            "miss_fires": stats["miss_fires"], "miss_checks": stats["miss_checks"],
            "miss_exact_pages": stats["miss_exact_pages"], "stall_ms": stats["stall_ms"],
            "pages_fetched": stats["pages_fetched"],
            "prediction_failures": stats["prediction_failures"],
            "decode_steps": wa.step, "tau": stats["tau"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="hybrid4,single1")
    ap.add_argument("--tasks", default=",".join(T.TASKS))
    ap.add_argument("--policies", help="of " + ",".join(POLICIES) + " (default: all)")
    ap.add_argument("--caps", help="footprint caps of the sparse policies (default 0.02,0.05,0.1)")
    ap.add_argument("--contexts", help="haystack tokens (default 16384,65536,131072)")
    ap.add_argument("--n", type=int, help="questions per cell (default 100)")
    ap.add_argument("--per_haystack", type=int, help="questions asked of one haystack (default 10)")
    ap.add_argument("--tau", type=int, default=8, help="decode steps per cycle (prediction)")
    ap.add_argument("--switch_lag", type=int, default=2,
                    help="steps after a cycle start at which its set serves (the prediction and "
                    "its fetch run meanwhile)")
    ap.add_argument("--miss_ratios",
                    help="the sessions' miss check thresholds to run each sparse cell with "
                    "(0 = off; default 0,1)")
    ap.add_argument("--target", help="decode worker HOST:PORT; default: start the all-in-one")
    ap.add_argument("--quick", action="store_true",
                    help="CI: 4K context, 4 questions per task, dense/model_query/quest at 10 %%")
    ap.add_argument("--check", action="store_true",
                    help="fail unless the worker's dense answers equal torch's on every question "
                    "and every prediction of every sparse session succeeded")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--plots", help="write a plot per task (accuracy vs footprint) here")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "fm-eval-cache"))
    ap.add_argument("--zoo", default=os.path.join(HERE, "zoo", "models"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--server_flags", default="",
                    help="more flags for the all-in-one it starts, e.g. '--miss_sketch_rank 0'")
    ap.add_argument("--lsa_weights", default="{zoo}/{model}.lsa.safetensors",
                    help="policy lsa: the weights each model's sessions are served with "
                    "(loaded into the worker's indexer: the all-in-one's, or --target's)")
    ap.add_argument("--markdown", action="store_true",
                    help="with --replot: print the rows as markdown tables (a table per model and "
                    "context; without / with the miss check side by side)")
    ap.add_argument("--replot", nargs="+", metavar="JSON",
                    help="only merge the rows of these --json files and write the plots of "
                    "--plots (and --json) from them")
    a = ap.parse_args()
    if a.replot:
        rows = [r for f in a.replot for r in json.load(open(f))]
        # A later file's row replaces an earlier one of the same cell (a rerun).
        cells = {}
        for r in rows:
            cells[(r["model"], r["task"], r["context"], r["policy"], r["cap"], r["miss_ratio"])] = r
        rows = list(cells.values())
        for r in rows:
            print_row(r)
        if a.markdown:
            print(markdown(rows))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
        if a.plots:
            plot(rows, a.plots)
        return
    # --quick (CI) fills the flags not given: 4K, 4 questions per task, 10 %, miss check on.
    quick = {"contexts": "4096", "n": 4, "per_haystack": 4, "caps": "0.1",
             "policies": "dense,model_query,quest", "miss_ratios": "1"}
    full = {"contexts": "16384,65536,131072", "n": 100, "per_haystack": 10,
            "caps": "0.02,0.05,0.1", "policies": ",".join(POLICIES),
            "miss_ratios": "0,1"}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    torch.set_num_threads(a.threads)
    os.makedirs(a.cache, exist_ok=True)
    models = a.models.split(",")
    tasks = a.tasks.split(",")
    policies = a.policies.split(",")
    caps = [float(c) for c in a.caps.split(",")]
    contexts = [int(c) for c in a.contexts.split(",")]
    ratios = [float(r) for r in a.miss_ratios.split(",")]
    for p in policies:
        if p not in POLICIES:
            sys.exit(f"unknown policy {p}; one of {POLICIES}")

    server = None
    rows, mismatches, failures = [], 0, 0
    t_start = time.time()
    try:
        for mname in models:
            # A worker's reserve holds pages of one size: a server per model unless --target.
            target = a.target
            if not target:
                if server:
                    server.terminate()
                    server.wait(timeout=30)
                tmp = tempfile.mkdtemp(prefix=f"fm-eval-{mname}-")
                server, target = start_server(tmp, "2GiB", "4GiB", a.server_flags.split())
            client = DecodeClient(target, timeout=600)
            if "lsa" in policies:
                w = os.path.abspath(a.lsa_weights.format(zoo=a.zoo, model=mname))
                if not os.path.exists(w):
                    sys.exit(f"policy lsa: no weights {w} (train them: docs/own-model.md)")
                h = IndexerClient(target).load_weights(w)
                print(f"lsa: {mname} served with {w} (hash {h:016x})", flush=True)
            path = os.path.join(a.zoo, f"{mname}.safetensors")
            model, _ = load_model(path)
            mhash = model_hash(path)
            spec = spec_for(model)
            for task in tasks:
                per = 1 if task == "passkey" else a.per_haystack
                for ctx in contexts:
                    hays = -(-a.n // per)
                    cells = [(p, c, r) for p in policies
                             for c in ([1.0] if p == "dense" else caps)
                             for r in ([0.0] if p == "dense" else ratios)]
                    prog = Progress(hays * (1 + len(cells)), f"{mname} {task} {ctx // 1024}K")
                    acc = {cell: [] for cell in cells}
                    torch_ok = []
                    for h in range(hays):
                        nq = min(per, a.n - h * per)
                        sample, cache = haystack(model, mhash, task, ctx, h, nq, a.cache)
                        ref = DenseRecorder(model, _clone(cache),
                                            cache.tokens + decode_steps(sample))
                        res = ask(Decoder(model, ref.cache, global_attend=ref), sample)
                        oracle = ref.oracle()
                        torch_ok += [r[0] for r in res]
                        prog.tick("torch")
                        for cell in cells:
                            pol, cap, ratio = cell
                            sid = f"eval-{mname}-{task}-{ctx}-{h}-{pol}-{cap}-{ratio}"
                            r = run_cell(client, model, spec, sample, cache, pol, cap, sid,
                                         oracle, ratio, a.tau, a.switch_lag)
                            acc[cell].append(r)
                            if pol == "dense":
                                mismatches += sum(x != y for x, y in
                                                  zip(r["generated"], [q[1] for q in res]))
                            prog.tick(f"{pol} {cap} {ratio}")
                    t_em = float(np.mean(torch_ok))
                    for (pol, cap, ratio), rs in acc.items():
                        correct = sum(sum(r["correct"]) for r in rs)
                        n = sum(len(r["correct"]) for r in rs)
                        lo, hi = wilson(correct, n)
                        steps = sum(r["decode_steps"] for r in rs)
                        rows.append({
                            "model": mname, "task": task, "kind": T.KIND[task], "policy": pol,
                            "cap": cap, "miss_ratio": ratio, "context": ctx, "n": n,
                            "exact_match": correct / n,
                            "exact_match_lo": lo, "exact_match_hi": hi,
                            "mass_recall": float(np.mean([r["recall"] for r in rs])),
                            "needle_resident": float(np.mean([r["needle_resident"] for r in rs])),
                            "footprint": float(np.mean([r["footprint"] for r in rs])),
                            "stall_fraction": sum(r["stalls"] for r in rs) / max(1, steps),
                            "stall_ms_per_step": sum(r["stall_ms"] for r in rs) / max(1, steps),
                            "tokens_per_s": steps / max(1e-9, sum(r["seconds"] for r in rs)),
                            "surprise_fetches": sum(r["surprise_fetches"] for r in rs),
                            "miss_fire_rate": sum(r["miss_fires"] for r in rs) /
                            max(1, sum(r["miss_checks"] for r in rs)),
                            "miss_exact_pages_per_check": sum(r["miss_exact_pages"] for r in rs) /
                            max(1, sum(r["miss_checks"] for r in rs)),
                            "fetched_mb": sum(r["pages_fetched"] for r in rs) * spec.page_bytes / 2**20,
                            "prediction_failures": sum(r["prediction_failures"] for r in rs),
                            "tau": rs[0]["tau"], "torch_dense_exact_match": t_em})
                        failures += rows[-1]["prediction_failures"]
                        print_row(rows[-1])
    finally:
        if server:
            server.terminate()
            server.wait(timeout=30)
    print(f"{len(rows)} cells in {time.time() - t_start:.0f} s; dense through the worker "
          f"generated other tokens than torch on {mismatches} questions; {failures} predictions "
          f"failed")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.plots:
        plot(rows, a.plots)
    if a.check and (mismatches or failures):
        sys.exit(1)


HEADER = False


def print_row(r):
    global HEADER
    if not HEADER:
        print(f"{'model':8s} {'task':10s} {'ctx':>5s} {'policy':12s} {'cap':>5s} {'miss':>4s} {'n':>4s} "
              f"{'exact':>6s} {'95% CI':>13s} {'torch':>6s} {'recall':>7s} {'needle':>6s} "
              f"{'footpr':>6s} {'stalls':>6s} {'ms/stp':>6s} {'tok/s':>7s} {'fires':>6s} {'exact/chk':>9s} {'MB':>6s}")
        HEADER = True
    print(f"{r['model']:8s} {r['task']:10s} {r['context'] // 1024:4d}K {r['policy']:12s} "
          f"{r['cap']:5.2f} {r['miss_ratio']:4g} {r['n']:4d} {r['exact_match']:6.3f} "
          f"[{r['exact_match_lo']:.2f}, {r['exact_match_hi']:.2f}] "
          f"{r['torch_dense_exact_match']:6.3f} {r['mass_recall']:7.4f} "
          f"{r['needle_resident']:6.3f} {r['footprint']:6.3f} {r['stall_fraction']:6.3f} "
          f"{r.get('stall_ms_per_step', 0):6.3f} {r['tokens_per_s']:7.1f} {r['miss_fire_rate']:6.3f} "
          f"{r.get('miss_exact_pages_per_check', 0):9.2f} {r['fetched_mb']:6.1f}", flush=True)


def markdown(rows):
    """Markdown tables: per model and context, a row per task and policy, the caps side by
    side; each cell 'exact without check / with check', with the check's stalls per step."""
    out = []
    for m in sorted({r["model"] for r in rows}):
        for c in sorted({r["context"] for r in rows if r["model"] == m}):
            sub = [r for r in rows if r["model"] == m and r["context"] == c]
            caps = sorted({r["cap"] for r in sub if r["policy"] != "dense"})
            out.append(f"\n`{m}` at {c // 1024}K: exact match without / with the miss check "
                       f"[95 % interval with it] (stalls per step with it); tokens/s without / "
                       f"with at the first cap:\n")
            out.append("| task (dense, n) | policy | " + " | ".join(f"cap {cap:g}" for cap in caps) +
                       " | tok/s |")
            out.append("|---" * (3 + len(caps)) + "|")
            for task in [t for t in T.TASKS if any(r["task"] == t for r in sub)]:
                d = [r for r in sub if r["task"] == task and r["policy"] == "dense"]
                head = f"{task} ({d[0]['exact_match']:.2f}, {d[0]['n']})" if d else task
                for pol in [p for p in POLICIES if p != "dense"]:
                    cells, tps = [], ""
                    for cap in caps:
                        get = {r["miss_ratio"]: r for r in sub if r["task"] == task and
                               r["policy"] == pol and r["cap"] == cap}
                        off, on = get.get(0.0), next((v for k, v in get.items() if k > 0), None)
                        txt = f"{off['exact_match']:.2f}" if off else ("–" if on else "")
                        if on:
                            txt += (f" / {on['exact_match']:.2f} [{on['exact_match_lo']:.2f}, "
                                    f"{on['exact_match_hi']:.2f}] ({on['stall_fraction']:.2f})")
                        if get and not tps:
                            tps = " / ".join(f"{r['tokens_per_s']:.0f}" for r in (off, on) if r)
                        cells.append(txt)
                    if any(cells):
                        out.append(f"| {head} | {pol} | " + " | ".join(cells) + f" | {tps} |")
                        head = ""
    return "\n".join(out)


def plot(rows, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    for task in sorted({r["task"] for r in rows}):
        sub = [r for r in rows if r["task"] == task]
        models = sorted({r["model"] for r in sub})
        ctxs = sorted({r["context"] for r in sub})
        fig, axes = plt.subplots(len(models), len(ctxs), figsize=(4.5 * len(ctxs), 3.6 * len(models)),
                                 squeeze=False)
        for i, m in enumerate(models):
            for j, c in enumerate(ctxs):
                ax = axes[i][j]
                cell = [r for r in sub if r["model"] == m and r["context"] == c]
                if not cell:  # not measured for this model
                    ax.axis("off")
                    continue
                for pi, pol in enumerate(POLICIES):
                    for ratio in sorted({r["miss_ratio"] for r in cell}):
                        pts = sorted((r["footprint"], r["exact_match"]) for r in cell
                                     if r["policy"] == pol and r["miss_ratio"] == ratio)
                        if not pts:
                            continue
                        if pol == "dense":
                            ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="dense")
                            continue
                        ax.plot([p[0] for p in pts], [p[1] for p in pts],
                                marker="o" if ratio == 0 else "x", color=f"C{pi}",
                                ls="-" if ratio == 0 else ":",
                                label=pol + (f" +miss {ratio:g}" if ratio else ""))
                ax.set_title(f"{m} {task} {c // 1024}K")
                ax.set_xlabel("footprint (resident / full KV)")
                ax.set_ylabel("exact match")
                ax.set_ylim(-0.02, 1.02)
                ax.grid(alpha=0.3)
        best = max((ax for row in axes for ax in row), key=lambda ax: len(ax.get_lines()))
        h, lab = best.get_legend_handles_labels()
        fig.legend(h, lab, loc="center right", fontsize=8)
        fig.tight_layout(rect=(0, 0, 0.84, 1))
        fig.savefig(os.path.join(out_dir, f"accuracy_{task}.png"), dpi=90)
        plt.close(fig)


if __name__ == "__main__":
    main()
