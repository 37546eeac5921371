"""gRPC client of flashmemory.v1.Decode (see the package docstring)."""
import os
import queue
import sys
from dataclasses import dataclass

import grpc
import numpy as np


def _proto_dir():
    d = os.environ.get("FM_PY_PROTO")
    if d:
        return d
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "build", "python")


sys.path.insert(0, _proto_dir())
from flashmemory.v1 import common_pb2, decode_pb2, decode_pb2_grpc, indexer_pb2  # noqa: E402
from flashmemory.v1 import indexer_pb2_grpc  # noqa: E402

_DTYPES = {"fp32": (common_pb2.DTYPE_FP32, 4), "fp16": (common_pb2.DTYPE_FP16, 2),
           "bf16": (common_pb2.DTYPE_BF16, 2)}
_MODES = {"sparse": decode_pb2.DECODE_MODE_SPARSE, "dense": decode_pb2.DECODE_MODE_DENSE,
          "trace": decode_pb2.DECODE_MODE_TRACE}
_POLICIES = {"default": 0, "lsa": 1, "quest": 2, "recency": 3, "random": 4, "sink_recency": 5,
             "oracle": 6, "dense": 7, "model_query": 8}


class DecodeError(Exception):
    """A request the worker refused: .code is the grpc.StatusCode, .message the detail."""

    def __init__(self, code, message):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass
class Spec:
    """A model spec (DESIGN §1): the fields the worker needs."""
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "bf16"
    page_tokens: int = 64
    index_layers: int = 0
    index_heads: int = 0
    index_dim: int = 0
    chunk_tokens: int = 4
    hidden_dim: int = 0
    name: str = ""

    PRESETS = {
        "tiny": dict(layers=2, q_heads=4, kv_heads=2, head_dim=64, dtype="fp32", index_layers=1,
                     index_heads=4, index_dim=64, hidden_dim=256),
        "bench": dict(layers=4, q_heads=32, kv_heads=8, head_dim=128, dtype="bf16", index_layers=3,
                      index_heads=16, index_dim=128, hidden_dim=1024),
        "long": dict(layers=2, q_heads=8, kv_heads=2, head_dim=128, dtype="bf16", index_layers=3,
                     index_heads=8, index_dim=128, hidden_dim=512),
    }

    @classmethod
    def preset(cls, name):
        return cls(name=name, **cls.PRESETS[name])

    @property
    def elem_bytes(self):
        return _DTYPES[self.dtype][1]

    @property
    def page_bytes(self):
        return 2 * self.layers * self.kv_heads * self.page_tokens * self.head_dim * self.elem_bytes

    @property
    def key_bytes(self):
        return self.index_dim + 4

    def to_proto(self):
        return common_pb2.ModelSpec(
            name=self.name, layers=self.layers, q_heads=self.q_heads, kv_heads=self.kv_heads,
            head_dim=self.head_dim, dtype=_DTYPES[self.dtype][0], page_tokens=self.page_tokens,
            index_layers=self.index_layers, index_heads=self.index_heads,
            index_dim=self.index_dim, chunk_tokens=self.chunk_tokens, hidden_dim=self.hidden_dim)


def _raise(err):
    raise DecodeError(err.code(), err.details()) from None


class StepStream:
    """A bidirectional step stream: one batch out, its results back."""

    def __init__(self, stub):
        self._q = queue.Queue()
        self._responses = stub.DecodeStream(iter(self._q.get, None))

    def run(self, requests):
        """Sends LayerRequests (any sessions) as one batch; returns their LayerResults."""
        self._q.put(decode_pb2.DecodeBatch(requests=requests))
        try:
            return list(next(self._responses).results)
        except grpc.RpcError as e:
            _raise(e)

    def layer(self, session_id, step, layer, q, k, v, hidden=None, index_keys=None, first_chunk=0):
        """One (step, layer): q [Hq, d] float32, k and v [Hkv, d] in the spec dtype's bytes (or
        float32 for an fp32 spec). Returns (out [Hq, d], lse [Hq]); raises DecodeError."""
        r = request(session_id, step, layer, q, k, v, hidden, index_keys, first_chunk)
        (res,) = self.run([r])
        return result_arrays(res, q.shape)

    def close(self):
        self._q.put(None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def request(session_id, step, layer, q, k, v, hidden=None, index_keys=None, first_chunk=0,
            layer_count=1):
    """Builds a LayerRequest. q float32; k, v as raw bytes-like arrays in the spec dtype."""
    r = decode_pb2.LayerRequest(session_id=session_id, step=step, layer=layer,
                                layer_count=layer_count,
                                q=np.ascontiguousarray(q, dtype=np.float32).tobytes(),
                                k=np.ascontiguousarray(k).tobytes(),
                                v=np.ascontiguousarray(v).tobytes())
    if hidden is not None:
        r.hidden = np.ascontiguousarray(hidden, dtype=np.float32).tobytes()
    if index_keys is not None:
        r.index_keys.first_chunk = first_chunk
        r.index_keys.chunks = 1
        r.index_keys.data = np.ascontiguousarray(index_keys, dtype=np.uint8).tobytes()
    return r


def result_arrays(res, q_shape):
    """(out, lse) of a LayerResult; raises DecodeError when it carries an error."""
    if res.code != 0:
        raise DecodeError(next(c for c in grpc.StatusCode if c.value[0] == res.code), res.message)
    out = np.frombuffer(res.out, dtype=np.float32).reshape(-1, *q_shape[-2:])
    lse = np.frombuffer(res.lse, dtype=np.float32).reshape(out.shape[0], -1)
    if out.shape[0] == 1:
        return out[0], lse[0]
    return out, lse


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds "authorization: Bearer <token>" to every call (a tenant's identity)."""

    def __init__(self, token):
        self._md = ("authorization", "Bearer " + token)

    def _details(self, d):
        md = list(d.metadata or []) + [self._md]
        return d._replace(metadata=md) if hasattr(d, "_replace") else _Details(d, md)

    def intercept_unary_unary(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_unary_stream(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_stream_unary(self, cont, d, it):
        return cont(self._details(d), it)

    def intercept_stream_stream(self, cont, d, it):
        return cont(self._details(d), it)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method, self.timeout, self.credentials = d.method, d.timeout, d.credentials
        self.wait_for_ready, self.compression = d.wait_for_ready, d.compression
        self.metadata = metadata


def make_channel(target, options=(), tls_ca=None, tls_cert=None, tls_key=None, token=None):
    """A channel to a FlashMemory server: TLS when tls_ca is given (with the client
    certificate tls_cert/tls_key for mTLS), and the bearer token on every call."""
    if tls_ca:
        def read(p):
            with open(p, "rb") as f:
                return f.read()
        creds = grpc.ssl_channel_credentials(
            root_certificates=read(tls_ca),
            private_key=read(tls_key) if tls_key else None,
            certificate_chain=read(tls_cert) if tls_cert else None)
        channel = grpc.secure_channel(target, creds, options=list(options))
    else:
        channel = grpc.insecure_channel(target, options=list(options))
    return grpc.intercept_channel(channel, _BearerToken(token)) if token else channel


class DecodeClient:
    def __init__(self, target, timeout=60.0, tls_ca=None, tls_cert=None, tls_key=None,
                 token=None):
        """tls_ca/tls_cert/tls_key: PEM files (TLS, mTLS); token: the tenant's bearer token."""
        # The C++ clients' reconnect backoff (common/security.h ClientChannelArgs): 100 ms
        # growing to 1 s, not gRPC's 120 s, so a worker back from a restart is reached.
        opts = [("grpc.max_send_message_length", 256 << 20),
                ("grpc.max_receive_message_length", 256 << 20),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 5000),  # gRPC: the connect timeout
                ("grpc.max_reconnect_backoff_ms", 1000)]
        self._channel = make_channel(target, opts, tls_ca, tls_cert, tls_key, token)
        self._stub = decode_pb2_grpc.DecodeStub(self._channel)
        self._timeout = timeout

    def open(self, session_id, spec, mode="sparse", budget=0.1, policy="default", max_tokens=0,
             tau=0, max_pages=0, level2_topk=0, switch_lag=0, oracle_page_mass=None, miss_ratio=0.0):
        """Opens a session; returns the page cells the admission reserved.

        mode: "sparse", "dense" or "trace" (dense, and the worker writes the session's trace
        to its --trace_dir at close). budget: the footprint cap (share of the session's pages
        its reservation holds). level2_topk: each layer attends to the top-k resident tokens.
        tau, switch_lag: steps per cycle and steps after a cycle start before its set serves
        (0 = the worker's). oracle_page_mass: policy oracle (evaluation only), the true
        attention mass of each history page over the decode to come. miss_ratio: the
        session's own synchronous miss check (0 = off): a non-resident page whose Quest bound
        exceeds the resident attention's log-sum-exp by log(miss_ratio) is read before the
        layer answers.
        """
        try:
            r = self._stub.OpenSession(decode_pb2.OpenSessionRequest(
                session_id=session_id, spec=spec.to_proto(), mode=_MODES[mode],
                policy=_POLICIES[policy], budget=budget, max_pages=max_pages, tau=tau,
                max_tokens=max_tokens, level2_topk=level2_topk, switch_lag=switch_lag,
                oracle_page_mass=[] if oracle_page_mass is None else list(oracle_page_mass),
                miss_ratio=miss_ratio),
                timeout=self._timeout)
        except grpc.RpcError as e:
            _raise(e)
        return r.reserve_pages

    def prefill(self, session_id, spec, pages, tokens, index_keys):
        """pages: [n, page_bytes] uint8 (DESIGN §4 layout, the last page may be partial);
        index_keys: [index_layers, chunks, index_dim + 4] uint8 for the complete chunks."""
        pages = np.ascontiguousarray(pages, dtype=np.uint8).reshape(-1, spec.page_bytes)
        index_keys = np.ascontiguousarray(index_keys, dtype=np.uint8)
        cpp = spec.page_tokens // spec.chunk_tokens
        chunks = index_keys.shape[1]

        def chunks_iter():
            for p in range(pages.shape[0]):
                valid = min(spec.page_tokens, tokens - p * spec.page_tokens)
                page = pages[p].view(np.uint8).reshape(spec.layers, 2, spec.kv_heads,
                                                       spec.page_tokens, -1)
                m = decode_pb2.PrefillChunk(first_token=p * spec.page_tokens, tokens=valid,
                                            kv=np.ascontiguousarray(page[:, :, :, :valid]).tobytes())
                if p == 0:
                    m.session_id = session_id
                c0, c1 = p * cpp, min(chunks, (p + 1) * cpp)
                if c1 > c0:
                    m.index_keys.first_chunk = c0
                    m.index_keys.chunks = c1 - c0
                    m.index_keys.data = index_keys[:, c0:c1].tobytes()
                yield m
        try:
            r = self._stub.Prefill(chunks_iter(), timeout=self._timeout)
        except grpc.RpcError as e:
            _raise(e)
        return r.tokens

    def stream(self):
        return StepStream(self._stub)

    def stats(self, session_id, probe_pages=()):
        """The session's stats (SessionStatsResponse's fields); probe_resident answers for
        each of probe_pages whether it is resident now."""
        try:
            r = self._stub.GetSessionStats(decode_pb2.SessionStatsRequest(
                session_id=session_id, probe_pages=[int(p) for p in probe_pages]),
                timeout=self._timeout)
        except grpc.RpcError as e:
            _raise(e)
        out = {f.name: getattr(r, f.name) for f in r.DESCRIPTOR.fields}
        out["probe_resident"] = list(r.probe_resident)
        return out

    def close(self, session_id, delete_pages=False):
        try:
            self._stub.CloseSession(decode_pb2.CloseSessionRequest(session_id=session_id,
                                                                   delete_pages=delete_pages),
                                    timeout=self._timeout)
        except grpc.RpcError as e:
            _raise(e)


class IndexerClient:
    """The indexer's admin calls (an fm-indexer replica, or the all-in-one's address)."""

    def __init__(self, target, timeout=60.0, tls_ca=None, tls_cert=None, tls_key=None,
                 token=None):
        self._channel = make_channel(target, (), tls_ca, tls_cert, tls_key, token)
        self._stub = indexer_pb2_grpc.IndexerStub(self._channel)
        self._timeout = timeout

    def load_weights(self, path):
        """Loads lsa weights (a safetensors file the indexer can read; it replaces the set of
        the same shape). Returns the weights hash; raises DecodeError (NOT_FOUND for a
        missing file, INVALID_ARGUMENT for a malformed one)."""
        try:
            r = self._stub.LoadWeights(indexer_pb2.LoadWeightsRequest(path=path),
                                       timeout=self._timeout)
        except grpc.RpcError as e:
            _raise(e)
        return r.weights_hash

    def stats(self):
        try:
            r = self._stub.GetStats(indexer_pb2.IndexerStatsRequest(), timeout=self._timeout)
        except grpc.RpcError as e:
            _raise(e)
        return {f.name: getattr(r, f.name) for f in r.DESCRIPTOR.fields}
