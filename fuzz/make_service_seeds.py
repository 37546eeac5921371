"""Writes the seed corpus of service_requests_fuzz (fuzz/corpus/service_requests/): one valid
request per RPC, as the target reads them (a byte picking the RPC, then the message). The
decode seeds name the session "s" that the target's world holds (tiny spec, next step 32).

    PYTHONPATH=build/python /usr/bin/python3 fuzz/make_service_seeds.py
"""
import os
import struct

from flashmemory.v1 import common_pb2, decode_pb2, indexer_pb2, kvstore_pb2

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "service_requests")


def tiny_spec():
    return common_pb2.ModelSpec(name="tiny", layers=2, q_heads=4, kv_heads=2, head_dim=64,
                                dtype=common_pb2.DTYPE_FP32, index_layers=1, index_heads=4,
                                index_dim=64, hidden_dim=256)


def floats(n):
    return struct.pack(f"<{n}f", *[0.01 * (i % 7) for i in range(n)])


def main():
    os.makedirs(OUT, exist_ok=True)
    step = decode_pb2.LayerRequest(session_id="s", step=32, layer=0, layer_count=2,
                                   q=floats(2 * 4 * 64), k=floats(2 * 2 * 64),
                                   v=floats(2 * 2 * 64), hidden=floats(256))
    seeds = {
        0: decode_pb2.OpenSessionRequest(session_id="n", spec=tiny_spec(), mode=1, policy=2,
                                         budget=0.25, tau=16, max_tokens=2048),
        1: decode_pb2.PrefillChunk(session_id="s"),
        2: decode_pb2.DecodeBatch(requests=[step]),
        3: decode_pb2.CloseSessionRequest(session_id="n"),
        4: decode_pb2.SessionStatsRequest(session_id="s", probe_pages=[0, 3]),
        7: indexer_pb2.PredictRequest(session_id="s", step=48, query=floats(4 * 64), budget=0.25),
        8: indexer_pb2.DropSessionRequest(session_id="n"),
        9: indexer_pb2.LoadWeightsRequest(path="w.safetensors"),
        10: indexer_pb2.IndexerStatsRequest(),
        13: kvstore_pb2.GetPagesRequest(keys=[common_pb2.PageKey(session_id="s", page=0)]),
        19: kvstore_pb2.DeleteSessionRequest(session_id="n"),
        21: kvstore_pb2.ClaimSessionRequest(session_id="n"),
        22: kvstore_pb2.GetStatsRequest(),
    }
    for rpc, msg in seeds.items():
        with open(os.path.join(OUT, f"rpc{rpc:02d}"), "wb") as f:
            f.write(bytes([rpc]) + msg.SerializeToString())
    print(f"wrote {len(seeds)} seeds to {OUT}")


if __name__ == "__main__":
    main()
