"""Time against memory, one panel per shape: ours' chunk-size curve, each peer, the Pareto frontier.

    python benchmarks/frontier.py benchmarks/results-cpu.json [benchmarks/frontier.png]

re-draws the picture from the raw results that ``pytest benchmarks --update-results`` writes (it draws
it too). x: extra memory beyond inputs and gradients (MiB, log scale); y: time / 3-GEMM floor.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MIB = 2**20


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both memory and time (ties kept), by increasing memory."""
    front = []
    for p in sorted(points):
        if not front or p[1] < front[-1][1]:
            front.append(p)
    return front


def plot_frontier(rows: list[dict], curve: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows + curve if "ratio" in r]
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in measured))
    fig, axes = plt.subplots(1, max(len(shapes), 1), figsize=(6.5 * max(len(shapes), 1), 4.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        here = [r for r in measured if tuple(r["shape"]) == shape]
        points = []
        chunks = sorted((r for r in here if r.get("chunk")), key=lambda r: r["chunk"])
        if chunks:
            xs, ys = [r["extra_bytes"] / MIB for r in chunks], [r["ratio"] for r in chunks]
            ax.plot(xs, ys, "o-", color="tab:blue", label="ours, chunk_size = rows")
            for r, x, y in zip(chunks, xs, ys):
                ax.annotate(str(r["chunk"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            points += [(x, y, f"ours {r['chunk']}") for r, x, y in zip(chunks, xs, ys)]
        for r in (r for r in here if not r.get("chunk")):
            x, y = max(r["extra_bytes"], MIB) / MIB, r["ratio"]
            label = r["impl"] + (" (default chunk)" if r["impl"].startswith("ours") else "")
            spread = [[y - r["ratio_min"]], [r["ratio_max"] - y]]
            ax.errorbar([x], [y], yerr=spread, fmt="s", capsize=3, label=label)
            points.append((x, y, r["impl"]))
        front = pareto(points)
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", ls="--", lw=1,
                label="Pareto frontier")  # fmt: skip
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("extra memory beyond inputs and gradients (MiB, log)")
        ax.set_ylabel("time / 3-GEMM floor (median, min-max)")
        ax.set_title("B, T, H, d, V = " + ", ".join(map(str, shape)))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    data = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1]) if len(argv) > 1 else Path(argv[0]).with_name("frontier.png")
    print(plot_frontier(data["rows"], data.get("curve", []), out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
