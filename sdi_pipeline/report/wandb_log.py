"""Weights & Biases logging for the query job, the workers and the merge.

One W&B run per job, grouped by the run id, so a run's workers and its merge sit together
in the W&B UI. ``wandb.mode`` in the config picks the mode:

* ``offline``: everything W&B writes goes under the run directory (``<run>/wandb/``: the
  ``offline-run-*`` folder, W&B's cache and its artifact staging area), nothing touches the
  network, and ``wandb sync <run>/wandb/offline-run-*`` uploads it later.
* ``online``: logs directly (needs ``wandb login`` or ``WANDB_API_KEY``).
* ``disabled``: every method is a no-op; wandb is not even imported and no file is written.

W&B is a side channel: if ``wandb.init`` fails (no credentials, server unreachable), the
logger warns in the job's log and carries on disabled rather than failing the job.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
from omegaconf import DictConfig, OmegaConf

from sdi_pipeline.formats.results import UNIT_STATS, Results
from sdi_pipeline.run.rundir import RunDir

if TYPE_CHECKING:
    from wandb.sdk.wandb_run import Run

log = logging.getLogger("sdi_pipeline")

JOB_TYPES = ("query", "worker", "score", "merge")
# Bins of the TracIn histogram (W&B allows at most 512).
HISTOGRAM_BINS = 64
# Bytes of TracIn read per chunk when building the histogram: the matrix may not fit in
# memory (or not twice), so it is streamed in row blocks, twice (range, then counts).
READ_CHUNK_BYTES = 64 * 2**20
# SDI trajectory heatmaps are logged for this many queries (each reads one (N, S) slice).
TRAJECTORY_QUERIES = 4

# W&B's own directories, redirected under <run>/wandb/ (cache: wandb-core's debug log;
# data: artifact staging, which `wandb sync` needs; artifacts: downloads, else ./artifacts).
_WANDB_DIRS = {
    "WANDB_CACHE_DIR": "cache",
    "WANDB_DATA_DIR": "data",
    "WANDB_ARTIFACT_DIR": "artifacts",
}


class WandbLogger:
    """The W&B run of one job of an attribution run.

    Args:
        cfg: the run's config (its ``wandb`` section: ``mode``, ``project``, ``entity``).
        run: the run directory; its id (``run.path.name``) is the W&B group.
        job_type: ``"query"``, ``"worker"`` or ``"merge"``.
        name: the W&B run name, e.g. ``"worker-0003"``.

    Use as a context manager (``with WandbLogger(...) as wb:``) or call :meth:`finish`;
    the W&B run is finished even when the block raises (with a non-zero exit code).
    """

    def __init__(self, cfg: DictConfig, run: RunDir, job_type: str, name: str) -> None:
        if job_type not in JOB_TYPES:
            raise ValueError(f"job_type must be one of {', '.join(JOB_TYPES)}, got {job_type!r}")
        self.run = run
        self.job_type = job_type
        self.name = name
        self.mode = str(cfg.wandb.mode)
        self._run: Run | None = None
        self._env_set: list[str] = []  # the variables _set_env added, removed by finish
        self._units = 0
        self._examples = 0.0
        if self.mode == "disabled":
            return  # no import, no files: the whole point of disabled
        self._set_env()
        try:
            self._run = self._init(cfg)
        except Exception as err:
            log.warning("W&B logging disabled for %s: wandb.init failed: %s", name, err)
            self._restore_env()

    @property
    def enabled(self) -> bool:
        """Whether a W&B run is active (false when disabled, finished, or init failed)."""
        return self._run is not None

    def _set_env(self) -> None:
        """Point W&B's cache/data/artifact dirs into the run dir; keep the network off.

        Only variables the user has not set are changed, and they are restored by
        :meth:`finish`. wandb-core is started once per process with the environment of the
        first init, so its debug log stays in the first run's folder.
        """
        wanted = {var: str(self.run.path / "wandb" / sub) for var, sub in _WANDB_DIRS.items()}
        # Silences wandb.login's messages too, which ignore the run's Settings(silent=True).
        wanted["WANDB_SILENT"] = "true"
        if self.mode == "offline":
            # Error reports go to W&B's telemetry endpoint: no network at all offline.
            wanted["WANDB_ERROR_REPORTING"] = "false"
        for var, value in wanted.items():
            if var not in os.environ:
                os.environ[var] = value
                self._env_set.append(var)

    def _restore_env(self) -> None:
        for var in self._env_set:
            os.environ.pop(var, None)
        self._env_set = []

    def _init(self, cfg: DictConfig) -> Run:
        import wandb  # lazily: importing wandb takes about a second

        # Without credentials, wandb.init asks for an API key on a TTY (even when silent)
        # and would block a job started from a terminal: look for them without a prompt.
        if self.mode == "online" and not wandb.login(prompt=False, verify=False):
            raise RuntimeError("no W&B credentials: run `wandb login` or set WANDB_API_KEY")
        return wandb.init(
            project=str(cfg.wandb.project),
            entity=None if cfg.wandb.entity is None else str(cfg.wandb.entity),
            dir=str(self.run.path),
            group=self.run.path.name,
            job_type=self.job_type,
            name=self.name,
            mode="offline" if self.mode == "offline" else "online",
            config=_plain(cfg),
            # Several loggers may be open in one process (tests, notebooks): never reuse or
            # finish another run behind its owner's back.
            reinit="create_new",
            settings=wandb.Settings(
                silent=True,  # no banner in job logs
                console="off",  # jobs already log to <run>/logs/; do not wrap stdout
            ),
        )

    # -- logging ---------------------------------------------------------------------

    def log(self, metrics: Mapping[str, Any]) -> None:
        """Log arbitrary metrics (a W&B history step)."""
        if self._run is not None:
            self._run.log(dict(metrics))

    def log_unit(self, stats: Mapping[str, Any]) -> None:
        """Log a worker's per-unit stats (``examples``, ``seconds``, ``examples_per_s``, ...).

        Numeric stats become ``unit/<key>`` metrics; running totals ``worker/units`` and
        ``worker/examples`` show the worker's progress. Text fields (unit name, host) go to
        the summary as the last unit's.
        """
        if self._run is None:
            return
        self._units += 1
        self._examples += float(stats.get("examples", 0) or 0)
        metrics: dict[str, Any] = {
            f"unit/{key}": value for key, value in stats.items() if _is_number(value)
        }
        metrics["worker/units"] = self._units
        metrics["worker/examples"] = self._examples
        self._run.log(metrics)
        for key, value in stats.items():
            if isinstance(value, str):
                self._run.summary[f"unit/{key}"] = value

    def log_merge(self, results_path: str | Path | None = None) -> None:
        """Log a merged run's results.h5: config, coverage, SDI per step, TracIn, top-k.

        ``results_path`` is results.h5 or its run directory; by default this run's.

        Logged keys (one history step):

        * ``sdi/energy``, ``sdi/signed_share``: tables (query, slot, value) of
          ``diagnostics/energy`` and ``diagnostics/signed_share``;
        * ``sdi/step_profiles``: their plot (median and IQR over queries);
          ``sdi/trajectories/query_NNNNN``: SDI heatmaps of the first queries' top examples
          (only when the full SDI tensor is stored);
        * ``tracin/histogram``: all TracIn scores;
        * ``topk/{overall,per_step}/{positive,negative}``: tables (query, slot, rank,
          train_index, score), ``slot`` = ``"overall"`` for the TracIn ranking;
        * ``sketch_norm/train`` (checkpoint, slot, value), ``sketch_norm/query``
          (checkpoint, query, slot, value), ``units`` (per-unit throughput);
        * with a loop trace (``analysis.loop_trace``): ``loop/margin`` (checkpoint, query,
          step, value), the logit margin after each loop step, and ``loop/dynamics``, the
          figure of SDI at the answer token, the margins and the PCA phase portrait.

        Summary: ``n_train``, ``n_query``, ``n_slots``, ``topk``, ``sdi_stored``,
        ``coverage/units``, ``coverage/examples``, ``energy/<slot>`` and
        ``signed_share/<slot>`` (means over queries), ``tracin/{min,max,mean,std}``.
        The W&B config becomes the run's config.yaml (resolved) plus its ``config_hash``.
        """
        if self._run is None:
            return
        import wandb

        path = Path(results_path) if results_path is not None else self.run.results_path
        wrun = self._run
        config = _plain(self.run.load_config())
        with Results.open(path) as res:
            config["config_hash"] = res.config_hash
            wrun.config.update(config, allow_val_change=True)
            if res.method == "bif":
                self._log_bif(wandb, res)
                return
            slots = res.slot_names
            energy, share = res.energy(), res.signed_share()
            diagnostics = res.diagnostics()
            data: dict[str, Any] = {
                "sdi/energy": _slot_table(wandb, energy, slots),
                "sdi/signed_share": _slot_table(wandb, share, slots),
            }
            for scope in ("overall", "per_step"):
                for sign in ("positive", "negative"):
                    indices, scores = res.topk_arrays(scope, sign)
                    data[f"topk/{scope}/{sign}"] = _topk_table(
                        wandb, indices, scores, slots if scope == "per_step" else None
                    )
            data["sketch_norm/train"] = _table(
                wandb,
                ["checkpoint", "slot", "value"],
                [
                    [k, res.train_slot_names[s], float(v)]
                    for (k, s), v in np.ndenumerate(diagnostics["train_sketch_norm"])
                ],
            )
            data["sketch_norm/query"] = _table(
                wandb,
                ["checkpoint", "query", "slot", "value"],
                [
                    [k, j, slots[t], float(v)]
                    for (k, j, t), v in np.ndenumerate(diagnostics["query_sketch_norm"])
                ],
            )
            data["units"] = _units_table(wandb, diagnostics)
            if res.has_loop_trace:
                loop = [slots[s] for s in res.loop_slots]
                data["loop/margin"] = _table(
                    wandb,
                    ["checkpoint", "query", "step", "value"],
                    [
                        [k, j, loop[t], float(v)]
                        for k in range(len(res.checkpoints))
                        for (j, t), v in np.ndenumerate(res.loop_margins(k))
                    ],
                )
            counts, edges, moments = _tracin_histogram(res.tracin)
            data["tracin/histogram"] = wandb.Histogram(np_histogram=(counts, edges))
            coverage = res.coverage()
            summary: dict[str, Any] = {
                "n_train": res.n_train,
                "n_query": res.n_query,
                "n_slots": len(slots),
                "topk": res.k,
                "sdi_stored": res.has_sdi,
                "coverage/units": int(coverage["units"]),
                "coverage/examples": int(coverage["examples"]),
                **{f"tracin/{k}": v for k, v in moments.items()},
            }
            for t, slot in enumerate(slots):
                summary[f"energy/{slot}"] = float(energy[:, t].mean())
                summary[f"signed_share/{slot}"] = float(share[:, t].mean())
            # Images are copied into the W&B run when logged, so their files only need to
            # live until run.log returns; keep them inside the run dir, not in $TMPDIR/cwd.
            (self.run.path / "wandb").mkdir(exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.run.path / "wandb") as tmp:
                key = _example_keys(self.run.load_config()) if res.has_sdi else None
                data.update(_plots(wandb, res, energy, share, Path(tmp), key))
                wrun.log(data)
        wrun.summary.update(summary)

    def _log_bif(self, wandb: Any, res: Results) -> None:
        """A BIF run: ``bif/histogram`` (all BIF scores), ``bif/topk/{positive,negative}``
        tables, ``bif/llc`` (checkpoint, chain, value), ``bif/chains`` (the chains' losses
        plot); summary ``n_train``, ``n_query``, ``topk``, ``bif/{min,max,mean,std}``,
        ``llc/mean/<k>`` and ``llc/std/<k>`` per checkpoint."""
        from sdi_pipeline.report import plots

        assert self._run is not None
        counts, edges, moments = _tracin_histogram(res.bif)
        llc = res.llc()
        data: dict[str, Any] = {
            "bif/histogram": wandb.Histogram(np_histogram=(counts, edges)),
            "bif/llc": _table(
                wandb,
                ["checkpoint", "chain", "value"],
                [[k, c, float(v)] for (k, c), v in np.ndenumerate(llc["per_chain"])],
            ),
        }
        for sign in ("positive", "negative"):
            indices, scores = res.bif_topk_arrays(sign)
            data[f"bif/topk/{sign}"] = _topk_table(wandb, indices, scores, None)
        (self.run.path / "wandb").mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.run.path / "wandb") as tmp:
            chains = plots.plot_chain_losses(
                llc["step_losses"], llc["init_loss"], Path(tmp) / "bif_chains.png"
            )
            data["bif/chains"] = wandb.Image(str(chains))
            self._run.log(data)
        summary: dict[str, Any] = {"n_train": res.n_train, "n_query": res.n_query, "topk": res.k}
        summary |= {f"bif/{k}": v for k, v in moments.items()}
        for k, (mean, std) in enumerate(zip(llc["mean"], llc["std"], strict=True)):
            summary |= {f"llc/mean/{k}": float(mean), f"llc/std/{k}": float(std)}
        self._run.summary.update(summary)

    # -- lifetime --------------------------------------------------------------------

    def finish(self, exit_code: int | None = None) -> None:
        """Finish the W&B run (idempotent) and restore the environment it changed."""
        run, self._run = self._run, None
        try:
            if run is not None:
                run.finish(exit_code=exit_code)
        finally:
            self._restore_env()

    def __enter__(self) -> WandbLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A failed job shows as failed in W&B rather than as a clean finish.
        self.finish(exit_code=None if exc_type is None else 1)


# -- helpers -----------------------------------------------------------------------------


def _plain(cfg: DictConfig) -> dict[str, Any]:
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _table(wandb: Any, columns: list[str], rows: list[list[Any]]) -> Any:
    if len(rows) > wandb.Table.MAX_ARTIFACT_ROWS:
        log.warning(
            "W&B table with columns %s has %d rows: W&B keeps only the first %d",
            columns, len(rows), wandb.Table.MAX_ARTIFACT_ROWS,
        )  # fmt: skip
    return wandb.Table(columns=columns, data=rows)


def _slot_table(wandb: Any, values: np.ndarray, slots: Sequence[str]) -> Any:
    """(query, slot, value) rows of an (M, S) array, query-major."""
    return _table(
        wandb,
        ["query", "slot", "value"],
        [[j, slots[t], float(v)] for (j, t), v in np.ndenumerate(values)],
    )


def _topk_table(
    wandb: Any, indices: np.ndarray, scores: np.ndarray, slots: Sequence[str] | None
) -> Any:
    """(query, slot, rank, train_index, score) rows of (M, k) or, with slots, (M, S, k)."""
    rows: list[list[Any]] = []
    for j in range(indices.shape[0]):
        if slots is None:
            per_slot = [("overall", indices[j], scores[j])]
        else:
            per_slot = [(slots[t], indices[j, t], scores[j, t]) for t in range(len(slots))]
        for slot, idx, sc in per_slot:
            rows.extend(
                [j, slot, rank, int(i), float(s)]
                for rank, (i, s) in enumerate(zip(idx, sc, strict=True), 1)
            )
    return _table(wandb, ["query", "slot", "rank", "train_index", "score"], rows)


def _units_table(wandb: Any, diagnostics: Mapping[str, np.ndarray]) -> Any:
    """(unit, stats...) rows from results.h5's diagnostics/units table."""
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in diagnostics["units/name"]]
    rows = [
        [name, *(float(diagnostics[f"units/{key}"][u]) for key in UNIT_STATS)]
        for u, name in enumerate(names)
    ]
    return _table(wandb, ["unit", *UNIT_STATS], rows)


def _row_chunks(dataset: h5py.Dataset) -> Iterator[np.ndarray]:
    n_rows = dataset.shape[0]
    row_bytes = max(1, math.prod(dataset.shape[1:]) * dataset.dtype.itemsize)
    step = max(1, READ_CHUNK_BYTES // row_bytes)
    for start in range(0, n_rows, step):
        yield np.asarray(dataset[start : start + step])


def _tracin_histogram(
    tracin: h5py.Dataset, bins: int = HISTOGRAM_BINS
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Counts and edges of all TracIn scores, and their min/max/mean/std, in two passes."""
    lo, hi, total, total_sq, n = math.inf, -math.inf, 0.0, 0.0, 0
    for chunk in _row_chunks(tracin):
        values = chunk[np.isfinite(chunk)].astype(np.float64)
        if values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
            total += float(values.sum())
            total_sq += float(np.square(values).sum())
            n += values.size
    if n == 0:
        lo, hi = 0.0, 1.0
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    counts = np.zeros(bins, dtype=np.int64)
    for chunk in _row_chunks(tracin):
        counts += np.histogram(chunk[np.isfinite(chunk)], bins=edges)[0]
    mean = total / n if n else math.nan
    std = math.sqrt(max(total_sq / n - mean * mean, 0.0)) if n else math.nan
    return counts, edges, {"min": lo, "max": hi, "mean": mean, "std": std}


def _example_keys(cfg: DictConfig) -> Callable[[int], Hashable]:
    """Identity of training example ``i`` (its tokens and target), read on first use."""
    from sdi_pipeline.inputs.build import build_dataset
    from sdi_pipeline.report.summary import example_key

    train = build_dataset(cfg, "train")
    return functools.cache(lambda i: example_key(train[i]))


def _plots(
    wandb: Any,
    res: Results,
    energy: np.ndarray,
    share: np.ndarray,
    folder: Path,
    key: Callable[[int], Hashable] | None,
) -> dict[str, Any]:
    """Step-profile plot, trajectory heatmaps (with the full SDI stored: each query's distinct
    top inputs by TracIn, copies -- equal ``key`` -- on one row, as the printed summary lists
    them) and the loop-dynamics figure (with a loop trace), as wandb.Images."""
    from sdi_pipeline.report import plots
    from sdi_pipeline.report.summary import trajectory_rows

    slots = list(res.slot_names)
    out: dict[str, Any] = {}
    profile = plots.plot_step_profiles(energy, share, slots, folder / "step_profiles.png")
    out["sdi/step_profiles"] = wandb.Image(str(profile))
    if res.has_sdi and key is not None:
        for j in range(min(TRAJECTORY_QUERIES, res.n_query)):
            rows, labels = trajectory_rows(res, j, key)
            path = plots.plot_trajectories(rows, labels, slots, j, folder / f"trajectories-{j}.png")
            out[f"sdi/trajectories/query_{j:05d}"] = wandb.Image(str(path))
    if res.has_loop_trace:
        path = plots.loop_dynamics_figure(res, folder / "loop_dynamics.png")
        out["loop/dynamics"] = wandb.Image(str(path))
    return out
