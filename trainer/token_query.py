"""The token_query tower: lsa for a model without a native lightning indexer (docs/own-model.md).

The index keys hold the model's own K ([token][kv_head][head_dim] per chunk) and the hidden
state for Predict is the step's decode queries of the index layers, concatenated. The tower
predicts, from that hidden state at a cycle start, a query per index layer that stands for
the whole cycle to come:

  q_l = W_l h + b_l                                     [q_heads, head_dim]
  share_{l,h}(p) = sum_{t in page p} softmax_t(scale * q_{l,h} . k_{t, h / group})
  score(p) = max_{l,h} share_{l,h}(p)

(fm-indexer computes the same in IndexerCore::Predict; tests/trainer_parity_test.cc.)
W_l starts as the identity on layer l's block of h, so before training the tower is the
training-free model_query policy; training distills the attention of the next tau steps
into it: the loss is the cross-entropy of the cycle's dense page mass (from the trace)
against a softmax over pages of the ranking score, log max_{l,h} share_{l,h}(p)
(--tq_loss max, the default), or against the mean of share_{l,h} over layers and heads
(--tq_loss mix). The cycle's page mass is either its steps' mass summed (--tq_target mass)
or each step's squared and renormalized first (--tq_target sharp, the default), so that
the pages a step reads sharply (a retrieval) count more than a step's diffuse spread.
"""
import math

import numpy as np
import torch


def is_token_query_trace(t):
    """Whether a trace's index keys hold the model's own K and its hidden state is the
    index layers' queries (the token_query layout)."""
    return (t.index_dim == t.chunk_tokens * t.kv_heads * t.head_dim and t.index_heads == t.q_heads
            and t.hidden_dim == t.index_layers * t.q_heads * t.head_dim)


class TokenQueryTower(torch.nn.Module):
    def __init__(self, layers, heads, head_dim, hidden, index_dim):
        super().__init__()
        self.layers, self.heads, self.head_dim, self.hidden = layers, heads, head_dim, hidden
        self.index_dim = index_dim
        o = heads * head_dim
        w = torch.zeros(layers, o, hidden)
        if hidden == layers * o:  # the identity on layer l's queries: model_query
            for l in range(layers):
                w[l, :, l * o:(l + 1) * o] = torch.eye(o)
        self.w_q = torch.nn.Parameter(w)
        self.b_q = torch.nn.Parameter(torch.zeros(layers, o))
        self.register_buffer("w0", w.clone())

    def forward(self, h):
        """h [hidden] -> q [L, Hq, d]."""
        q = torch.einsum("lox,x->lo", self.w_q, h) + self.b_q
        return q.view(self.layers, self.heads, self.head_dim)

    def drift(self):
        """Squared distance from the model_query start (the regulariser)."""
        return (self.w_q - self.w0).pow(2).sum() + self.b_q.pow(2).sum()

    def export(self, path, extra_meta=None):
        from fm_trace import save_safetensors
        t = {}
        for l in range(self.layers):
            t[f"layer{l}.w_q"] = self.w_q[l].detach().numpy().astype(np.float32)
            t[f"layer{l}.b_q"] = self.b_q[l].detach().numpy().astype(np.float32)
        meta = {"tower": "token_query", "index_layers": self.layers, "index_heads": self.heads,
                "index_dim": self.index_dim, "hidden_dim": self.hidden, "head_dim": self.head_dim}
        meta.update(extra_meta or {})
        save_safetensors(path, t, meta)

    @classmethod
    def load(cls, path):
        from fm_trace import load_safetensors
        t, m = load_safetensors(path)
        tower = cls(int(m["index_layers"]), int(m["index_heads"]), int(m["head_dim"]),
                    int(m["hidden_dim"]), int(m["index_dim"]))
        with torch.no_grad():
            for l in range(tower.layers):
                tower.w_q[l] = torch.from_numpy(t[f"layer{l}.w_q"].astype(np.float32))
                tower.b_q[l] = torch.from_numpy(t[f"layer{l}.b_q"].astype(np.float32))
        return tower


def page_log_shares(q, tokens_k, page_tokens, scale):
    """q [L, Hq, d], tokens_k [L, T, Hkv, d] -> log share [L, Hq, P] of each page (the last
    may be partial) in each head's softmax over the T tokens."""
    L, Hq, d = q.shape
    T, Hkv = tokens_k.shape[1], tokens_k.shape[2]
    g = Hq // Hkv
    qg = q.view(L, Hkv, g, d)
    logits = torch.einsum("lkgd,ltkd->lkgt", qg, tokens_k).reshape(L, Hq, T) * scale
    logp = torch.log_softmax(logits, -1)
    P = -(-T // page_tokens)
    pad = P * page_tokens - T
    logp = torch.nn.functional.pad(logp, (0, pad), value=-1e30)
    return torch.logsumexp(logp.view(L, Hq, P, page_tokens), -1)


class TokenQueryCycles:
    """Every cycle of a set of token_query traces: the hidden state at its start, the model's
    K of the tokens indexed then, and the dense page mass over its tau steps."""

    def __init__(self, traces):
        self.items = []
        for t in traces:
            keys = t.decoded_keys()  # [L, C, ct * Hkv * d]
            L, C = keys.shape[0], keys.shape[1]
            tok = torch.from_numpy(keys.reshape(L, C * t.chunk_tokens, t.kv_heads, t.head_dim))
            scale = float(t.meta.get("softmax_scale", 0) or 0) or 1.0 / math.sqrt(t.head_dim)
            for k in range(t.cycles):
                s0 = k * t.tau
                n = t.indexed_chunks(s0)
                pages = n // t.chunks_per_page
                if pages < 4:
                    continue
                steps = t.page_mass[s0:s0 + t.tau, :pages].astype(np.float64)
                mass = steps.sum(0)
                # sharp: each step's mass squared and renormalized, summed over the cycle: the
                # pages a step reads sharply (a retrieval) outweigh its diffuse spread
                sq = steps ** 2
                sharp = (sq / np.maximum(sq.sum(1, keepdims=True), 1e-30)).sum(0)
                if mass.sum() <= 0:
                    continue
                self.items.append({
                    "hidden": torch.from_numpy(t.hidden[s0].astype(np.float32).copy()),
                    "keys": tok[:, :n * t.chunk_tokens], "mass": torch.from_numpy(mass / mass.sum()).float(),
                    "sharp": torch.from_numpy(sharp / sharp.sum()).float(),
                    # each step's most attended page besides sink and tail (its peak)
                    "peaks": torch.from_numpy(steps[:, 1:pages - 2].argmax(1) + 1),
                    "page_tokens": t.page_tokens, "scale": scale,
                    "chunks_per_page": t.chunks_per_page})

    def __len__(self):
        return len(self.items)


def cycle_loss(tower, it, kind="max", target="sharp"):
    """mix: cross-entropy of the cycle's page mass against the mean page distribution of
    the layers and heads. max: the same against a softmax over pages of the score that page
    selection ranks by (the log of a page's best head share), so that the pages the cycle
    attends to rank first."""
    ls = page_log_shares(tower(it["hidden"]), it["keys"], it["page_tokens"], it["scale"])
    L, H, P = ls.shape
    if kind == "mix":
        logq = torch.logsumexp(ls.reshape(L * H, P), 0) - math.log(L * H)
    else:
        logq = torch.log_softmax(ls.reshape(L * H, P).max(0).values, 0)
    return -(it[target] * logq).sum()


def evaluate(tower, data, budget):
    """Mean over cycles of the share of the cycle's dense page mass and of its steps' peak
    pages (the most attended page of each step: the needle a retrieval reads) in the pages
    the score keeps at the budget (besides sink page 0 and the last two: the always-resident
    ones). The trace's golden labels (top-p chunks) are not used: on a model whose attention
    between retrievals is diffuse they cover most chunks."""
    mass_rec, peak_rec = 0.0, 0.0
    with torch.no_grad():
        for it in data.items:
            score = page_log_shares(tower(it["hidden"]), it["keys"], it["page_tokens"],
                                    it["scale"]).flatten(0, 1).max(0).values
            P = score.shape[0]
            k = max(1, math.ceil(budget * (P + 1)) - 3)
            mid = score[1:P - 2]
            keep = {0, P - 2, P - 1} | set((torch.topk(mid, min(k, len(mid))).indices + 1).tolist())
            sel = torch.zeros(P, dtype=torch.bool)
            sel[list(keep)] = True
            mass_rec += float(it["mass"][sel].sum())
            peak_rec += float(sel[it["peaks"]].float().mean())
    return {"mass_at_budget": mass_rec / max(1, len(data)),
            "peak_at_budget": peak_rec / max(1, len(data))}


def train(train_traces, val_traces, a, out_meta):
    """Trains, keeps the best epoch by validation mass + peak recall at the budget (the model_query start
    counts as epoch 0, so the export never does worse than it on validation), exports."""
    import time
    t0 = time.time()
    tr, va = TokenQueryCycles(train_traces), TokenQueryCycles(val_traces)
    t = train_traces[0]
    print(f"token_query tower: {len(tr)} training cycles, {len(va)} validation cycles; "
          f"Li={t.index_layers} Hq={t.q_heads} d={t.head_dim} hidden={t.hidden_dim}", flush=True)
    if not len(tr) or not len(va):
        raise SystemExit("no usable cycles (a cycle needs 4 indexed pages and dense page mass)")
    tower = TokenQueryTower(t.index_layers, t.q_heads, t.head_dim, t.hidden_dim, t.index_dim)
    opt = torch.optim.Adam(tower.parameters(), lr=a.lr)
    gen = torch.Generator().manual_seed(a.seed)
    score = lambda m: m["peak_at_budget"] + m["mass_at_budget"]  # noqa: E731
    show = lambda m: (f"mass@{a.budget:g} {m['mass_at_budget']:.3f} peak@{a.budget:g} "  # noqa: E731
                      f"{m['peak_at_budget']:.3f}")
    m = evaluate(tower, va, a.budget)
    print(f"epoch   0  (model_query start)  val {show(m)}", flush=True)
    best, best_m, best_state, stale = score(m), m, {k: v.clone() for k, v in tower.state_dict().items()}, 0
    for epoch in range(a.epochs):
        perm = torch.randperm(len(tr), generator=gen).tolist()
        total = 0.0
        for b0 in range(0, len(perm), a.batch):
            opt.zero_grad()
            batch = perm[b0:b0 + a.batch]
            loss = sum(cycle_loss(tower, tr.items[i], a.tq_loss, a.tq_target)
                       for i in batch) / len(batch)
            loss = loss + a.drift * tower.drift()
            loss.backward()
            opt.step()
            total += float(loss) * len(batch)
        m = evaluate(tower, va, a.budget)
        print(f"epoch {epoch + 1:3d}  loss {total / len(tr):.4f}  val {show(m)}  "
              f"({time.time() - t0:.0f} s)", flush=True)
        if score(m) > best + 1e-4:
            best, best_m, stale = score(m), m, 0
            best_state = {k: v.clone() for k, v in tower.state_dict().items()}
        else:
            stale += 1
            if stale >= a.patience:
                print(f"early stop: no better validation score for {a.patience} epochs")
                break
    tower.load_state_dict(best_state)
    meta = dict(out_meta)
    meta.update({"val_mass_at_budget": f"{best_m['mass_at_budget']:.4f}",
                 "val_peak_at_budget": f"{best_m['peak_at_budget']:.4f}"})
    tower.export(a.out, meta)
    print(f"wrote {a.out} (validation {show(best_m)})")
