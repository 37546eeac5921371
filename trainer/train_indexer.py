#!/usr/bin/python3
"""Trains the indexer's query tower as the query side of a dual encoder (DESIGN §3).

Backbone-free: it reads traces (hidden states at cycle starts, compressed index keys, golden
labels) and never needs the model that produced them. Each step takes a batch of cycles;
for each, every positive chunk and 3 sampled negatives per positive; the score of a chunk
is max over index layers of sigmoid(sum_h w_h relu(q_h . k_c)); binary cross-entropy or
focal loss, plus a page-level term (a page scores as its best chunk and is positive when any
chunk is) that keeps lone positives such as needles from being diluted. Validation on held-out traces: precision, recall, F1 at theta = 0.5 and
recall@budget (positives in the pages the page selection keeps at the budget); early
stopping on validation recall@budget (or F1), never inside the learning-rate warm-up.
Without --val, a tenth of the training traces (at least one, chosen by --seed) is held out.
Exports safetensors that fm-indexer loads (LoadWeights), unless the best tower is
degenerate (validation precision and recall both 0, or a score that does not vary over
chunks): then it says why and exits with status 2 (--allow-degenerate exports it anyway).
scripts/train_indexer.sh uses these defaults as they are.

Traces whose index keys hold the model's own K and whose hidden state is the index layers'
queries (a model without a native indexer; docs/own-model.md) train the token_query tower
instead (trainer/token_query.py): --tower auto picks it for them.

  /usr/bin/python3 trainer/train_indexer.py --train 'traces/train-*.safetensors' \
      --val 'traces/val-*.safetensors' --out models/lsa-bench.safetensors
"""
import argparse
import glob
import math
import sys
import time

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fm_indexer import QueryTower  # noqa: E402
from fm_trace import Trace  # noqa: E402
import token_query  # noqa: E402


class Cycles:
    """Every cycle of a set of traces: hidden, position, keys in use, labels."""

    def __init__(self, paths):
        self.items = []
        self.traces = []
        for p in paths:
            t = Trace(p)
            keys = torch.from_numpy(t.decoded_keys())  # [L, C, di]
            self.traces.append(t)
            for k in range(t.cycles):
                s0 = k * t.tau
                n = t.indexed_chunks(s0)
                self.items.append({
                    "trace": t, "keys": keys[:, :n], "hidden": torch.from_numpy(t.hidden[s0].copy()),
                    "pos": t.tokens_at(s0),
                    "labels": torch.from_numpy(t.labels[k, :n].astype(np.float32)),
                })

    def __len__(self):
        return len(self.items)


def chunk_scores(tower, item, idx=None):
    q, w = tower(item["hidden"][None], torch.tensor([item["pos"]]))
    keys = item["keys"] if idx is None else item["keys"][:, idx]
    return QueryTower.logits(q[0], w[0], keys)  # [L, n]


def loss_fn(logits, y, kind, gamma):
    # score = max_l sigmoid(logit_l) = sigmoid(max_l logit_l)
    z = logits.max(0).values
    if kind == "bce":
        return torch.nn.functional.binary_cross_entropy_with_logits(z, y)
    p = torch.sigmoid(z)
    pt = torch.where(y > 0.5, p, 1 - p)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    return ((1 - pt) ** gamma * ce).mean()


def page_loss(logits, y, chunks_per_page):
    """BCE on pages: a page's score is its best chunk's (max over layers and chunks); it is
    positive when any of its chunks is. Page selection needs one strong chunk per wanted
    page, so this term carries lone positives (needles) that the chunk term dilutes."""
    z = logits.max(0).values
    n = z.shape[0]
    pages = (n + chunks_per_page - 1) // chunks_per_page
    pad = pages * chunks_per_page - n
    zp = torch.nn.functional.pad(z, (0, pad), value=-1e4).view(pages, chunks_per_page).max(1).values
    yp = torch.nn.functional.pad(y, (0, pad)).view(pages, chunks_per_page).max(1).values
    pos = yp.sum().clamp(min=1)
    w = torch.where(yp > 0.5, (pages - pos) / pos, torch.ones_like(yp))
    return torch.nn.functional.binary_cross_entropy_with_logits(zp, yp, weight=w) / 2


def evaluate(tower, data, budget, theta=0.5):
    tp = fp = fn = 0
    rec_b, n_b = 0.0, 0
    with torch.no_grad():
        for it in data.items:
            t = it["trace"]
            z = chunk_scores(tower, it).max(0).values
            pred = torch.sigmoid(z) > theta
            y = it["labels"] > 0.5
            tp += int((pred & y).sum()); fp += int((pred & ~y).sum()); fn += int((~pred & y).sum())
            # recall@budget: positives inside the pages that page selection keeps
            cpp = t.chunks_per_page
            n = len(y)
            pages = (n + cpp - 1) // cpp + 1  # sealed pages + the open one
            kept = torch.zeros(pages)
            kept[: (n + cpp - 1) // cpp].index_add_(0, torch.arange(n) // cpp, pred.float())
            best = torch.full((pages,), -1e30)
            best[: (n + cpp - 1) // cpp] = torch.zeros((n + cpp - 1) // cpp).index_reduce_(
                0, torch.arange(n) // cpp, z, "amax", include_self=False)
            k = max(0, math.ceil(budget * pages) - 3)
            mid = torch.arange(1, pages - 2)
            order = sorted(mid.tolist(), key=lambda p: (-float(kept[p]), -float(best[p]), -p))[:k]
            sel = set(order) | {0, pages - 2, pages - 1}
            ypages = (torch.nonzero(y).flatten() // cpp).tolist()
            if ypages:
                rec_b += sum(1 for p in ypages if p in sel) / len(ypages)
                n_b += 1
    prec = tp / max(1, tp + fp)
    rec = tp / max(1, tp + fn)
    f1 = 2 * prec * rec / max(1e-9, prec + rec)
    return {"precision": prec, "recall": rec, "f1": f1, "recall_at_budget": rec_b / max(1, n_b)}


def score_spread(tower, data):
    """The largest standard deviation of the chunk scores within one validation cycle: 0 for
    a tower whose score is constant or tied over the chunks."""
    spread = 0.0
    with torch.no_grad():
        for it in data.items:
            z = torch.sigmoid(chunk_scores(tower, it).max(0).values)
            if z.numel() > 1:
                spread = max(spread, float(z.std()))
    return spread


def degenerate(metrics, spread):
    """Why a tower with these validation metrics and score spread must not be served, or
    None."""
    if metrics["precision"] == 0 and metrics["recall"] == 0:
        return ("validation precision and recall are 0 at theta 0.5: the tower keeps no "
                "labelled chunk (more traces, more epochs, or check the labels)")
    if spread < 1e-6:
        return "the tower's score does not vary over the chunks of any validation cycle"
    return None


def split(paths, seed):
    """(train, validation) paths: a tenth of the traces, at least one, held out."""
    if len(paths) < 2:
        sys.exit("need at least 2 traces to hold one out for validation (or pass --val)")
    rng = np.random.default_rng(seed)
    held = set(rng.choice(len(paths), size=max(1, len(paths) // 10), replace=False).tolist())
    return ([p for i, p in enumerate(paths) if i not in held],
            [p for i, p in enumerate(paths) if i in held])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", required=True, help="glob of training traces")
    ap.add_argument("--val", help="glob of validation traces (other sessions of the same trace "
                    "mode); default: a tenth of the training traces")
    ap.add_argument("--out", required=True, help="weights file to write (safetensors)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8, help="cycles per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--negatives", type=int, default=3, help="sampled negatives per positive")
    ap.add_argument("--loss", choices=["bce", "focal"], default="focal")
    ap.add_argument("--gamma", type=float, default=2.0, help="focal loss exponent")
    ap.add_argument("--patience", type=int, default=5, help="epochs without a better validation score")
    ap.add_argument("--select", choices=["recall_at_budget", "f1"], default="recall_at_budget",
                    help="validation score that picks the exported epoch and stops early")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--page-loss", type=float, default=2.0,
                    help="weight of the page-level term (0 = chunk-level loss only)")
    ap.add_argument("--dtype", choices=["f32", "f16"], default="f16", help="exported weights")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tower", choices=["auto", "chunk", "token_query"], default="auto",
                    help="auto: token_query for traces in its layout (own K as index keys, the "
                    "index layers' queries as hidden state), else chunk")
    ap.add_argument("--drift", type=float, default=1e-4,
                    help="token_query: weight of the squared distance from the model_query start")
    ap.add_argument("--tq_loss", choices=["max", "mix"], default="max",
                    help="token_query: the page distribution the cycle's mass is matched with "
                    "(trainer/token_query.py)")
    ap.add_argument("--tq_target", choices=["sharp", "mass"], default="sharp",
                    help="token_query: the cycle's page distribution to match (trainer/token_query.py)")
    ap.add_argument("--allow-degenerate", action="store_true",
                    help="export even a tower that separates nothing (for tests of the export)")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    train_paths = sorted(glob.glob(a.train))
    if not train_paths:
        sys.exit(f"no traces match {a.train!r}")
    if a.val:
        val_paths = sorted(glob.glob(a.val))
        if not val_paths:
            sys.exit(f"no traces match {a.val!r}")
    else:
        train_paths, val_paths = split(train_paths, a.seed)
        print(f"validation: {len(val_paths)} of the training traces held out", flush=True)
    t0 = time.time()
    first = Trace(train_paths[0])
    kind = a.tower if a.tower != "auto" else (
        "token_query" if token_query.is_token_query_trace(first) else "chunk")
    if kind == "token_query":
        if not token_query.is_token_query_trace(first):
            sys.exit("--tower token_query needs traces whose index keys hold the model's own K "
                     "(index_dim = chunk_tokens x kv_heads x head_dim, index_heads = q_heads) and "
                     "whose hidden state is the index layers' queries (hidden_dim = index_layers "
                     "x q_heads x head_dim)")
        token_query.train([Trace(p) for p in train_paths], [Trace(p) for p in val_paths], a,
                          {"spec_name": first.meta.get("spec_name", "")})
        return
    train, val = Cycles(train_paths), Cycles(val_paths)
    t = train.traces[0]
    print(f"{len(train)} training cycles from {len(train_paths)} traces, {len(val)} validation "
          f"cycles; spec Li={t.index_layers} Hi={t.index_heads} di={t.index_dim} "
          f"hidden={t.hidden_dim}; loaded in {time.time() - t0:.1f} s", flush=True)
    tower = QueryTower(t.index_layers, t.index_heads, t.index_dim, t.hidden_dim, a.rank, t.rope_dims)
    opt = torch.optim.Adam(tower.parameters(), lr=a.lr)
    steps_per_epoch = math.ceil(len(train) / a.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.epochs * steps_per_epoch,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(a.seed)
    # Early stopping counts only epochs after the warm-up (OneCycle's first 10 %).
    warm_epochs = math.ceil(0.1 * a.epochs)
    best_score, best_state, best_m, stale = -1.0, None, None, 0
    for epoch in range(a.epochs):
        perm = torch.randperm(len(train), generator=gen).tolist()
        total, steps = 0.0, 0
        for b0 in range(0, len(perm), a.batch):
            opt.zero_grad()
            loss = 0.0
            for i in perm[b0:b0 + a.batch]:
                it = train.items[i]
                y = it["labels"]
                pos = torch.nonzero(y > 0.5).flatten()
                neg_all = torch.nonzero(y < 0.5).flatten()
                nneg = min(len(neg_all), max(1, a.negatives * len(pos)))
                neg = neg_all[torch.randint(len(neg_all), (nneg,), generator=gen)]
                idx = torch.cat([pos, neg])
                if a.page_loss > 0:  # every chunk is scored anyway: score once, index it
                    full = chunk_scores(tower, it)
                    loss = loss + loss_fn(full[:, idx], y[idx], a.loss, a.gamma)
                    loss = loss + a.page_loss * page_loss(full, y, it["trace"].chunks_per_page)
                else:
                    loss = loss + loss_fn(chunk_scores(tower, it, idx), y[idx], a.loss, a.gamma)
            loss = loss / len(perm[b0:b0 + a.batch])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss); steps += 1
        m = evaluate(tower, val, a.budget)
        print(f"epoch {epoch + 1:3d}  loss {total / steps:.4f}  val precision {m['precision']:.3f} "
              f"recall {m['recall']:.3f} F1 {m['f1']:.3f} recall@{a.budget:g} {m['recall_at_budget']:.3f}"
              f"  ({time.time() - t0:.0f} s)", flush=True)
        if m[a.select] > best_score + 1e-4:
            best_score, best_m, stale = m[a.select], m, 0
            best_state = {k: v.clone() for k, v in tower.state_dict().items()}
        elif epoch + 1 > warm_epochs:
            stale += 1
            if stale >= a.patience:
                print(f"early stop: no better validation {a.select} for {a.patience} epochs")
                break
    tower.load_state_dict(best_state)
    why = degenerate(best_m, score_spread(tower, val))
    if why:
        print(f"degenerate tower: {why}", flush=True)
        if not a.allow_degenerate:
            print(f"not writing {a.out}", flush=True)
            sys.exit(2)
    tower.export(a.out, np.float16 if a.dtype == "f16" else np.float32,
                 {"spec_name": t.meta.get("spec_name", ""), "world_seed": t.meta.get("world_seed", ""),
                  f"val_{a.select}": f"{best_score:.4f}"})
    print(f"wrote {a.out} (best validation {a.select} {best_score:.3f})")


if __name__ == "__main__":
    main()
