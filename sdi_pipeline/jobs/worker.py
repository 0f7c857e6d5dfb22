"""The worker job (``sdi-worker``): sketch this rank's blocks at each checkpoint and score
them against the query sketches as they are made.

Before computing a unit a worker takes its lease (:mod:`sdi_pipeline.run.leases`); units
leased by a live owner are left to it and waited for at the end, so concurrent launches,
duplicate ranks and mismatched world sizes never compute a unit twice.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from sdi_pipeline.errors import ConfigError, DataError, RunDirError, SDIError
from sdi_pipeline.files.atomic import write_json_atomic
from sdi_pipeline.files.digests import record_digest
from sdi_pipeline.formats.shards import write_shard
from sdi_pipeline.formats.sketches import (
    write_sketch_file,
)
from sdi_pipeline.inputs import build
from sdi_pipeline.jobs.bif_worker import bif_work
from sdi_pipeline.jobs.context import (
    EXIT_INTERRUPTED,
    Interrupted,
    JobContext,
    poll_seconds,
    ranked_job,
)
from sdi_pipeline.jobs.logs import as_job_error, log, peak_rss_mb
from sdi_pipeline.jobs.scoring import (
    BlockScorer,
    Scoring,
    add_stored,
    as_stored,
    shard_problem,
)
from sdi_pipeline.report.wandb_log import WandbLogger
from sdi_pipeline.run.freshness import (
    CORRUPT,
    DONE,
    MISSING,
    STALE,
    check_unit,
)
from sdi_pipeline.run.leases import Holder, acquire
from sdi_pipeline.run.rundir import Block, RunDir, Unit, rank_blocks, run_blocks, run_units


def run_worker(run_dir: str | Path, rank: int, world_size: int) -> int:
    """Sketch this rank's blocks (``blocks[rank::world_size]``, each at every checkpoint)
    that are not done yet, and score each against the query sketches when they exist.

    Returns 0 when all its blocks are done, EXIT_INTERRUPTED when stopped by a signal.
    """
    return ranked_job(run_dir, rank, world_size, "worker", _work)


def _work(ctx: JobContext, rank: int, world_size: int, wandb_log: WandbLogger) -> int:
    if ctx.cfg.method == "bif":
        return bif_work(ctx, rank, world_size, wandb_log)
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
    return complete_blocks(
        Share(ctx, train, rank, world_size, wandb_log, scoring, sketch=True), mine
    )


@dataclass
class Share:
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


def complete_blocks(share: Share, mine: list[Block]) -> int:
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
        time.sleep(poll_seconds(ctx))
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


def _attempt(share: Share, block: Block, desc: str) -> Holder | int:
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
    share: Share,
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
    share: Share, unit: Unit, desc: str, current: dict[str, Any]
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
