"""The model zoo's decoder-only transformers (PyTorch, CPU).

Hybrid local/global attention, the layout of long-context models that serve from a sparse
KV cache (Gemma 2/3, Llama 4's iRoPE, Command R7B):

- local layers: sliding-window attention (window `window`) with RoPE. They only ever read
  the last `window` tokens, so the engine (the client) keeps their small cache itself.
- global layers: causal attention over the whole history, no position encoding (NoPE) and a
  length-aware query scale (SSMax, Nakanishi 2025: q_h <- s_h * log(t + 1) * q_h) so that a
  match keeps its share of the softmax as the context grows from the training length to
  128K. These are the layers FlashMemory serves: their K/V are the pages, their queries go
  through the per-layer stream.
- GQA in every attention layer; K and V rounded to bf16 (the KV cache dtype), so the served
  cache holds exactly the values the model computes with.

A forward pass over a long context is chunked (queries in blocks, scores never larger than
~256 MB), and `prefill` returns the caches an incremental `Decoder` continues from.
"""
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    name: str
    vocab: int = 96
    d_model: int = 128
    layers: list = field(default_factory=lambda: ["local", "global", "local", "global"])
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    mlp: int = 384
    window: int = 32
    rope_theta: float = 10000.0
    ssmax_init_len: int = 512  # s_h starts at 1 / log(this)
    shift_embeddings: int = 0  # extra embedding tables for the tokens 1..n positions back

    @property
    def global_layers(self):
        return [i for i, k in enumerate(self.layers) if k == "global"]

    def to_dict(self):
        return asdict(self)


def bf16_round(x):
    return x.to(torch.bfloat16).to(torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def rope(x, pos, theta):
    """x [..., T, H, d], pos [T] (float)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos[:, None] * inv[None, :]  # [T, d/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg, kind):
        super().__init__()
        self.cfg, self.kind = cfg, kind
        hq, hk, d = cfg.q_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, hq * d, bias=False)
        self.wk = nn.Linear(cfg.d_model, hk * d, bias=False)
        self.wv = nn.Linear(cfg.d_model, hk * d, bias=False)
        self.wo = nn.Linear(hq * d, cfg.d_model, bias=False)
        if kind == "global":
            self.ssmax = nn.Parameter(torch.full((hq,), 1.0 / math.log(cfg.ssmax_init_len)))

    def qkv(self, x, pos):
        """x [B, T, D], pos [T] absolute positions -> q [B,T,Hq,d] (scaled for the softmax
        apart from d^-1/2), k, v [B,T,Hkv,d] (bf16-rounded)."""
        c = self.cfg
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, c.q_heads, c.head_dim)
        k = self.wk(x).view(B, T, c.kv_heads, c.head_dim)
        v = self.wv(x).view(B, T, c.kv_heads, c.head_dim)
        if self.kind == "local":
            q, k = rope(q, pos, c.rope_theta), rope(k, pos, c.rope_theta)
        else:
            q = q * (torch.log(pos + 1.0)[:, None, None] * self.ssmax[None, :, None])
        return q, bf16_round(k), bf16_round(v)


def attend(q, k, v, q_pos, k_pos, window=None):
    """Causal (optionally windowed) GQA attention. q [B,Tq,Hq,d]; k, v [B,Tk,Hkv,d].
    Returns out [B,Tq,Hq,d]."""
    B, Tq, Hq, d = q.shape
    Hk = k.shape[2]
    g = Hq // Hk
    # Contiguous operands: torch 1.13's bmm is ~50x slower on strided ones.
    qh = q.permute(0, 2, 1, 3).contiguous()
    kt = k.permute(0, 2, 3, 1).repeat_interleave(g, dim=1).contiguous()  # [B,Hq,d,Tk]
    vh = v.permute(0, 2, 1, 3).repeat_interleave(g, dim=1).contiguous()
    s = torch.matmul(qh, kt) * (d ** -0.5)  # [B,Hq,Tq,Tk]
    mask = k_pos[None, :] > q_pos[:, None]
    if window is not None:
        mask = mask | (k_pos[None, :] <= q_pos[:, None] - window)
    s = s.masked_fill(mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p.contiguous(), vh).permute(0, 2, 1, 3)


class Block(nn.Module):
    def __init__(self, cfg, kind):
        super().__init__()
        self.kind = kind
        self.n1, self.n2 = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, kind)
        # Canon layer (Allen-Zhu, Physics of LMs 4.1): a causal depthwise conv of width 4 on
        # the block's input, so that a token sees its predecessors without first learning
        # a previous-token head; it speeds up learning recall and multi-hop several-fold.
        self.canon = nn.Parameter(torch.zeros(cfg.d_model, 4))
        self.up = nn.Linear(cfg.d_model, 2 * cfg.mlp, bias=False)
        self.down = nn.Linear(cfg.mlp, cfg.d_model, bias=False)

    def mix(self, x, prev=None):
        """x [B, T, D] plus the canon conv over it; prev [B, 3, D] are the three inputs
        before x (zeros at the start)."""
        B, T, D = x.shape
        if prev is None:
            prev = x.new_zeros(B, 3, D)
        xp = torch.cat([prev, x], 1)
        out = x.clone()
        for j in range(4):  # tap j reads the input j tokens back
            out = out + xp[:, 3 - j: 3 - j + T] * self.canon[:, j]
        return out

    def mlp(self, x):
        a, b = self.up(self.n2(x)).chunk(2, dim=-1)
        return self.down(F.silu(a) * b)


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab, cfg.d_model)
        # Shifted token embeddings: the input at t also carries the tokens at t-1..t-n, each
        # through its own table, so a key can name the tokens before it without a learned
        # previous-token head (fast to learn recall; the engine keeps the last n tokens).
        self.shift = nn.ModuleList([nn.Embedding(cfg.vocab, cfg.d_model)
                                    for _ in range(cfg.shift_embeddings)])
        self.blocks = nn.ModuleList([Block(cfg, k) for k in cfg.layers])
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def embed(self, tokens, before=None):
        """tokens [B, T] -> [B, T, D]; before [B, n] are the tokens before them (BOS = 1 pads
        the start)."""
        x = self.emb(tokens)
        n = len(self.shift)
        if n:
            B = tokens.shape[0]
            if before is None:
                before = torch.full((B, n), 1, dtype=tokens.dtype)
            full = torch.cat([before, tokens], 1)
            T = tokens.shape[1]
            for j, e in enumerate(self.shift):
                x = x + e(full[:, n - 1 - j: n - 1 - j + T])
        return x

    def forward(self, tokens):
        """Training forward: tokens [B, T] -> logits [B, T, V] (whole sequence at once)."""
        T = tokens.shape[1]
        pos = torch.arange(T, dtype=torch.float32)
        x = self.embed(tokens)
        for b in self.blocks:
            x = b.mix(x)
            q, k, v = b.attn.qkv(b.n1(x), pos)
            w = self.cfg.window if b.kind == "local" else None
            o = attend(q, k, v, pos, pos, w)
            x = x + b.attn.wo(o.flatten(-2))
            x = x + b.mlp(x)
        return self.head(self.norm(x))

    @torch.no_grad()
    def prefill(self, tokens, progress=None):
        """Runs a long context [T] in query blocks. Returns the Cache a Decoder continues from:
        every global layer's K/V [T, Hkv, d] (bf16 values in fp32), every local layer's last
        `window` K/V, and the logits of the last token. Past the last global layer only the
        last token's path is computed: nothing later reads the others (the served layers' K/V
        come from their inputs), so the last global layer costs O(T), not O(T^2)."""
        c = self.cfg
        T = tokens.shape[0]
        pos = torch.arange(T, dtype=torch.float32)
        x = self.embed(tokens[None])
        cache = Cache(c, T)
        n = c.shift_embeddings
        cache.recent = [1] * max(0, n - T) + tokens[max(0, T - n):].tolist() if n else []
        last_global = max(c.global_layers)
        for li, b in enumerate(self.blocks):
            cache.canon[li] = x[:, -3:].clone() if x.shape[1] >= 3 else torch.cat(
                [x.new_zeros(1, 3 - x.shape[1], c.d_model), x], 1)
            x = b.mix(x)
            q, k, v = b.attn.qkv(b.n1(x), pos[-x.shape[1]:])
            if b.kind == "global":
                cache.k[li], cache.v[li] = k[0].clone(), v[0].clone()
            else:
                cache.k[li], cache.v[li] = k[0, -c.window:].clone(), v[0, -c.window:].clone()
            if li >= last_global:
                # Only the last `keep` tokens go on: enough for the windows of the local layers
                # after the last global one (none in the zoo) to reach the last token.
                keep = min(x.shape[1], (len(self.blocks) - last_global) * (c.window + 3))
                first = T - keep
                if b.kind == "global":
                    out = causal_attention(q[:, -keep:], k, v, first)
                else:
                    off = T - x.shape[1]  # x holds positions [off, T)
                    out = attend(q[:, -keep:], k, v, pos[first:], pos[off:], c.window)
                x = x[:, -keep:] + b.attn.wo(out.flatten(-2))
            else:
                if b.kind == "local":
                    out = torch.empty_like(q)
                    for s in range(0, T, 1024):
                        e = min(T, s + 1024)
                        k0 = max(0, s - c.window + 1)
                        out[:, s:e] = attend(q[:, s:e], k[:, k0:e], v[:, k0:e], pos[s:e],
                                             pos[k0:e], c.window)
                else:
                    out = causal_attention(q, k, v, 0, progress)
                x = x + b.attn.wo(out.flatten(-2))
            x = x + b.mlp(x)
            if progress:
                progress((li + 1) / len(self.blocks))
        cache.logits = self.head(self.norm(x[0, -1]))
        return cache


def causal_attention(q, k, v, first, progress=None):
    """Causal GQA attention of queries at positions first.. over keys 0.. (batch 1), in query
    blocks: the query heads of a KV group share one K^T (no copy per block), scores never
    above ~128 MB, and only the block on the diagonal is masked."""
    _, Tq, Hq, d = q.shape
    Hk = k.shape[2]
    g = Hq // Hk
    kt = k[0].permute(1, 2, 0).contiguous()  # [Hk, d, T]
    vv = v[0].permute(1, 0, 2).contiguous()  # [Hk, T, d]
    qg = q[0].view(Tq, Hk, g, d).permute(1, 0, 2, 3)  # [Hk, Tq, g, d]
    out = torch.empty(Hk, Tq, g, d)
    end = first + Tq
    blk = max(16, min(2048, (1 << 23) // max(1, Hq * end)))
    for s in range(0, Tq, blk):
        e = min(Tq, s + blk)
        last = first + e  # keys [0, last)
        qs = qg[:, s:e].reshape(Hk, (e - s) * g, d)
        sc = torch.matmul(qs, kt[:, :, :last]).mul_(d ** -0.5).view(Hk, e - s, g, last)
        if e - s > 1 or first + s < last - 1:
            qpos = torch.arange(first + s, first + e)
            diag = torch.arange(first + s, last)
            m = diag[None, :] > qpos[:, None]  # [e - s, last - (first + s)]
            sc[:, :, :, first + s:].masked_fill_(m[None, :, None, :], float("-inf"))
        # softmax in place, normalised after the PV product (fewer passes over the scores)
        sc = sc.view(Hk, (e - s) * g, last)
        sc.sub_(sc.amax(dim=-1, keepdim=True)).exp_()
        z = sc.sum(dim=-1, keepdim=True)
        out[:, s:e] = (torch.matmul(sc, vv[:, :last]) / z).view(Hk, e - s, g, d)
        if progress:
            progress(e / Tq)
    return out.permute(1, 0, 2, 3).reshape(1, Tq, Hq, d)


class Cache:
    """What a decoder carries between steps: per layer K/V (global: whole history, local:
    the window), and the position of the next token."""

    def __init__(self, cfg, tokens):
        self.k, self.v = {}, {}
        self.canon = {}  # layer -> the last three inputs of its canon conv [1, 3, D]
        self.recent = []  # the last shift_embeddings tokens
        self.tokens = tokens
        self.logits = None

    def append(self, li, k, v):
        """Appends one token's K and V [Hkv, d] to global layer li. The history grows inside
        a buffer with room to spare (a copy every ~T/8 steps, not every step); k[li] and
        v[li] stay views of it. A cache's copy (copy.copy) must drop `_room`."""
        room = self.__dict__.setdefault("_room", {})
        n = self.k[li].shape[0]
        buf = room.get(li)
        if buf is None or buf[0].shape[0] <= n or buf[0].data_ptr() != self.k[li].data_ptr():
            cap = n + max(256, n // 8)
            bk = torch.empty((cap,) + tuple(k.shape), dtype=self.k[li].dtype)
            bv = torch.empty((cap,) + tuple(v.shape), dtype=self.v[li].dtype)
            bk[:n] = self.k[li]
            bv[:n] = self.v[li]
            buf = room[li] = (bk, bv)
        buf[0][n] = k
        buf[1][n] = v
        self.k[li], self.v[li] = buf[0][:n + 1], buf[1][:n + 1]


def decode_scores(q, k):
    """One token's GQA logits over a history: q [Hq, d] (SSMax-scaled), k [T, Hkv, d] ->
    [Hq, T], d^-1/2 applied. Each KV head's keys are a strided [T, d] view: no copy."""
    Hq, d = q.shape
    Hk = k.shape[1]
    g = Hq // Hk
    return torch.cat([torch.matmul(q[h * g:(h + 1) * g], k[:, h].T) for h in range(Hk)], 0) \
        * (d ** -0.5)


def decode_mix(p, v):
    """Attention weights p [Hq, T] applied to a history's V [T, Hkv, d] -> [Hq, d]."""
    Hk = v.shape[1]
    g = p.shape[0] // Hk
    return torch.cat([torch.matmul(p[h * g:(h + 1) * g], v[:, h]) for h in range(Hk)], 0)


def decode_attend(q, k, v):
    """One token's dense GQA attention over the whole history: q [Hq, d], k, v [T, Hkv, d]
    -> [Hq, d]."""
    return decode_mix(torch.softmax(decode_scores(q, k), dim=-1), v)


class Decoder:
    """Incremental decoding, one token at a time. `global_attend(layer, q, k, v)` computes a
    global layer's attention for the new token: q [Hq, d] (SSMax-scaled), k, v [Hkv, d] of
    the new token; it returns out [Hq, d]. The default is dense attention over `cache` in
    torch (the reference); the evaluation passes the FlashMemory stream instead."""

    def __init__(self, model, cache, global_attend=None, keep_global=True):
        self.m, self.cache = model, cache
        self.global_attend = global_attend or self._dense
        self.keep_global = keep_global
        self.captured = {}  # layer -> (q, k) of the last step, for index keys and queries

    def _dense(self, li, q, k, v):
        c = self.cache
        c.append(li, k, v)
        return decode_attend(q, c.k[li], c.v[li])

    @torch.no_grad()
    def step(self, token):
        m, c, cfg = self.m, self.cache, self.m.cfg
        t = c.tokens
        pos = torch.tensor([float(t)])
        n = cfg.shift_embeddings
        x = m.embed(torch.tensor([[token]]), torch.tensor([c.recent]) if n else None)
        if n:
            c.recent = (c.recent + [token])[-n:]
        for li, b in enumerate(m.blocks):
            prev = c.canon[li]
            c.canon[li] = torch.cat([prev, x], 1)[:, -3:]
            x = b.mix(x, prev)
            q, k, v = b.attn.qkv(b.n1(x), pos)
            q, k, v = q[0, 0], k[0, 0], v[0, 0]
            if b.kind == "local":
                kk = torch.cat([c.k[li], k[None]], 0)[-cfg.window:]
                vv = torch.cat([c.v[li], v[None]], 0)[-cfg.window:]
                c.k[li], c.v[li] = kk, vv
                n = kk.shape[0]
                kp = torch.arange(t - n + 1, t + 1, dtype=torch.float32)
                o = attend(q[None, None], kk[None], vv[None], pos, kp, cfg.window)[0, 0]
            else:
                self.captured[li] = (q, k)
                o = self.global_attend(li, q, k, v)
            x = x + b.attn.wo(o.flatten()[None, None])
            x = x + b.mlp(x)
        c.tokens += 1
        c.logits = m.head(m.norm(x[0, 0]))
        return c.logits


def save_model(model, path, extra_meta=None):
    import json
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "trainer"))
    from fm_trace import save_safetensors
    tensors = {k: v.detach().numpy().astype("float32") for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(model.cfg.to_dict())}
    meta.update(extra_meta or {})
    save_safetensors(path, tensors, meta)


def load_model(path):
    import json
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "trainer"))
    from fm_trace import load_safetensors
    t, meta = load_safetensors(path)
    cfg = ModelConfig(**json.loads(meta["config"]))
    m = Transformer(cfg)
    m.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in t.items()})
    m.eval()
    return m, meta
