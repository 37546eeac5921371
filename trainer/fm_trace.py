"""Reads FlashMemory trace and weight files (safetensors) with NumPy only.

safetensors layout: u64 little-endian header length N, N bytes of JSON
{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets"}}, then the data.
The `safetensors` Python package reads the same files; this reader avoids the dependency.
"""
import json
import struct

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "U8": np.uint8,
           "I8": np.int8, "I32": np.int32, "I64": np.int64, "U16": np.uint16,
           "U32": np.uint32, "U64": np.uint64, "BF16": np.uint16}


def load_safetensors(path):
    """Returns (tensors: dict name -> np.ndarray, metadata: dict)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, e in header.items():
        b, en = e["data_offsets"]
        arr = np.frombuffer(raw, dtype=_DTYPES[e["dtype"]], count=(en - b) // np.dtype(_DTYPES[e["dtype"]]).itemsize,
                            offset=base + b).reshape(e["shape"])
        if e["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr
    return out, meta


def save_safetensors(path, tensors, metadata):
    """tensors: dict name -> np.ndarray (float32, float16, uint8, int32, int64)."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint8): "U8",
             np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}
    header, blobs, off = {"__metadata__": {k: str(v) for k, v in metadata.items()}}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        header[name] = {"dtype": names[a.dtype], "shape": list(a.shape),
                        "data_offsets": [off, off + a.nbytes]}
        blobs.append(a.tobytes())
        off += a.nbytes
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    import os
    os.replace(path + ".tmp", path)


def fp8_e4m3_table():
    """float32 value of each of the 256 fp8-e4m3 codes (NaN for 0x7f and 0xff)."""
    t = np.zeros(256, dtype=np.float64)
    for b in range(256):
        s, e, m = b >> 7, (b >> 3) & 15, b & 7
        if e == 15 and m == 7:
            v = np.nan
        elif e == 0:
            v = m / 8.0 * 2.0 ** -6
        else:
            v = (1 + m / 8.0) * 2.0 ** (e - 7)
        t[b] = -v if s else v
    return t.astype(np.float32)


class Trace:
    """A trace file: spec fields, per-cycle hidden states and labels, index keys."""

    def __init__(self, path):
        self.path = path
        t, m = load_safetensors(path)
        if m.get("format") != "flashmemory-trace-v1":
            raise ValueError(f"{path}: not a flashmemory-trace-v1 file")
        self.meta = m
        for k in ("layers", "q_heads", "kv_heads", "head_dim", "page_tokens", "index_layers",
                  "index_heads", "index_dim", "chunk_tokens", "hidden_dim", "prefill_tokens",
                  "steps", "tau", "rope_dims"):
            setattr(self, k, int(m[k]))
        self.cycles = self.steps // self.tau
        self.keys_raw = t["index_keys"]          # [Li, C, di + 4] uint8
        self.hidden = t["hidden"]                # [S, hidden], read at cycle starts
        self.labels = t["labels"]                # [K, C]
        self.page_mass = t["page_mass"]          # [S, P]
        self.needles = t["needles"]              # [n, 2]
        self.chunks = self.keys_raw.shape[1]
        self.chunks_per_page = self.page_tokens // self.chunk_tokens

    def tokens_at(self, step):
        return self.prefill_tokens + step + 1

    def indexed_chunks(self, step):
        return self.tokens_at(step) // self.page_tokens * self.chunks_per_page

    def decoded_keys(self):
        """[Li, C, di] float32: fp8 codes times their fp32 scale."""
        table = fp8_e4m3_table()
        di = self.index_dim
        codes = self.keys_raw[:, :, :di]
        scale = np.ascontiguousarray(self.keys_raw[:, :, di:di + 4]).view(np.float32)  # [Li, C, 1]
        return table[codes] * scale
