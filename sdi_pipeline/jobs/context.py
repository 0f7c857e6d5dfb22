"""The worker and query jobs: sketch blocks of a dataset at each checkpoint, write files.

Both jobs read everything from the run directory's config.yaml; a worker additionally gets
its rank and the world size. The same code runs under every launcher.

Files are content-addressed: each records what it depends on (``depends``: checkpoint
sha256, digest of its examples, sketch spec, targets, parameters, format) and a job reuses
a finished file only while those are unchanged; a stale or damaged one is logged
(``stale: <unit>: <why>``), its marker removed, and recomputed. Before computing a unit a
worker takes its lease (:mod:`sdi_pipeline.leases`); units leased by a live owner are left
to it and waited for at the end, so concurrent launches, duplicate ranks and mismatched
world sizes never compute a unit twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from sdi_pipeline import build
from sdi_pipeline.atomic import clean_temp_files, write_json_atomic
from sdi_pipeline.checkpoints import (
    CheckpointSpec,
    checkpoint_size,
    load_checkpoint,
    load_into,
    resolve_eta_and_source,
)
from sdi_pipeline.config import config_hash, train_hash
from sdi_pipeline.content import HashingSubset, block_digest
from sdi_pipeline.digests import DigestCache, record_digest
from sdi_pipeline.dynamics import LoopTrace, trace_batches
from sdi_pipeline.engine.featurizer import StepFeatures, StepFeaturizer
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.errors import CheckpointError, ConfigError, DataError, RunDirError, SDIError
from sdi_pipeline.freshness import (
    CORRUPT,
    DONE,
    MISSING,
    STALE,
    check_unit,
    explain_stale,
    read_attrs,
)
from sdi_pipeline.launchers import allocated_cpus
from sdi_pipeline.layout import query_lease_name
from sdi_pipeline.leases import Holder, acquire
from sdi_pipeline.logs import as_job_error, log, peak_rss_mb, setup_logging
from sdi_pipeline.rundir import Block, RunDir, Unit, rank_blocks, run_blocks, run_units
from sdi_pipeline.scoring import (
    BlockScorer,
    Scoring,
    add_stored,
    as_stored,
    query_set,
    scoring_plan,
    shard_problem,
)
from sdi_pipeline.shards import write_shard
from sdi_pipeline.store import (
    FORMAT_VERSION,
    UnitReader,
    read_sketch_file,
    verify_sketch_file,
    write_sketch_file,
)
from sdi_pipeline.wandb_log import WandbLogger

# Exit status of a job stopped by SIGTERM/SIGINT before finishing its work (EX_TEMPFAIL).
EXIT_INTERRUPTED = 75


class Interrupted(Exception):
    """The job was asked to stop (SIGTERM / SIGINT) between two batches."""


@dataclass
class CheckpointInfo:
    """A loaded checkpoint: where it is, its digest and eta (and where eta was read)."""

    index: int
    path: str
    size: int
    sha256: str
    eta: float
    eta_source: str

    def as_meta(self) -> dict[str, Any]:
        """The sketch files' checkpoint record (docs/format.md); eta's source is logged."""
        return {
            "index": self.index,
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "eta": self.eta,
        }


class JobContext:
    """What every job builds from a config: model, loss, featurizer, checkpoints.

    ``SDI_THREADS`` and ``SDI_PROGRESS=0`` in the environment (set by the local launcher
    for its parallel workers) override ``runtime.threads`` and ``runtime.progress``. With
    neither, a cluster job uses its CPU allocation (:func:`launchers.allocated_cpus`), not
    every core of the node.
    """

    def __init__(self, cfg: DictConfig, run: RunDir | None = None) -> None:
        self.run = run if run is not None else RunDir(".")
        self.cfg = cfg
        self.hash = config_hash(self.cfg)
        self.train_hash = train_hash(self.cfg)
        # Checkpoint digests, cached by file identity in the run dir (in memory without one).
        self.digests = DigestCache(run.digest_cache_path if run is not None else None)
        threads = os.environ.get("SDI_THREADS") or self.cfg.runtime.threads or allocated_cpus()
        if threads:
            torch.set_num_threads(int(threads))
        self.progress = bool(self.cfg.runtime.progress) and os.environ.get("SDI_PROGRESS") != "0"
        self.device = build.pick_device(self.cfg)
        self.model = build.build_model(self.cfg).to(self.device)
        self._loss = build.build_loss(self.cfg)
        self.loop_trace = build.build_loop_trace(self.cfg)
        self._collate = build.build_collate(self.cfg)
        self.checkpoints = list(self.cfg.checkpoints.paths)
        tokens = self.cfg.analysis.query_tokens
        self.query_tokens = None if tokens is None else (
            tokens if isinstance(tokens, str) else [int(p) for p in tokens]
        )  # fmt: skip
        self.spec = SketchSpec(
            m=int(self.cfg.sketch.m), seed=int(self.cfg.sketch.seed), kernel=self.cfg.sketch.kernel
        )
        self.featurizer = StepFeaturizer(
            self.model,
            list(self.cfg.analysis.targets),
            self.spec,
            expected_steps=self.cfg.analysis.expected_steps,
        )
        self.lease_timeout = float(self.cfg.runtime.lease_timeout_s)
        self.store_train = bool(self.cfg.sketch.store_train)
        self.reader = UnitReader()
        self._loaded: tuple[int, str] | None = None
        # Checkpoints kept in memory (by index: sha256, contents) up to runtime.checkpoint_cache_gb:
        # a worker goes through every checkpoint once per block.
        self._cached: dict[int, tuple[str, Any]] = {}
        self._info: dict[int, CheckpointInfo] = {}
        self._block_digests: dict[int, str] = {}
        self.stop = threading.Event()

    @classmethod
    def open(cls, run_dir: str | Path) -> JobContext:
        """The context of a run directory (its config checked against its hash)."""
        run = RunDir.existing(run_dir)
        return cls(run.load_config(), run)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self._loss(model, build.to_device(batch, self.device))

    def checkpoint_sha(self, k: int) -> str:
        """sha256 of checkpoint k now (from the run's digest cache when the file is unchanged)."""
        path = self.checkpoints[k]
        try:
            return self.digests.sha256(path)
        except OSError as err:
            raise CheckpointError(f"cannot read checkpoint {path} ({err})") from err

    def use_checkpoint(self, k: int) -> CheckpointInfo:
        """Load checkpoint k into the model (unless loaded and unchanged) and describe it."""
        path = self.checkpoints[k]
        sha = self.checkpoint_sha(k)
        if self._loaded != (k, sha):
            size = checkpoint_size(path)
            cached = self._cached.get(k)
            if cached is not None and cached[0] == sha:
                data = cached[1]
            else:
                data = load_checkpoint(path, trust=bool(self.cfg.checkpoints.trust))
                if self.checkpoint_sha(k) != sha:
                    raise CheckpointError(
                        f"checkpoint {path} changed while it was read: wait until it is written "
                        "completely, then run the same command again"
                    )
                self._cache_checkpoint(k, sha, size, data)
            load_into(self.model, data, path)
            etas = self.cfg.checkpoints.etas
            spec = CheckpointSpec(path, None if etas is None else float(etas[k]))
            eta, source = resolve_eta_and_source(spec, data, given_by="checkpoints.etas")
            if k not in self._info or self._info[k].sha256 != sha:
                log.info("checkpoint %d %s: eta %.6g from %s", k, path, eta, source)
            self._info[k] = CheckpointInfo(k, path, size, sha, eta, source)
            self._loaded = (k, sha)
        return self._info[k]

    def _cache_checkpoint(self, k: int, sha: str, size: int, data: Any) -> None:
        self._cached.pop(k, None)
        held = sum(self._info[i].size for i in self._cached if i in self._info)
        if held + size <= float(self.cfg.runtime.checkpoint_cache_gb) * 2**30:
            self._cached[k] = (sha, data)

    def scoring(self, n_train: int) -> Scoring | None:
        """The run's query set, ready to score against, when every query file is complete
        and current; None otherwise (logged). Each file is read once, every value verified."""
        query = build.build_dataset(self.cfg, "query")
        query_sha = block_digest(query, 0, len(query), "query")
        files = []
        for k in range(len(self.checkpoints)):
            path = self.run.query_path(k)
            why = _query_record_problem(path, self.query_depends(k, query_sha))
            if not why and path.exists():
                try:
                    files.append(read_sketch_file(path))
                except SDIError as err:
                    why = getattr(err, "what", str(err))
            if why or not path.exists():
                log.info("query sketches of checkpoint %d not ready (%s)", k, why or "missing")
                return None
        queries = query_set(files, self.device)
        return Scoring(queries, scoring_plan(self.cfg, n_train, queries))

    def base_meta(self, info: CheckpointInfo) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "params": [[p.name, list(p.shape)] for p in self.featurizer.params],
            "checkpoint": info.as_meta(),
            "train_hash": self.train_hash,
        }

    def depends(
        self, kind: str, checkpoint_sha: str, data_sha: str, **extra: Any
    ) -> dict[str, Any]:
        """Everything a sketch file of ``kind`` depends on: its content address's record."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "checkpoint_sha256": checkpoint_sha,
            "data_sha256": data_sha,
            "spec": self.spec.to_dict(),
            "targets": list(self.cfg.analysis.targets),
            "params": [[p.name, list(p.shape)] for p in self.featurizer.params],
            "dtype": str(self.cfg.sketch.dtype),
            **extra,
        }

    def unit_depends(self, unit: Unit, train: Any) -> dict[str, Any]:
        """What unit ``unit`` depends on now (its block's examples are hashed once per job)."""
        if unit.block not in self._block_digests:
            self._block_digests[unit.block] = block_digest(train, unit.start, unit.stop)
        return self.depends(
            "train",
            self.checkpoint_sha(unit.ckpt),
            self._block_digests[unit.block],
            train_hash=self.train_hash,
            train_steps=str(self.cfg.sketch.train_steps),
            block={"index": unit.block, "start": unit.start, "stop": unit.stop},
        )

    def query_depends(self, k: int, query_sha: str) -> dict[str, Any]:
        return self.depends("query", self.checkpoint_sha(k), query_sha, config_hash=self.hash)

    def sketch(
        self, dataset: Any, start: int, stop: int, desc: str, which: str = "train"
    ) -> tuple[StepFeatures, str]:
        """Sketch examples [start, stop) of ``dataset``: the features and the digest of the
        examples they were computed from. Raises Interrupted on a stop request. Queries
        also get per-token features, as ``analysis.query_tokens`` chooses."""
        subset = HashingSubset(dataset, start, stop, which)
        loader = DataLoader(
            subset,
            batch_size=int(self.cfg.data.batch_size),
            shuffle=False,
            collate_fn=self._collate,
        )
        parts = []
        choice = self.query_tokens if which == "query" else None
        batches = self.featurizer.iter_batches(
            loader, self.loss, progress=self.progress, desc=desc, tokens=choice
        )
        try:
            for part in batches:
                parts.append(part)
                if self.stop.is_set():
                    raise Interrupted(desc)
        finally:
            batches.close()
        return StepFeatures.concat(parts), subset.digest()

    def trace(self, dataset: Any, loop_steps: int, stop: int | None = None) -> LoopTrace:
        """``analysis.loop_trace`` of examples [0, stop) of ``dataset`` (default: all)."""
        assert self.loop_trace is not None
        n = len(dataset) if stop is None else stop
        batches = (build.to_device(b, self.device) for b in self._loader(dataset, 0, n))
        trace = trace_batches(self.loop_trace, self.model, batches, loop_steps)
        trace.check(loop_steps, n)
        return trace

    def _loader(self, dataset: Any, start: int, stop: int) -> DataLoader:
        return DataLoader(
            Subset(dataset, range(start, stop)),
            batch_size=int(self.cfg.data.batch_size),
            shuffle=False,
            collate_fn=self._collate,
        )

    @contextmanager
    def signals_stop(self) -> Iterator[None]:
        """While inside, SIGTERM (preemption) and SIGINT stop after the current batch (a
        repeated signal too: a scheduler may send it to every process of the job)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: Any) -> None:
            log.warning(
                "received %s: stopping after the current batch", signal.Signals(signum).name
            )
            self.stop.set()

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _start_job(run_dir: str | Path, name: str) -> RunDir:
    """Open the run dir, log to its logs/<name>.log, remove killed writers' temporary files."""
    run = RunDir.existing(run_dir)
    setup_logging(run, name)
    removed = clean_temp_files(run.folders())
    if removed:
        log.info("removed %d temporary file(s) of killed writers", len(removed))
    return run


def run_worker(run_dir: str | Path, rank: int, world_size: int) -> int:
    """Sketch this rank's blocks (``blocks[rank::world_size]``, each at every checkpoint)
    that are not done yet, and score each against the query sketches when they exist.

    Returns 0 when all its blocks are done, EXIT_INTERRUPTED when stopped by a signal.
    """
    return _ranked_job(run_dir, rank, world_size, "worker", _work)


def run_score(run_dir: str | Path, rank: int, world_size: int) -> int:
    """Score this rank's blocks (``blocks[rank::world_size]``) from stored train sketches
    against the run's query sketches: ``sdi-score``, the re-scoring array. Never sketches.

    Returns 0 when all its blocks are scored, EXIT_INTERRUPTED when stopped by a signal.
    """
    return _ranked_job(run_dir, rank, world_size, "score", _score)


def _ranked_job(
    run_dir: str | Path,
    rank: int,
    world_size: int,
    job: str,
    body: Callable[[JobContext, int, int, WandbLogger], int],
) -> int:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    name = f"{job}-{rank:04d}"
    _start_job(run_dir, name)
    ctx = JobContext.open(run_dir)
    with ctx.signals_stop(), WandbLogger(ctx.cfg, ctx.run, job, name) as wandb_log:
        return body(ctx, rank, world_size, wandb_log)


def _poll_seconds(ctx: JobContext) -> float:
    return min(5.0, max(0.2, ctx.lease_timeout / 20))


def _work(ctx: JobContext, rank: int, world_size: int, wandb_log: WandbLogger) -> int:
    run = ctx.run
    train = build.build_dataset(ctx.cfg, "train")
    run.check_train_size(len(train))
    mine = rank_blocks(run_blocks(ctx.cfg, len(train)), rank, world_size)
    scoring = ctx.scoring(len(train))
    if scoring is None and not ctx.store_train:
        raise ConfigError(
            "sketch.store_train=false scores the train sketches as they are made, so the query "
            f"sketches must be complete first: run sdi-query run_dir={run.path} (sdi-attribute "
            "runs it first), then the workers"
        )
    units = [u for b in mine for u in b.units]
    log.info(
        "rank %d/%d on %s (%s), %d blocks x %d checkpoints, %s: %d units, %d already done",
        rank, world_size, socket.gethostname(), ctx.device, len(mine), len(ctx.checkpoints),
        "scoring each block as it is sketched" if scoring is not None else
        "sketching only (the query sketches are not complete; the merge scores the blocks)",
        len(units), sum(map(run.is_done, units)),
    )  # fmt: skip
    _name_other_world_sizes(run, ctx.cfg, len(train), world_size)
    return _blocks(_Share(ctx, train, rank, world_size, wandb_log, scoring, sketch=True), mine)


@dataclass
class _Share:
    """A ranked job's share of the run: what its blocks are computed with."""

    ctx: JobContext
    train: Any
    rank: int
    world_size: int
    wandb_log: WandbLogger
    scoring: Scoring | None  # None: the query sketches are not complete, sketch only
    sketch: bool  # False for sdi-score, which scores stored train sketches only

    @property
    def job(self) -> str:
        return f"{'worker' if self.sketch else 'score'}-{self.rank:04d}"


def _blocks(share: _Share, mine: list[Block]) -> int:
    """Make sure each of ``mine`` is done (sketched if stored, scored if scoring)."""
    ctx = share.ctx
    waiting: dict[str, Holder] = {}
    for i, block in enumerate(mine):
        outcome = _attempt(share, block, f"[{i + 1}/{len(mine)}] {block.name}")
        if isinstance(outcome, Holder):
            log.info(
                "%s is being computed by %s: coming back to it", block.name, outcome.describe()
            )
            waiting[block.name] = outcome
        elif outcome == EXIT_INTERRUPTED:
            return EXIT_INTERRUPTED
    # Blocks leased by live owners: wait for them to finish, or take over when they die.
    pending = [b for b in mine if b.name in waiting]
    while pending:
        if ctx.stop.is_set():
            log.warning("stopped while waiting for %d block(s) leased by other jobs", len(pending))
            return EXIT_INTERRUPTED
        time.sleep(_poll_seconds(ctx))
        still = []
        for block in pending:
            outcome = _attempt(share, block, block.name)
            if isinstance(outcome, Holder):
                still.append(block)
            elif outcome == EXIT_INTERRUPTED:
                return EXIT_INTERRUPTED
        pending = still
    log.info("rank %d/%d: all %d blocks done", share.rank, share.world_size, len(mine))
    return 0


def _name_other_world_sizes(run: RunDir, cfg: DictConfig, n_train: int, world_size: int) -> None:
    """Warn when units were done by workers of another world size: each unit is still done
    once (leases), but ranks of different world sizes do not cover the units between them."""
    others: set[int] = set()
    for unit in run_units(cfg, n_train):
        try:
            marker = run.read_marker(unit.name)
        except SDIError:
            continue
        size = (marker or {}).get("world_size")
        if isinstance(size, int) and size != world_size:
            others.add(size)
    if others:
        log.warning(
            "units of this run were done by workers with world size %s, this worker has %d: "
            "no unit is done twice, but only all ranks 0..W-1 of one world size W cover every "
            "unit",
            ", ".join(map(str, sorted(others))), world_size,
        )  # fmt: skip


def _attempt(share: _Share, block: Block, desc: str) -> Holder | int:
    """Make sure ``block`` is done: 0 if it is (now), the Holder if another job has it,
    EXIT_INTERRUPTED on a stop request. Failures are recorded for sdi-status and re-raised."""
    ctx, run, job = share.ctx, share.ctx.run, share.job
    in_flight: list[Unit] = []  # the unit being sketched, if any: named when it fails
    try:
        currents = [ctx.unit_depends(u, share.train) for u in block.units]
        if _block_state(ctx, block, currents, share.scoring).done:
            return 0
        lease = acquire(run.lease_path(block.name), job, ctx.lease_timeout, log=log)
        if isinstance(lease, Holder):
            return lease
        with lease:
            # Read again under the lease: another job may have finished it meanwhile.
            state = _block_state(ctx, block, currents, share.scoring, quiet=True)
            if state.done:
                return 0
            _block(share, block, currents, state, desc, in_flight)
    except Interrupted:
        log.warning("stopped during %s; it will be redone on restart", block.name)
        return EXIT_INTERRUPTED
    except Exception as err:
        failed = in_flight[-1:] or list(block.units)
        for unit in failed:
            _record_failure(run, unit, share.rank, err, job)
        if isinstance(err, SDIError):
            raise
        what = f"unit {failed[0].name}" if in_flight else f"scoring {block.name}"
        raise as_job_error(err, what, job) from err
    for unit in block.units:
        run.failure_path(unit).unlink(missing_ok=True)
    if ctx.stop.is_set():
        log.warning("stopping after %s on request", block.name)
        return EXIT_INTERRUPTED
    return 0


def _record_failure(run: RunDir, unit: Unit, rank: int, err: BaseException, job: str) -> None:
    """Record a failed unit so sdi-status can name it and its log (best effort)."""
    log.error("unit %s failed: %s: %s", unit.name, type(err).__name__, err)
    # Best effort: the disk that failed the unit may fail this too; the error still reaches
    # the user.
    with contextlib.suppress(OSError, SDIError):
        write_json_atomic(
            run.failure_path(unit),
            {"unit": unit.name, "rank": rank, "error": f"{type(err).__name__}: {err}",
             "log": str(run.logs_dir / f"{job}.log"), "host": socket.gethostname()},
        )  # fmt: skip


def _fresh(ctx: JobContext, unit: Unit, current: dict[str, Any], quiet: bool = False) -> bool:
    """Whether the unit is done and matches ``current``; a stale or damaged one loses its
    marker (and is logged) so that it is recomputed."""
    run = ctx.run
    check = check_unit(run, unit.name, current=current)
    if check.state == DONE:
        return True
    if check.state in (STALE, CORRUPT):
        if not quiet:
            log.warning("%s: %s: %s; recomputing", check.state, unit.name, check.why)
        run.marker_path(unit).unlink(missing_ok=True)
    return False


@dataclass
class _BlockState:
    """What a block still needs: which of its units are stored and current, and the
    depends its shard must have (None: no scoring, or the shard is current)."""

    stored: list[bool]
    shard_depends: dict[str, Any] | None
    keeps_units: bool  # sketch.store_train: the block is done only with all units stored

    @property
    def done(self) -> bool:
        return (all(self.stored) or not self.keeps_units) and self.shard_depends is None


def _block_state(
    ctx: JobContext,
    block: Block,
    currents: list[dict[str, Any]],
    scoring: Scoring | None,
    quiet: bool = False,
) -> _BlockState:
    """The block's state (unit headers and its shard's header read once); stale or damaged
    units lose their markers and are logged, unless ``quiet``."""
    stored = [
        ctx.store_train and _fresh(ctx, u, c, quiet)
        for u, c in zip(block.units, currents, strict=True)
    ]
    if scoring is None:
        return _BlockState(stored, None, ctx.store_train)
    depends = scoring.depends(block, currents)
    why = shard_problem(ctx.run.shard_path(block.index), depends)
    if why and why != MISSING and not quiet:
        log.warning("%s: %s; rescoring", block.name, why)
    return _BlockState(stored, depends if why else None, ctx.store_train)


def _block(
    share: _Share,
    block: Block,
    currents: list[dict[str, Any]],
    state: _BlockState,
    desc: str,
    in_flight: list[Unit],
) -> None:
    """Sketch (or read back) the block at every checkpoint, then write its shard."""
    ctx, run, scoring = share.ctx, share.ctx.run, share.scoring
    depends = state.shard_depends
    scorer = None
    if scoring is not None and depends is not None:
        scorer = BlockScorer(block, scoring.queries, scoring.plan, ctx.device)
    started = time.perf_counter()
    for unit, current, stored in zip(block.units, currents, state.stored, strict=True):
        if stored:
            if scorer is not None:  # stored earlier: read it back rather than sketch again
                add_stored(scorer, run, unit, ctx.reader)
            continue
        if not share.sketch:
            raise RunDirError(
                f"{unit.name} is not stored (or no longer current): sdi-score scores stored "
                "train sketches only; run the workers (sdi-worker, or the same sdi-attribute "
                "command with sketch.store_train=true) to sketch it"
            )
        in_flight.append(unit)
        sketched = _sketch_unit(share, unit, f"{desc} ckpt {unit.ckpt}", current)
        values, norms, loss, meta, stats = sketched
        in_flight.pop()
        share.wandb_log.log_unit(stats)
        if scorer is not None:
            stored = as_stored(values, ctx.cfg.sketch.dtype)
            # The featurizer's norms are those of the values scored unless rounding changed them.
            scorer.add(unit, stored, loss, meta, stats, norms if stored is values else None)
    if scorer is None or scoring is None or depends is None:
        return
    shard = scorer.finish(
        {
            "block": depends["block"],
            "depends": depends,
            "content_digest": record_digest(depends),
            "rank": share.rank,
            "world_size": share.world_size,
        }
    )
    write_shard(run.shard_path(block.index), shard)
    log.info(
        "scored %s against %d queries in %.2fs", block.name, scoring.queries.n_query,
        time.perf_counter() - started,
    )  # fmt: skip


def _sketch_unit(
    share: _Share, unit: Unit, desc: str, current: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray, dict[str, Any], dict[str, Any]]:
    """Sketch one unit; with sketch.store_train, write its file, then its completion marker.
    Returns its train sketches (as computed), their per-step norms (None when summed),
    losses, file attributes and stats."""
    ctx, run = share.ctx, share.ctx.run
    started = time.perf_counter()
    info = ctx.use_checkpoint(unit.ckpt)
    feats, data_sha = ctx.sketch(share.train, unit.start, unit.stop, desc)
    if data_sha != current["data_sha256"] or info.sha256 != current["checkpoint_sha256"]:
        raise DataError(
            f"the inputs of {unit.name} changed while it was computed (training examples "
            f"{unit.start}..{unit.stop - 1} or checkpoint {unit.ckpt} read differently twice): "
            "is the data or checkpoint being rewritten, or the dataset not deterministic? Run "
            "the same command again once they are stable"
        )
    digest = record_digest(current)
    meta = ctx.base_meta(info) | {
        "kind": "train",
        "layout": feats.layout.to_dict(),
        "train_steps": ctx.cfg.sketch.train_steps,
        "block": {"index": unit.block, "start": unit.start, "stop": unit.stop},
        "depends": current,
        "content_digest": digest,
    }
    summed = ctx.cfg.sketch.train_steps == "summed"
    values, norms = (feats.summed(), None) if summed else (feats.values, feats.norms)
    stats: dict[str, Any] = {
        "unit": unit.name,
        "examples": unit.stop - unit.start,
        "rank": share.rank,
        "world_size": share.world_size,
        "host": socket.gethostname(),
        "content_digest": digest,
        "checkpoint_sha256": info.sha256,
        "data_sha256": data_sha,
    }
    if ctx.store_train:
        path = run.unit_path(unit)
        run.marker_path(unit).unlink(missing_ok=True)  # not done until the new file is in place
        indices = torch.arange(unit.start, unit.stop)
        write_sketch_file(path, indices, values, feats.loss, meta, ctx.cfg.sketch.dtype)
        stats["file_size"] = path.stat().st_size
    seconds = time.perf_counter() - started
    stats |= {
        "seconds": round(seconds, 4),
        "examples_per_s": round((unit.stop - unit.start) / max(seconds, 1e-9), 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if ctx.device.type == "cuda":
        stats["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(ctx.device) / 2**20, 1)
    if ctx.store_train:
        run.mark_done(unit, stats)
    log.info(
        "done %s: %d examples in %.2fs (%.1f ex/s), peak RSS %.0f MiB; targets: %s",
        unit.name, stats["examples"], seconds, stats["examples_per_s"], stats["peak_rss_mb"],
        ctx.featurizer.assignment,
    )  # fmt: skip
    return values, norms, feats.loss.detach().cpu().numpy(), meta, stats


def _score(ctx: JobContext, rank: int, world_size: int, wandb_log: WandbLogger) -> int:
    train = build.build_dataset(ctx.cfg, "train")
    ctx.run.check_train_size(len(train))
    scoring = ctx.scoring(len(train))
    if scoring is None:
        raise ConfigError(
            "sdi-score scores against the query sketches, which are not complete: run "
            f"sdi-query run_dir={ctx.run.path} first"
        )
    mine = rank_blocks(run_blocks(ctx.cfg, len(train)), rank, world_size)
    log.info(
        "scoring rank %d/%d on %s (%s): %d blocks", rank, world_size,
        socket.gethostname(), ctx.device, len(mine),
    )  # fmt: skip
    return _blocks(_Share(ctx, train, rank, world_size, wandb_log, scoring, sketch=False), mine)


def run_query(run_dir: str | Path) -> int:
    """Sketch the query set at every checkpoint (skipping files that are up to date)."""
    _start_job(run_dir, "query")
    ctx = JobContext.open(run_dir)
    with ctx.signals_stop(), WandbLogger(ctx.cfg, ctx.run, "query", "query") as wandb_log:
        return _query(ctx, wandb_log)


def query_fresh(path: Path, current: dict[str, Any]) -> tuple[bool, str]:
    """Whether the query file at ``path`` matches ``current`` depends, and if not, why."""
    why = _query_record_problem(path, current)
    if not why and path.exists():
        try:  # query files are small: every value is verified (checksums, finite)
            verify_sketch_file(path)
        except SDIError as err:
            why = getattr(err, "what", str(err))
    return path.exists() and not why, why


def _query_record_problem(path: Path, current: dict[str, Any]) -> str:
    """Why the query file's record (its header) does not match ``current`` depends: empty
    when it does, and when the file is missing."""
    if not path.exists():
        return ""
    try:
        attrs = read_attrs(path, "content_digest", "depends", "format_version")
    except SDIError as err:
        return str(err)
    recorded = attrs.get("depends") if isinstance(attrs.get("depends"), dict) else {}
    why = explain_stale(recorded or {}, current)
    if not why and attrs.get("content_digest") != record_digest(current):
        why = "its content digest does not match its record"
    return why


def _query(ctx: JobContext, wandb_log: WandbLogger) -> int:
    query = build.build_dataset(ctx.cfg, "query")
    query_sha = block_digest(query, 0, len(query), "query")
    pending = list(range(len(ctx.checkpoints)))
    while pending:
        still = []
        for k in pending:
            outcome = _query_checkpoint(ctx, query, query_sha, k, wandb_log)
            if isinstance(outcome, Holder):
                log.info(
                    "query sketches of checkpoint %d are being computed by %s: waiting",
                    k,
                    outcome.describe(),
                )
                still.append(k)
            elif outcome == EXIT_INTERRUPTED:
                return EXIT_INTERRUPTED
        pending = still
        if pending:
            if ctx.stop.is_set():
                return EXIT_INTERRUPTED
            time.sleep(_poll_seconds(ctx))
    return 0


def _query_checkpoint(
    ctx: JobContext, query: Any, query_sha: str, k: int, wandb_log: WandbLogger
) -> Holder | int:
    run = ctx.run
    path = run.query_path(k)
    current = ctx.query_depends(k, query_sha)
    fresh, why = query_fresh(path, current)
    if fresh:
        log.info("query sketches for checkpoint %d exist: %s", k, path)
        return 0
    if why:
        log.warning("stale: %s: %s; recomputing", path.name, why)
    lease = acquire(run.lease_path(query_lease_name(k)), "query", ctx.lease_timeout, log=log)
    if isinstance(lease, Holder):
        return lease
    with lease:
        try:
            return _compute_query(ctx, query, k, current, path, wandb_log)
        except Exception as err:
            if isinstance(err, SDIError):
                raise
            raise as_job_error(err, f"the query sketches of checkpoint {k}", "query") from err


def _compute_query(
    ctx: JobContext,
    query: Any,
    k: int,
    current: dict[str, Any],
    path: Path,
    wandb_log: WandbLogger,
) -> int:
    if query_fresh(path, current)[0]:
        return 0
    info = ctx.use_checkpoint(k)
    started = time.perf_counter()
    try:
        feats, data_sha = ctx.sketch(query, 0, len(query), f"query ckpt {k}", "query")
    except Interrupted:
        log.warning("query job stopped during checkpoint %d", k)
        return EXIT_INTERRUPTED
    if data_sha != current["data_sha256"] or info.sha256 != current["checkpoint_sha256"]:
        raise DataError(
            f"the query examples or checkpoint {k} read differently twice while its query "
            "sketches were computed: is the data or checkpoint being rewritten, or the query "
            "dataset not deterministic? Run the same command again once they are stable"
        )
    meta = ctx.base_meta(info) | {
        "kind": "query",
        "layout": feats.layout.to_dict(),
        "assignment": ctx.featurizer.assignment,
        "config_hash": ctx.hash,
        "depends": current,
        "content_digest": record_digest(current),
    }
    extra = {}
    if feats.tokens is not None and feats.positions is not None:
        extra = {"token_sketch": feats.tokens, "token_positions": feats.positions}
        meta["query_tokens"] = ctx.query_tokens
    if ctx.loop_trace is not None:
        trace = ctx.trace(query, feats.layout.loop_steps)
        extra |= {"loop_states": trace.states, "loop_margins": trace.margins}
    write_sketch_file(
        path,
        torch.arange(len(query)),
        feats.values,
        feats.loss,
        meta,
        ctx.cfg.sketch.dtype,
        extra=extra,
    )
    log.info("wrote %s (%d queries; targets: %s)", path, len(query), ctx.featurizer.assignment)
    seconds = time.perf_counter() - started
    wandb_log.log({"query/checkpoint": k, "query/seconds": seconds, "query/n": len(query)})
    return 0
