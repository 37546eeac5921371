"""Python client of a FlashMemory decode worker (fm-decode or the all-in-one server).

Needs Debian's python3-grpcio, python3-protobuf and python3-numpy, and the message modules
the build generates from proto/ into build/python (found through $FM_PY_PROTO, else
<repo>/build/python). An inference engine drives a session like this:

    from flashmemory_client import DecodeClient, Spec
    c = DecodeClient("127.0.0.1:50051")
    spec = Spec.preset("bench")
    c.open("s1", spec, mode="sparse", budget=0.1, max_tokens=40000)
    c.prefill("s1", spec, pages, tokens, index_keys)      # pages [n, PageBytes] uint8
    with c.stream() as st:
        for step in ...:
            for layer in range(spec.layers):              # layer l+1 needs layer l's output
                out, lse = st.layer("s1", step, layer, q, k, v, hidden=h, index_keys=ck)
"""
from .client import DecodeClient, DecodeError, IndexerClient, Spec, StepStream  # noqa: F401
