"""Plots `duo bench-load --rtt-ms` results as a PNG: Duo/AR, Duo/SpS, Duo's
TTFT and Duo's tokens/s relative to no added latency, against the round-trip
time added on the draft link and on the target link. Several result files
(repeated runs) are pooled: tokens over wall time per point, TTFT averaged.

    python3 scripts/plot-rtt.py docs/rtt.png docs/bench-load-rtt*.json
(needs matplotlib: pip install matplotlib)
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("autoregressive", "speculative", "duodecoding")


def pooled(files):
    """{(link, rtt): {mode: (tokens/s, ttft p50 ms)}}, link 'none' for no RTT."""
    acc = {}
    for f in files:
        for p in json.load(open(f))["points"]:
            d, t = p["draft_rtt_ms"], p["target_rtt_ms"]
            key = ("draft", d) if d > 0 else ("target", t) if t > 0 else ("none", 0.0)
            a = acc.setdefault(key, {}).setdefault(p["mode"], [0.0, 0.0, []])
            a[0] += p["tokens"]
            a[1] += p["wall_s"]
            a[2].append(p["ttft_p50_ms"])
    return {k: {m: (a[0] / a[1], sum(a[2]) / len(a[2])) for m, a in v.items()} for k, v in acc.items()}


def main(dst, files):
    t = pooled(files)
    base = t[("none", 0.0)]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for link, style in (("draft", "o-"), ("target", "s--")):
        rtts = [0.0] + sorted(r for (l, r) in t if l == link)
        rows = [base if r == 0 else t[(link, r)] for r in rtts]
        series = (
            [r["duodecoding"][0] / r["autoregressive"][0] for r in rows],
            [r["duodecoding"][0] / r["speculative"][0] for r in rows],
            [r["duodecoding"][1] for r in rows],
            [r["duodecoding"][0] / base["duodecoding"][0] for r in rows],
        )
        for ax, ys in zip(axes, series):
            ax.plot(rtts, ys, style, label=f"{link} link")
    titles = ("Duo / AR (tokens/s)", "Duo / SpS (tokens/s)", "Duo TTFT p50 (ms)",
              "Duo tokens/s / Duo with no added RTT")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("added round-trip time (ms)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[3].axhline(0.9, color="grey", lw=0.8, ls=":")
    fig.suptitle(f"gpu-like regime, 1 client, one draft worker ({len(files)} runs pooled; duo bench-load --rtt-ms)")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
