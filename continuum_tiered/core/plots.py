"""Plots shared by the virtual-time replay and the live-server experiments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (no display on the machines we run on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_jct_cdf(panels: Mapping[str, Mapping[str, Sequence[float]]], path: Path) -> None:
    """One panel per title, one CDF of job completion times per system in each."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, jcts) in zip(axes[0], panels.items(), strict=True):
        for system, values in jcts.items():
            ordered = sorted(values)
            ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=system)
        ax.set_title(title)
        ax.set_xlabel("job completion time (s)")
    axes[0][0].set_ylabel("fraction of programs")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
