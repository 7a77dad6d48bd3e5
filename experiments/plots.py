"""Matplotlib figures written to a run's ``plots/`` folder.

Figures are ``matplotlib.figure.Figure`` objects rendered straight to files (the
object-oriented API): no pyplot state, no display, and no backend chosen for the whole
process on import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def subplots(*args, figsize=(6, 4), **kwargs):
    """``(fig, axes)`` like ``plt.subplots``, without pyplot."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def curves(
    path: Path,
    series: dict,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logy: bool = False,
    logx: bool = False,
    step: bool = False,
) -> Path:
    """One figure with a line per ``name -> (x, y)`` in ``series``."""
    fig, ax = subplots(figsize=(6, 4))
    for name, (x, y) in series.items():
        (ax.step if step else ax.plot)(
            np.asarray(x), np.asarray(y), label=name, **({"where": "post"} if step else {})
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
