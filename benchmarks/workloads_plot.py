"""The ``--plot`` bar chart: each workload's contenders as bars of their warm time over raw JAX's."""

from __future__ import annotations

import textwrap

from .workloads_common import RAW, Row


def plot(rows: list[Row], path: str) -> None:
    """Draw ``rows`` as grouped bars (log scale, raw JAX = 1) into the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r.workload for r in rows))
    names = list(dict.fromkeys(r.name for r in rows))
    ratio = {(r.workload, r.name): r.ratio for r in rows}
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(12, 5.5))
    for i, name in enumerate(names):
        xs = [w + (i - (len(names) - 1) / 2) * width for w in range(len(workloads))]
        ys = [ratio.get((workload, name), 0.0) for workload in workloads]
        bars = ax.bar(xs, ys, width, label=name, color="0.6" if name == RAW else None)
        ax.bar_label(bars, labels=[(f"{y:.0f}x" if y >= 10 else f"{y:.1f}x") if y >= 2 else "" for y in ys], fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel(f"median warm-call time / {RAW}'s (log scale)")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([textwrap.fill(w, 16) for w in workloads], fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title("statemap and its peers against hand-threaded JAX (lower is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
