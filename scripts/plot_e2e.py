#!/usr/bin/python3
"""Plots fm-bench e2e rows (JSON): footprint and fidelity against context length, and
aggregate tokens/s against concurrent sessions, dense vs sparse.

  /usr/bin/python3 scripts/plot_e2e.py e2e.json plots/
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    rows = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    os.makedirs(out, exist_ok=True)
    ctx = sorted({r["context"] for r in rows})
    one = {(r["context"], r["mode"]): r for r in rows if r["sessions"] == 1}

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for mode, style in (("dense", "o--"), ("sparse", "o-")):
        xs = [c for c in ctx if (c, mode) in one]
        ax[0].plot(xs, [100 * one[(c, mode)]["footprint"] for c in xs], style, label=mode)
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("context (tokens)")
    ax[0].set_ylabel("peak resident KV / full KV (%)")
    ax[0].set_title("footprint")
    ax[0].legend()
    xs = [c for c in ctx if (c, "sparse") in one]
    ax[1].plot(xs, [one[(c, "sparse")]["cosine"] for c in xs], "o-", label="mean cosine")
    ax[1].plot(xs, [one[(c, "sparse")]["mass_recall"] for c in xs], "s-", label="mass recall")
    ax[1].set_xscale("log", base=2)
    ax[1].set_xlabel("context (tokens)")
    ax[1].set_title("sparse fidelity vs dense")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "footprint_fidelity.png"), dpi=120)

    fig, axes = plt.subplots(1, len(ctx), figsize=(4 * len(ctx), 3.6), squeeze=False)
    for a, c in zip(axes[0], ctx):
        for mode, style in (("dense", "o--"), ("sparse", "o-")):
            rs = sorted((r for r in rows if r["context"] == c and r["mode"] == mode),
                        key=lambda r: r["sessions"])
            a.plot([r["sessions"] for r in rs], [r["tokens_per_s"] for r in rs], style,
                   label=f"{mode} per layer")
            a.plot([r["sessions"] for r in rs], [r["tokens_per_s_whole_step"] for r in rs],
                   style.replace("o", "^"), label=f"{mode} whole step", alpha=0.6)
        a.set_title(f"{c // 1024}K tokens")
        a.set_xlabel("concurrent sessions")
        a.set_ylabel("aggregate tokens/s")
        a.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "throughput.png"), dpi=120)
    print(f"plots in {out}")


if __name__ == "__main__":
    main()
