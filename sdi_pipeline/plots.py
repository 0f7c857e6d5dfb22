"""Plots of SDI for people: per-step energy and share, trajectories of top examples."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sdi_pipeline.atomic import atomic_path


def plot_step_profiles(
    energy: np.ndarray,
    share: np.ndarray,
    slot_names: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Plot per-slot SDI energy and signed share (median and IQR over queries); save PNG.

    ``energy`` and ``share`` are (M, S), as results.h5's diagnostics (or
    :class:`~sdi_pipeline.scores.ScoreTotals`) give them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(slot_names)))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for ax, values, label in (
        (axes[0], energy, "SDI energy  Σ_i |SDI[i, j, t]|"),
        (axes[1], share, "signed SDI share"),
    ):
        q25, med, q75 = np.quantile(np.asarray(values, dtype=np.float64), [0.25, 0.5, 0.75], 0)
        ax.plot(x, med, marker="o", label="median over queries")
        ax.fill_between(x, q25, q75, alpha=0.3, label="interquartile range")
        ax.set_xticks(x, list(slot_names), rotation=45, ha="right")
        ax.set_xlabel("loop step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].axhline(0.0, color="black", linewidth=0.8)
    axes[0].legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    out = Path(path)
    with atomic_path(out) as tmp:  # never a half-written PNG under its name
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out


def plot_trajectories(
    sdi: np.ndarray, slot_names: Sequence[str], query: int, path: str | Path, top: int = 12
) -> Path:
    """Heatmap of SDI trajectories (train examples x loop steps) of one query's top examples.

    Rows are the ``top`` training examples with the largest |TracIn| for the query, in that
    order; the colour scale is symmetric around zero (red raises, blue lowers the loss).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.asarray(sdi[:, query, :], dtype=np.float64)
    order = np.argsort(-np.abs(scores.sum(axis=1)), kind="stable")[:top]
    rows = scores[order]
    limit = float(abs(rows).max()) or 1.0
    width = max(6.0, 2.5 + 0.6 * len(slot_names))
    fig, ax = plt.subplots(figsize=(width, 1.4 + 0.32 * len(order)))
    image = ax.imshow(rows, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(slot_names)), list(slot_names), rotation=45, ha="right")
    ax.set_yticks(range(len(order)), [f"train #{int(i)}" for i in order])
    ax.set_xlabel("loop step")
    ax.set_title(
        f"SDI per loop step, query {query}\n(its top {len(order)} training examples by |TracIn|)",
        fontsize=10,
    )
    fig.colorbar(image, ax=ax, label="SDI")
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:  # never a half-written PNG under its name
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out
