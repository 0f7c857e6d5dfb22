"""What a finished run prints and draws: top examples per query and step, and plots."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdi_pipeline.files.atomic import write_text_atomic
from sdi_pipeline.formats.results import Results
from sdi_pipeline.inputs import build
from sdi_pipeline.report.plots import (
    loop_dynamics_figure,
    plot_step_profiles,
    plot_token_map,
    plot_trajectories,
)
from sdi_pipeline.run.rundir import RunDir


def describe_example(item: Any, max_tokens: int = 24) -> str:
    """A short text for a dataset item: its token ids (and target, if any)."""
    if isinstance(item, dict):
        tokens = item.get("tokens", item.get("input_ids"))
        target = item.get("target")
    else:
        tokens, target = item, None
    text = ""
    if isinstance(tokens, torch.Tensor | np.ndarray):
        ids = [int(t) for t in np.asarray(tokens).reshape(-1)]
        text = " ".join(map(str, ids[:max_tokens])) + (" …" if len(ids) > max_tokens else "")
    if target is not None:
        text += f"  → {int(target)}"
    return text


def example_key(item: Any) -> Hashable:
    """An exact identity of a dataset item: equal keys for identical inputs (and targets).

    Tensors and arrays count by dtype, shape and bytes; dicts by their sorted keys and
    values; anything else by its ``repr``.
    """
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        return ("array", str(item.dtype), item.shape, item.tobytes())
    if isinstance(item, dict):
        return ("dict", tuple((str(k), example_key(v)) for k, v in sorted(item.items())))
    if isinstance(item, list | tuple):
        return ("seq", tuple(example_key(v) for v in item))
    return ("value", repr(item))


@dataclass
class DistinctExample:
    """One line of a top-k listing: a training example and its identical copies."""

    index: int
    score: float
    identical: list[int] = field(default_factory=list)


def distinct_top(
    ranked: Sequence[tuple[int, float]], key: Callable[[int], Hashable], k: int
) -> list[DistinctExample]:
    """The first ``k`` distinct training inputs of a ranked list (index, score), best first.

    Examples whose ``key`` equals an earlier one's are not listed again but counted on that
    line (``identical``), anywhere in ``ranked``; fewer than ``k`` lines come back when
    ``ranked`` holds fewer distinct inputs.
    """
    lines: dict[Hashable, DistinctExample] = {}
    for index, score in ranked:
        name = key(index)
        if name in lines:
            lines[name].identical.append(index)
        elif len(lines) < k:
            lines[name] = DistinctExample(index, score)
    return list(lines.values())


def trajectory_rows(
    res: Results, query: int, key: Callable[[int], Hashable], top: int = 12
) -> tuple[np.ndarray, list[str]]:
    """The SDI trajectories (rows, slots) of ``query``'s ``top`` distinct training inputs by
    TracIn -- the printed summary's ranking, copies grouped the same way -- and a label per
    row (``train #131 (+2 identical)``). Needs the full SDI tensor (``res.has_sdi``)."""
    lines = distinct_top(res.topk(query), key, top)
    rows = np.zeros((len(lines), len(res.slot_names)))
    for r, line in enumerate(lines):
        rows[r] = res.sdi[line.index, query]
    labels = [
        f"train #{line.index}" + (f" (+{len(line.identical)} identical)" if line.identical else "")
        for line in lines
    ]
    return rows, labels


def format_example(line: DistinctExample, text: str, shown: int = 3) -> str:
    """``train #131 (+2 identical: #314, #288) +3.400e-07  <text>``."""
    label = f"train #{line.index}"
    if line.identical:
        listed = ", ".join(f"#{i}" for i in line.identical[:shown])
        more = ", …" if len(line.identical) > shown else ""
        label += f" (+{len(line.identical)} identical: {listed}{more})"
    return f"{label:<14s} {line.score:+.3e}  {text}"


def print_summary(run: RunDir, loss: str, k: int = 3) -> None:
    """Print the top-k distinct training inputs of each query (overall and at its peak step).

    Identical training inputs share one line with their count, read from the stored top-k
    (merge.topk) of results.h5, which is left as it is. ``loss`` says which loss the
    scores are of (and where it was set), e.g.
    ``sdi_pipeline.inputs.losses.next_token_loss (from data=tokens)``.
    """
    cfg = run.load_config()
    train = build.build_dataset(cfg, "train")
    query = build.build_dataset(cfg, "query")
    keys: dict[int, Hashable] = {}

    def key(i: int) -> Hashable:
        if i not in keys:
            keys[i] = example_key(train[i])
        return keys[i]

    def listing(title: str, ranked: list[tuple[int, float]], n_train: int) -> None:
        lines = distinct_top(ranked, key, k)
        note = ""
        if len(lines) < k:
            more = "" if len(ranked) >= n_train else ": a larger merge.topk keeps more"
            note = f" (only {len(lines)} distinct among the {len(ranked)} stored{more})"
        print(f"  {title}{note}:")
        for line in lines:
            print(f"    {format_example(line, describe_example(train[line.index]))}")

    print(f"\nloss: {loss}")
    with Results.open(run.path) as res:
        if res.method == "bif":
            _print_bif(res, query, listing, k)
            return
        print(f"targets: {res.assignment}")
        energy = res.energy()
        loop = [s for s, name in enumerate(res.slot_names) if name.startswith("step ")]
        for j in range(res.n_query):
            # The loop step where influence peaks (prelude / readout slots are not steps).
            peak = loop[int(energy[j, loop].argmax())]
            print(f"\nquery {j}: {describe_example(query[j])}")
            print(f"  influence peaks at loop {res.slot_names[peak]}")
            # The whole stored top-k: identical copies fill it, k distinct lines are wanted.
            listing(f"top {k} overall (TracIn)", res.topk(j), res.n_train)
            listing(f"top {k} at {res.slot_names[peak]}", res.topk(j, step=peak), res.n_train)
        plots = write_plots(run, res, key)
    print(f"\nplots: {', '.join(str(p) for p in plots)}")
    print(f"results: {run.results_path}")
    # The interpreter that ran this (the project's .venv), so the command works as shown.
    local = sys.prefix.startswith(os.getcwd())
    python = os.path.relpath(sys.executable) if local else "python"
    bin_dir = os.path.dirname(python) + "/" if local else ""
    print(
        f'look further:  {python} -c "from sdi_pipeline.formats.results import Results; '
        f"r = Results.open('{run.path}'); print(r.topk(0, 5, step=0))\""
    )
    print(f"               {bin_dir}sdi-status run_dir={run.path}")
    print(
        f"on a cluster:  {bin_dir}sdi-attribute launcher=slurm launcher.array_size=16 "
        "launcher.partition=..."
    )


def _print_bif(res: Results, query: Any, listing: Any, k: int) -> None:
    """A BIF run's summary: the LLC per checkpoint, each query's top examples by BIF."""
    llc = res.llc()
    for c, (mean, std) in enumerate(zip(llc["mean"], llc["std"], strict=True)):
        print(
            f"checkpoint {c}: LLC {mean:.4g} +- {std:.2g} over {llc['per_chain'].shape[1]} chains"
        )
    for j in range(res.n_query):
        print(f"\nquery {j}: {describe_example(query[j])}")
        listing(f"top {k} by BIF", res.topk(j, method="bif"), res.n_train)
    folder = res.path.parent / "plots"
    plots = sorted(folder.glob("bif_*.png")) if folder.is_dir() else []
    print(f"\nplots: {', '.join(str(p) for p in plots)}")
    print(f"results: {res.path}")


# Bump when what a plot shows changes, so that runs already merged draw it again
# (2: the trajectories plot groups identical inputs, as the summary does).
PLOTS_VERSION = 2


def write_plots(run: RunDir, res: Results, key: Callable[[int], Hashable]) -> list[Path]:
    """Per-step energy and signed share across queries, and query 0's trajectories (its
    distinct top inputs, identical ones -- equal ``key`` of their index -- on one row).

    A plot written after results.h5 was, by plotting code of this :data:`PLOTS_VERSION`
    (``plots/.version``), is kept as it is: a rerun with nothing new redraws nothing."""
    folder = run.path / "plots"
    names = res.slot_names
    merged = run.results_path.stat().st_mtime_ns
    stamp = folder / ".version"
    current = stamp.is_file() and stamp.read_text().strip() == str(PLOTS_VERSION)
    paths: list[Path] = []

    def draw(path: Path, plot: Callable[[], Path]) -> None:
        fresh = current and path.is_file() and path.stat().st_mtime_ns >= merged
        paths.append(path if fresh else plot())

    steps = folder / "sdi_steps.png"
    draw(steps, lambda: plot_step_profiles(res.energy(), res.signed_share(), names, steps))
    if res.has_sdi:  # trajectories need the full SDI tensor (see merge.sdi_max_gb)
        trajectories = folder / "sdi_trajectories_query0.png"
        draw(
            trajectories,
            lambda: plot_trajectories(*trajectory_rows(res, 0, key), names, 0, trajectories),
        )
    if res.has_tokens:
        positions = res.token_positions[0]
        energy = folder / "sdi_tokens_query0.png"
        title = "query 0: Σ_i |SDI| per loop step and token"
        draw(energy, lambda: plot_token_map(res.token_map(0), names, positions, energy, title))
        (top, _score), *_ = res.topk(0, 1)
        if res.has_sdi_tokens:
            path = folder / f"sdi_tokens_query0_train{top}.png"
            title_top = f"query 0, its top training example #{top}: SDI per loop step and token"
            draw(
                path,
                lambda: plot_token_map(res.token_map(0, top), names, positions, path, title_top),
            )
    if res.has_loop_trace:
        dynamics = folder / "loop_dynamics.png"
        draw(dynamics, lambda: loop_dynamics_figure(res, dynamics))
    if not current:
        write_text_atomic(stamp, f"{PLOTS_VERSION}\n")
    return paths
