#!/usr/bin/python3
"""Drives a FlashMemory decode worker from Python as an inference engine would: generates a
session with `fmctl gen` (K/V pages, queries, hidden states, index keys and the model's dense
outputs in a trace), prefills it, decodes every step layer by layer in dense and in sparse
mode, and prints footprint, fidelity and mass recall side by side.

  /usr/bin/python3 python/examples/decode_demo.py                  # starts its own server
  /usr/bin/python3 python/examples/decode_demo.py --target HOST:PORT
  /usr/bin/python3 python/examples/decode_demo.py --check          # asserts (the test)
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.join(ROOT, "trainer"))
from flashmemory_client import DecodeClient, DecodeError, Spec  # noqa: E402
from fm_trace import load_safetensors  # noqa: E402


def bin_dir():
    return os.environ.get("FM_BIN_DIR", os.path.join(ROOT, "build", "bin"))


def start_server(tmp, extra=(), name="data"):
    ready = os.path.join(tmp, name + ".ready")
    p = subprocess.Popen([os.path.join(bin_dir(), "flashmemory"), "--host", "127.0.0.1",
                          "--port", "0", "--ready_file", ready, "--data_dir",
                          os.path.join(tmp, name), "--ram_bytes", "64MiB",
                          "--reserve_bytes", "64MiB", *extra],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        if os.path.exists(ready) and os.path.getsize(ready) > 0:
            break
        time.sleep(0.1)
    with open(ready) as f:
        return p, "127.0.0.1:" + f.readline().strip()


def decode(client, sid, spec, t, mode, budget, policy):
    meta, tau = t["meta"], t["tau"]
    prefill, steps = t["prefill"], t["steps"]
    pages, keys = t["pages"], t["index_keys"]
    client.open(sid, spec, mode=mode, budget=budget, policy=policy, tau=tau,
                max_tokens=prefill + steps)
    n_pages = -(-prefill // spec.page_tokens)
    client.prefill(sid, spec, pages[:n_pages], prefill, keys[:, : prefill // spec.chunk_tokens])
    kv = pages.view(np.float32 if spec.dtype == "fp32" else np.uint16).reshape(
        pages.shape[0], spec.layers, 2, spec.kv_heads, spec.page_tokens, spec.head_dim)
    outs = np.zeros((steps, spec.layers, spec.q_heads, spec.head_dim), np.float32)
    lses = np.zeros((steps, spec.layers, spec.q_heads), np.float32)
    t0 = time.time()
    with client.stream() as st:
        for s in range(steps):
            pos = prefill + s
            page, row = divmod(pos, spec.page_tokens)
            for layer in range(spec.layers):
                hidden = t["hidden"][s] if (s % tau == 0 and layer == 0) else None
                ck = None
                if layer == 0 and (pos + 1) % spec.chunk_tokens == 0:
                    ck = keys[:, pos // spec.chunk_tokens]
                out, lse = st.layer(sid, s, layer, t["queries"][s, layer], kv[page, layer, 0, :, row],
                                    kv[page, layer, 1, :, row], hidden=hidden, index_keys=ck,
                                    first_chunk=pos // spec.chunk_tokens)
                outs[s, layer], lses[s, layer] = out, lse
    dt = time.time() - t0
    stats = client.stats(sid)
    client.close(sid)
    return outs, lses, stats, steps / dt


def check_security(tmp, spec, t):
    """A server behind mTLS and tokens: the client's TLS files and token let a tenant in;
    no token is refused, and another tenant does not see the session."""
    certs = os.path.join(tmp, "certs")
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "make_dev_certs.sh"), certs],
                   check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(tmp, "tokens"), "w") as f:
        f.write("tok-a alice\ntok-b bob\n")
    pem = lambda n: os.path.join(certs, n)  # noqa: E731
    server, target = start_server(tmp, ["--tls_cert", pem("service.pem"), "--tls_key",
                                        pem("service.key"), "--tls_ca", pem("ca.pem"),
                                        "--tokens_file", os.path.join(tmp, "tokens")], "secure")
    target = target.replace("127.0.0.1", "localhost")
    tls = dict(tls_ca=pem("ca.pem"), tls_cert=pem("client.pem"), tls_key=pem("client.key"))
    try:
        alice = DecodeClient(target, token="tok-a", **tls)
        alice.open("s", spec, mode="dense", max_tokens=t["prefill"] + t["steps"])
        assert alice.stats("s")["tokens"] == 0
        for token, code in ((None, "UNAUTHENTICATED"), ("tok-b", "NOT_FOUND")):
            try:
                DecodeClient(target, token=token, **tls).stats("s")
                raise AssertionError(f"token {token} read alice's session")
            except DecodeError as e:
                assert e.code.name == code, e
        alice.close("s", delete_pages=True)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", help="decode worker address; default: start a flashmemory server")
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--check", action="store_true", help="assert the results (the test)")
    a = ap.parse_args()
    spec = Spec.preset("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([os.path.join(bin_dir(), "fmctl"), "gen", "--spec", "tiny", "--tokens",
                        str(a.tokens), "--steps", str(a.steps), "--tau", "8", "--seed", "77",
                        "--pages", "--step-queries", "--outputs", "--out", tmp],
                       check=True, stdout=subprocess.DEVNULL)
        tens, meta = load_safetensors(os.path.join(tmp, f"tiny-{a.tokens}-s77.safetensors"))
        t = {"meta": meta, "tau": int(meta["tau"]), "prefill": int(meta["prefill_tokens"]),
             "steps": int(meta["steps"]), "pages": tens["pages"], "index_keys": tens["index_keys"],
             "hidden": tens["hidden"], "queries": tens["step_queries"], "outputs": tens["outputs"]}
        server = None
        target = a.target
        if not target:
            server, target = start_server(tmp)
        try:
            c = DecodeClient(target)
            dense, dense_lse, dstats, dtps = decode(c, "py-dense", spec, t, "dense", 1.0, "default")
            sparse, sparse_lse, sstats, stps = decode(c, "py-sparse", spec, t, "sparse", a.budget,
                                                       "quest")
            num = (sparse * dense).sum(-1)
            cos = num / np.maximum(1e-30, np.linalg.norm(sparse, axis=-1) * np.linalg.norm(dense, axis=-1))
            recall = np.minimum(1.0, np.exp(sparse_lse.astype(np.float64) - dense_lse)).mean()
            model_err = np.abs(dense - t["outputs"]).max()
            print(f"{'':28s} {'dense':>12s} {'sparse':>12s}")
            print(f"{'footprint':28s} {dstats['footprint']:12.3f} {sstats['footprint']:12.3f}")
            print(f"{'cosine vs dense (mean)':28s} {1.0:12.5f} {cos.mean():12.5f}")
            print(f"{'mass recall':28s} {1.0:12.4f} {recall:12.4f}")
            print(f"{'pages fetched':28s} {dstats['pages_fetched']:12d} {sstats['pages_fetched']:12d}")
            print(f"{'tokens/s':28s} {dtps:12.1f} {stps:12.1f}")
            print(f"dense vs the model's exact attention: max |diff| {model_err:.2e}")
            if a.check:
                assert model_err < 1e-4, model_err
                assert cos.mean() > 0.95 and recall > 0.8, (cos.mean(), recall)
                assert sstats["footprint"] < 0.45 and sstats["predictions"] == a.steps // t["tau"]
                # Bad input comes back as DecodeError with the worker's code.
                try:
                    c.open("py-bad", spec, max_tokens=0)
                    raise AssertionError("max_tokens 0 was accepted")
                except DecodeError as e:
                    assert e.code.name == "INVALID_ARGUMENT", e
                try:
                    with c.stream() as st:
                        st.layer("ghost", 0, 0, t["queries"][0, 0], np.zeros((2, 64), np.float32),
                                 np.zeros((2, 64), np.float32))
                    raise AssertionError("an unknown session was accepted")
                except DecodeError as e:
                    assert e.code.name == "NOT_FOUND", e
                check_security(tmp, spec, t)
                print("checks passed")
        finally:
            if server:
                server.terminate()
                server.wait(timeout=30)


if __name__ == "__main__":
    main()
