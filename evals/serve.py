"""A zoo model served by FlashMemory as an inference engine would serve it.

The client (this process) runs the model: embeddings, canon convs, local layers, MLPs and
the head. Every global attention layer is served by the decode worker through the
per-layer stream: for each decode step and global layer the client sends the layer's
query and the new token's K and V, and gets the attention output back.

What a model without a native lightning indexer sends as index keys (docs/own-model.md):
for index layer l (the l-th global layer), chunk c's key is the model's own K of that
layer for the chunk's tokens, [token][kv_head][head_dim], compressed like every index key
(fp8-e4m3 with one fp32 scale; trainer/convert_dump.compress_keys, bit-identical to the
worker's). index_dim = chunk_tokens x kv_heads x head_dim and index_heads = q_heads, so
the model's own query scores every history token exactly as its attention does
(policy model_query) and a learned tower has the same keys to learn from.

What it sends as the hidden state for Predict: the step's queries of every global layer,
concatenated, [index_layers][q_heads][head_dim] (hidden_dim = index_layers x q_heads x
head_dim), on the request of the step's last global layer. The token_query lsa tower maps
it to a predicted query per index layer, scored like the model's own (docs/own-model.md).
"""
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.join(ROOT, "trainer"))
sys.path.insert(0, os.path.join(ROOT, "evals", "zoo"))
from convert_dump import compress_keys  # noqa: E402
from flashmemory_client import Spec  # noqa: E402
from flashmemory_client.client import request, result_arrays  # noqa: E402
from model import decode_mix, decode_scores  # noqa: E402

CHUNK = 4
PAGE = 64


def spec_for(model):
    c = model.cfg
    g = len(c.global_layers)
    return Spec(name=c.name, layers=g, q_heads=c.q_heads, kv_heads=c.kv_heads, head_dim=c.head_dim,
                dtype="bf16", page_tokens=PAGE, index_layers=g, index_heads=c.q_heads,
                index_dim=CHUNK * c.kv_heads * c.head_dim, chunk_tokens=CHUNK,
                hidden_dim=g * c.q_heads * c.head_dim)


def bf16_bits(x):
    """float32 values that are bf16 already -> their uint16 bits."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def prefill_arrays(model, cache, tokens):
    """(pages [n, page_bytes] uint8, index keys [Li, chunks, di + 4] uint8) of the first
    `tokens` tokens of a torch prefill cache."""
    c = model.cfg
    G = c.global_layers
    n_pages = -(-tokens // PAGE)
    kv = np.zeros((n_pages, len(G), 2, c.kv_heads, PAGE, c.head_dim), np.uint16)
    keys = []
    for i, li in enumerate(G):
        k = cache.k[li][:tokens].numpy()  # [T, Hkv, d]
        v = cache.v[li][:tokens].numpy()
        for which, x in ((0, k), (1, v)):
            pad = np.zeros((n_pages * PAGE, c.kv_heads, c.head_dim), np.float32)
            pad[:tokens] = x
            kv[:, i, which] = bf16_bits(pad).reshape(n_pages, PAGE, c.kv_heads,
                                                     c.head_dim).transpose(0, 2, 1, 3)
        chunks = tokens // CHUNK
        keys.append(k[:chunks * CHUNK].reshape(chunks, CHUNK * c.kv_heads * c.head_dim))
    return kv.reshape(n_pages, -1).view(np.uint8), compress_keys(np.stack(keys))


class WorkerAttention:
    """The Decoder's global_attend that serves a session's global layers from a worker.

    Keeps the session's full global K/V here too (the evaluation's dense reference: the
    dense log-sum-exp of each query gives the mass recall of the worker's answer)."""

    def __init__(self, stream, sid, model, cache):
        self.stream, self.sid, self.m, self.cache = stream, sid, model, cache
        self.G = model.cfg.global_layers
        self.step = 0
        # K of each global layer since the last complete chunk (the prefill's partial chunk
        # first): the keys of a chunk go out on the request of the step that completes it.
        T = cache.tokens
        self.chunk_k = {li: [cache.k[li][i].numpy() for i in range(T - T % CHUNK, T)]
                        for li in self.G}
        self.queries = []  # this step's queries of the global layers so far (the hidden state)
        self.recall = []   # per (step, layer, head): exp(lse_sparse - lse_dense), capped at 1
        self.stalls = 0
        self.seconds = 0.0

    def __call__(self, li, q, k, v):
        c = self.cache
        c.append(li, k, v)
        pos = c.tokens  # the new token's position
        layer = self.G.index(li)
        self.chunk_k[li].append(k.numpy())
        keys = None
        last = layer == len(self.G) - 1
        if last and (pos + 1) % CHUNK == 0:
            keys = compress_keys(np.stack([np.stack(self.chunk_k[g]).reshape(-1)
                                           for g in self.G])[:, None])[:, 0]
            for g in self.G:
                self.chunk_k[g] = []
        self.queries.append(q.numpy().reshape(-1))
        hidden = np.concatenate(self.queries) if last else None
        if last:
            self.queries = []
        r = request(self.sid, self.step, layer, q.numpy()[None], bf16_bits(k.numpy()),
                    bf16_bits(v.numpy()), hidden=hidden, index_keys=keys,
                    first_chunk=pos // CHUNK)
        t0 = time.perf_counter()
        (res,) = self.stream.run([r])
        self.seconds += time.perf_counter() - t0
        out, lse = result_arrays(res, (1, q.shape[0], q.shape[1]))
        if res.stalled and layer == 0:
            self.stalls += 1
        # Dense reference lse of the same query over the whole history.
        dense_lse = torch.logsumexp(decode_scores(q, c.k[li]), dim=-1).numpy()
        self.recall.extend(np.minimum(1.0, np.exp(lse.astype(np.float64) - dense_lse)).tolist())
        if last:
            self.step += 1
        return torch.from_numpy(np.array(out, dtype=np.float32).reshape(q.shape))


class DenseRecorder:
    """The torch dense reference's global_attend that also records each page's attention
    mass (all layers and heads) at every step: the oracle's ranking, per cycle."""

    def __init__(self, model, cache, max_tokens):
        self.m, self.cache = model, cache
        self.pages = -(-max_tokens // PAGE)
        self.steps = []  # per decode step: [pages] mass
        self.G = model.cfg.global_layers

    def oracle(self):
        """[steps * pages] float32: the mass of each page at each decode step."""
        return np.array(self.steps, dtype=np.float32).reshape(-1)

    def __call__(self, li, q, k, v):
        c = self.cache
        c.append(li, k, v)
        p = torch.softmax(decode_scores(q, c.k[li]), dim=-1)  # [Hq, T]
        ph = p.sum(0).numpy()
        pad = np.zeros(self.pages * PAGE)
        pad[:len(ph)] = ph
        if li == self.G[0]:
            self.steps.append(np.zeros(self.pages))
        self.steps[-1] += pad.reshape(-1, PAGE).sum(1)
        return decode_mix(p, c.v[li])
