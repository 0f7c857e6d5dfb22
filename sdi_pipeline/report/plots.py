"""Plots of SDI for people: per-step energy and share, trajectories of top examples."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdi_pipeline.files.atomic import atomic_path

if TYPE_CHECKING:
    from sdi_pipeline.formats.results import Results


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (jobs have no display); imported late
    because it is slow to import and only plotting needs it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    """Write the figure as PNG (folders made as needed) and free it."""
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    _pyplot().close(fig)
    return out


def plot_step_profiles(
    energy: np.ndarray,
    share: np.ndarray,
    slot_names: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Plot per-slot SDI energy and signed share (median and IQR over queries); save PNG.

    ``energy`` and ``share`` are (M, S), as results.h5's diagnostics (or
    :class:`~sdi_pipeline.jobs.scores.ScoreTotals`) give them.
    """
    plt = _pyplot()

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
    return _save(fig, path)


def plot_trajectories(
    rows: np.ndarray, labels: Sequence[str], slot_names: Sequence[str], query: int, path: str | Path
) -> Path:
    """Heatmap of SDI trajectories (training inputs x loop steps) of one query.

    ``rows`` (n, slots) are the SDI of the query's strongest distinct training inputs, best
    first, one row per input however many identical copies it has (``labels`` say how many:
    see :func:`sdi_pipeline.report.summary.trajectory_rows`, which the printed summary's
    ranking matches); the colour scale is symmetric around zero (red raises, blue lowers
    the loss).
    """
    plt = _pyplot()

    rows = np.asarray(rows, dtype=np.float64).reshape(len(labels), len(slot_names))
    limit = float(abs(rows).max()) if rows.size else 1.0
    width = max(6.0, 2.5 + 0.6 * len(slot_names))
    fig, ax = plt.subplots(figsize=(width, 1.4 + 0.32 * max(1, len(labels))))
    image = ax.imshow(rows, cmap="RdBu_r", vmin=-(limit or 1.0), vmax=limit or 1.0, aspect="auto")
    ax.set_xticks(range(len(slot_names)), list(slot_names), rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), list(labels))
    ax.set_xlabel("loop step")
    ax.set_title(
        f"SDI per loop step, query {query}\n(its top {len(labels)} distinct training inputs by "
        "TracIn; identical copies share a row)",
        fontsize=10,
    )
    fig.colorbar(image, ax=ax, label="SDI")
    fig.tight_layout()
    return _save(fig, path)


def plot_token_map(
    values: np.ndarray,
    slot_names: Sequence[str],
    positions: Sequence[int],
    path: str | Path,
    title: str,
) -> Path:
    """Heat-map of one query's SDI (or its energy) per loop step and query token.

    ``values`` is (slots, P), as :meth:`Results.token_map` gives it; columns are labelled by
    the token positions in the per-token loss.
    """
    plt = _pyplot()

    data = np.asarray(values, dtype=np.float64)
    signed = bool((data < 0).any())
    limit = float(np.abs(data).max()) or 1.0
    fig, ax = plt.subplots(
        figsize=(max(5.0, 1.8 + 0.45 * len(positions)), max(2.6, 1.2 + 0.35 * len(slot_names)))
    )
    image = ax.imshow(
        data,
        cmap="RdBu_r" if signed else "viridis",
        vmin=-limit if signed else 0.0,
        vmax=limit,
        aspect="auto",
    )
    ax.set_yticks(range(len(slot_names)), list(slot_names))
    ax.set_xticks(range(len(positions)), [str(int(p)) for p in positions])
    ax.set_xlabel("query token (position in the per-token loss)")
    ax.set_ylabel("loop step")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="SDI" if signed else "Σ_i |SDI|")
    fig.tight_layout()
    return _save(fig, path)


def plot_loop_dynamics(
    sdi: np.ndarray | None,
    sdi_labels: Sequence[str],
    margins: np.ndarray,
    portrait: np.ndarray,
    explained: np.ndarray,
    path: str | Path,
    sdi_title: str = "SDI at the answer token",
    highlight: int = 0,
) -> Path:
    """Three panels of one run's loop: SDI per loop step, logit margin, phase portrait.

    ``sdi`` (lines, τ) holds the highlighted query's top training examples' SDI at each loop
    step (labelled by ``sdi_labels``; None when the run kept no SDI tensor), ``margins``
    (M, τ) every query's logit margin after each loop step, ``portrait`` (M, τ, 2) the
    answer-token states on their top-2 principal components (``explained``: their variance
    ratios). Query ``highlight`` is drawn bold, the others thin.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    steps = np.arange(1, margins.shape[1] + 1)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    ax = axes[0]
    if sdi is None:
        ax.text(0.5, 0.5, "no SDI tensor stored\n(raise merge.sdi_max_gb)", ha="center",
                va="center", transform=ax.transAxes)  # fmt: skip
    else:
        for row, label in zip(np.asarray(sdi, dtype=np.float64), sdi_labels, strict=True):
            ax.plot(steps, row, marker="o", markersize=3, label=label)
        ax.legend(loc="best", fontsize=7)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_title(f"(a) {sdi_title}, query {highlight}: its top training examples", fontsize=10)
    ax.set_xlabel("loop step")
    ax.set_ylabel("SDI")

    ax = axes[1]
    for j, row in enumerate(np.asarray(margins, dtype=np.float64)):
        if j != highlight:
            ax.plot(steps, row, color="tab:gray", alpha=0.5, linewidth=0.8)
    ax.plot(steps, margins[highlight], color="tab:red", marker="o", markersize=4, linewidth=2,
            label=f"query {highlight}")  # fmt: skip
    ax.plot([], [], color="tab:gray", alpha=0.5, label="other queries")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_title("(b) logit margin after each loop step (correct − other)", fontsize=10)
    ax.set_xlabel("loop step")
    ax.set_ylabel("logit margin")
    ax.legend(loc="best", fontsize=8)

    ax = axes[2]
    colours = plt.get_cmap("tab10")
    for j, points in enumerate(np.asarray(portrait, dtype=np.float64)):
        if j == highlight:
            continue
        ax.plot(points[:, 0], points[:, 1], color=colours(j % 10), alpha=0.45, linewidth=0.8,
                marker=".", markersize=4)  # fmt: skip
        ax.plot(*points[-1], color=colours(j % 10), marker="s", markersize=4, alpha=0.6)
    probe = np.asarray(portrait[highlight], dtype=np.float64)
    ax.plot(probe[:, 0], probe[:, 1], color="tab:red", linewidth=2, marker="o", markersize=4,
            label=f"query {highlight}")  # fmt: skip
    for t, (x, y) in enumerate(probe, 1):
        ax.annotate(str(t), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.plot(*probe[0], color="black", marker="^", markersize=7, linestyle="", label="step 1")
    ax.plot([], [], color="tab:gray", marker="s", linestyle="", label=f"step {len(steps)}")
    ax.set_title("(c) answer-token state across loop steps (PCA)", fontsize=10)
    ax.set_xlabel(f"PC 1 ({100 * explained[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * explained[1]:.0f}% of variance)")
    ax.legend(loc="best", fontsize=8)
    for a in axes[:2]:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    for a in axes:
        a.grid(alpha=0.3)
    return _save(fig, path)


def loop_dynamics_figure(res: Results, path: str | Path, query: int = 0, lines: int = 5) -> Path:
    """:func:`plot_loop_dynamics` of a run with a loop trace, at its last checkpoint.

    Panel (a) shows SDI at the answer token (the last of the chosen query tokens) of
    ``query``'s ``lines`` strongest training examples (by |SDI summed over steps|), or the
    whole loss's SDI when the run has no per-token SDI. Training examples with equal SDI
    rows (identical inputs) are drawn once, with their count.
    """
    if res.has_sdi_tokens:
        rows, title = np.asarray(res.sdi_tokens[:, query, :, -1]), "SDI at the answer token"
    elif res.has_sdi:
        rows, title = np.asarray(res.sdi[:, query]), "SDI (whole loss)"
    else:
        rows, title = None, "SDI"
    sdi, labels = None, []
    if rows is not None:
        # Enough candidates to find `lines` distinct rows among the copies of one input.
        order = np.argsort(-np.abs(rows.sum(axis=1)), kind="stable")[: 10 * lines]
        groups: dict[bytes, list[int]] = {}
        for i in order:
            groups.setdefault(rows[i].tobytes(), []).append(int(i))
        chosen = list(groups.values())[:lines]
        sdi = rows[[g[0] for g in chosen]][:, res.loop_slots]
        labels = [f"train #{g[0]}" + (f" (+{len(g) - 1} equal)" if len(g) > 1 else "")
                  for g in chosen]  # fmt: skip
    coords, explained = res.phase_portrait()
    return plot_loop_dynamics(
        sdi, labels, res.loop_margins(), coords, explained, path, sdi_title=title, highlight=query
    )


def plot_chain_losses(step_losses: np.ndarray, init_loss: np.ndarray, path: str | Path) -> Path:
    """The SGLD chains' minibatch losses, step by step, at each checkpoint (K, C, steps),
    with the loss at the checkpoint (the LLC's reference) dashed."""
    plt = _pyplot()
    n_ckpt = step_losses.shape[0]
    fig, axes = plt.subplots(1, n_ckpt, figsize=(4.5 * n_ckpt, 3.5), squeeze=False,
                             constrained_layout=True)  # fmt: skip
    for k, ax in enumerate(axes[0]):
        for c, losses in enumerate(step_losses[k]):
            ax.plot(losses, lw=0.8, label=f"chain {c}")
        ax.axhline(float(init_loss[k]), color="k", ls="--", lw=0.8, label="at the checkpoint")
        ax.set_title(f"checkpoint {k}")
        ax.set_xlabel("SGLD step")
        ax.set_ylabel("minibatch loss")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def rank_agreement(a: np.ndarray, b: np.ndarray, k: int) -> tuple[float, float]:
    """Spearman rank correlation of two score vectors over the training examples, and the
    overlap of their top-k sets (a fraction)."""
    ranks_a = np.argsort(np.argsort(-a, kind="stable"), kind="stable").astype(np.float64)
    ranks_b = np.argsort(np.argsort(-b, kind="stable"), kind="stable").astype(np.float64)
    rho = float(np.corrcoef(ranks_a, ranks_b)[0, 1]) if len(a) > 1 else float("nan")
    k = min(k, len(a))
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return rho, len(top_a & top_b) / max(k, 1)


def plot_bif_vs_tracin(bif: np.ndarray, tracin: np.ndarray, path: str | Path, k: int = 10) -> Path:
    """Per query: the Spearman correlation of the BIF and TracIn rankings of the training
    examples and their top-k overlap; both (N, M) over the same examples and queries."""
    plt = _pyplot()
    stats = np.array([rank_agreement(bif[:, j], tracin[:, j], k) for j in range(bif.shape[1])])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(stats) + 2), 3.5), constrained_layout=True)
    x = np.arange(len(stats))
    ax.bar(x - 0.2, stats[:, 0], width=0.4, label="Spearman ρ (BIF vs TracIn)")
    ax.bar(x + 0.2, stats[:, 1], width=0.4, label=f"top-{k} overlap")
    ax.set_xlabel("query")
    ax.set_ylim(-1, 1)
    ax.axhline(0, color="k", lw=0.6)
    ax.legend(fontsize=7)
    return _save(fig, path)


def bif_figures(res: Results, folder: str | Path, tracin: np.ndarray | None = None) -> list[Path]:
    """A BIF run's plots into ``folder``: the chains' losses, and with ``tracin`` (N, M) of
    the same data the BIF-vs-TracIn ranking comparison."""
    out = Path(folder)
    llc = res.llc()
    paths = [plot_chain_losses(llc["step_losses"], llc["init_loss"], out / "bif_chains.png")]
    if tracin is not None:
        bif = np.asarray(res.bif[:])
        paths.append(plot_bif_vs_tracin(bif, tracin, out / "bif_vs_tracin.png", k=min(res.k, 10)))
    return paths
