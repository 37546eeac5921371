"""The indexer's query tower and chunk scoring in PyTorch, with the C++ arithmetic
(kernels/include/flashmemory/kernels/indexer.h):

  a  = W_a h;  n = a / sqrt(mean(a^2) + eps) * g;  qv = W_b n  -> [Hi, di]
  RoPE (NeoX half split) on the last rope_dims dims at the token position
  q  = Hadamard(qv) / sqrt(di);  w = (W_w h) / sqrt(di * Hi)
  logit_l(c) = sum_h w_h relu(q_h . k_c);  score(c) = max_l sigmoid(logit_l(c))
"""
import math

import numpy as np
import torch


def hadamard_matrix(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


class QueryTower(torch.nn.Module):
    def __init__(self, layers, heads, dim, hidden, rank, rope_dims, rope_theta=10000.0, eps=1e-6):
        super().__init__()
        self.layers, self.heads, self.dim, self.hidden, self.rank = layers, heads, dim, hidden, rank
        self.rope_dims, self.rope_theta, self.eps = rope_dims, rope_theta, eps
        self.w_a = torch.nn.Parameter(torch.randn(layers, rank, hidden) / math.sqrt(hidden))
        self.g = torch.nn.Parameter(torch.ones(layers, rank))
        self.w_b = torch.nn.Parameter(torch.randn(layers, heads * dim, rank) / math.sqrt(rank))
        self.w_w = torch.nn.Parameter(torch.randn(layers, heads, hidden) * 0.01)
        self.register_buffer("had", hadamard_matrix(dim).float() / math.sqrt(dim))
        half = rope_dims // 2
        inv = torch.tensor([rope_theta ** (-2.0 * i / rope_dims) for i in range(half)],
                           dtype=torch.float64)
        self.register_buffer("inv_freq", inv)

    def forward(self, h, pos):
        """h [B, hidden], pos [B] (int) -> q [B, L, Hi, di], w [B, L, Hi]."""
        a = torch.einsum("lrx,bx->blr", self.w_a, h)
        n = a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + self.eps) * self.g
        qv = torch.einsum("lor,blr->blo", self.w_b, n).reshape(h.shape[0], self.layers, self.heads, self.dim)
        r0, half = self.dim - self.rope_dims, self.rope_dims // 2
        ang = pos.to(torch.float64)[:, None] * self.inv_freq[None, :]
        c = torch.cos(ang).float()[:, None, None, :]
        s = torch.sin(ang).float()[:, None, None, :]
        x1, x2 = qv[..., r0:r0 + half], qv[..., r0 + half:]
        qv = torch.cat([qv[..., :r0], x1 * c - x2 * s, x2 * c + x1 * s], -1)
        q = qv @ self.had  # the Hadamard matrix is symmetric
        w = torch.einsum("lhx,bx->blh", self.w_w, h) / math.sqrt(self.dim * self.heads)
        return q, w

    @staticmethod
    def logits(q, w, keys):
        """q [L, Hi, di], w [L, Hi], keys [L, C, di] -> [L, C]."""
        return torch.einsum("lh,lhc->lc", w, torch.relu(torch.einsum("lhd,lcd->lhc", q, keys)))

    def export(self, path, dtype=np.float32, extra_meta=None):
        from fm_trace import save_safetensors
        t = {}
        for l in range(self.layers):
            t[f"layer{l}.w_a"] = self.w_a[l].detach().numpy().astype(dtype)
            t[f"layer{l}.g"] = self.g[l].detach().numpy().astype(dtype)
            t[f"layer{l}.w_b"] = self.w_b[l].detach().numpy().astype(dtype)
            t[f"layer{l}.w_w"] = self.w_w[l].detach().numpy().astype(dtype)
        meta = {"index_layers": self.layers, "index_heads": self.heads, "index_dim": self.dim,
                "hidden_dim": self.hidden, "rank": self.rank, "rope_dims": self.rope_dims,
                "rope_theta": self.rope_theta}
        meta.update(extra_meta or {})
        save_safetensors(path, t, meta)

    @classmethod
    def load(cls, path):
        from fm_trace import load_safetensors
        t, m = load_safetensors(path)
        L = int(m["index_layers"])
        tower = cls(L, int(m["index_heads"]), int(m["index_dim"]), int(m["hidden_dim"]),
                    int(m["rank"]), int(m["rope_dims"]), float(m.get("rope_theta", 10000.0)))
        with torch.no_grad():
            for l in range(L):
                tower.w_a[l] = torch.from_numpy(t[f"layer{l}.w_a"].astype(np.float32))
                tower.g[l] = torch.from_numpy(t[f"layer{l}.g"].astype(np.float32))
                tower.w_b[l] = torch.from_numpy(t[f"layer{l}.w_b"].astype(np.float32))
                tower.w_w[l] = torch.from_numpy(t[f"layer{l}.w_w"].astype(np.float32))
        return tower
