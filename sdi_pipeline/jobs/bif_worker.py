"""The BIF worker (``sdi-worker`` with method=bif): for each of this rank's blocks, replay
every chain at every checkpoint recording the block's losses (one unit each, with a
completion marker), then score the block against the query traces into its shard.

Blocks are leased as the SDI workers lease them; a kill costs at most the unit in flight
(a chain replay on one block). The query traces must be complete first (the launchers run
the query job before the workers).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

import torch

from sdi_pipeline.engine.sgld import LossRecorder
from sdi_pipeline.errors import ConfigError, DataError, SDIError
from sdi_pipeline.files.atomic import write_json_atomic
from sdi_pipeline.files.digests import record_digest
from sdi_pipeline.formats.traces import read_bif_file, read_bif_meta, write_bif_file
from sdi_pipeline.inputs import build
from sdi_pipeline.inputs.content import block_digest
from sdi_pipeline.jobs.bif_context import (
    BifJob,
    BifUnit,
    QueryTraces,
    block_topk,
    block_units,
    file_query_traces,
    score_traces,
    unit_depends,
    unit_problem,
)
from sdi_pipeline.jobs.context import EXIT_INTERRUPTED, JobContext, until_done
from sdi_pipeline.jobs.logs import as_job_error, log, peak_rss_mb
from sdi_pipeline.report.wandb_log import WandbLogger
from sdi_pipeline.run.freshness import explain_stale
from sdi_pipeline.run.layout import bif_block_name
from sdi_pipeline.run.leases import Holder, acquire
from sdi_pipeline.run.rundir import Block, RunDir, rank_blocks, run_blocks


@dataclass
class QueryFiles:
    """Every checkpoint's query traces: their headers, chain losses and z-traces."""

    meta: list[dict[str, Any]]
    step_losses: list[torch.Tensor]  # (C, steps) per checkpoint, for the replay check
    traces: list[QueryTraces]

    @property
    def digests(self) -> list[str]:
        return [q.digest for q in self.traces]


def load_queries(job: BifJob) -> QueryFiles:
    """Read every checkpoint's query traces, refusing missing ones or ones of another config
    or checkpoint (the merge checks the data they were recorded from)."""
    ctx = job.ctx
    metas, losses, traces = [], [], []
    for k in range(len(ctx.checkpoints)):
        path = ctx.run.bif_query_path(k)
        if not path.exists():
            raise ConfigError(
                f"the query traces of checkpoint {k} are missing ({path}): run sdi-query "
                f"run_dir={ctx.run.path} first (sdi-attribute runs it before the workers)"
            )
        file = read_bif_file(path, "bif-query")
        chain = file.meta.get("depends", {}).get("chain", {})
        if file.meta.get("config_hash") != ctx.hash or chain.get(
            "checkpoint_sha256"
        ) != ctx.checkpoint_sha(k):
            raise ConfigError(
                f"{path} was recorded for another config or checkpoint: run sdi-query "
                f"run_dir={ctx.run.path} again"
            )
        metas.append(file.meta)
        losses.append(torch.from_numpy(file.arrays["step_losses"]))
        traces.append(file_query_traces(file, job.settings()))
    return QueryFiles(metas, losses, traces)


def shard_depends(
    job: BifJob, block: Block, unit_digests: list[str], queries: QueryFiles
) -> dict[str, Any]:
    """What a block's shard depends on: its units, the query traces, the scoring settings."""
    return {
        "kind": "bif-scores",
        "block": {"index": block.index, "start": block.start, "stop": block.stop},
        "units": unit_digests,
        "query": queries.digests,
        "settings": job.settings(),
    }


def shard_problem(path: Any, current: dict[str, Any]) -> str:
    """Why a BIF shard is not current ("" when it is; "missing")."""
    if not path.exists():
        return "missing"
    try:
        meta = read_bif_meta(path, "bif-scores")
    except SDIError as err:
        return str(err)
    recorded = meta.get("depends")
    return explain_stale(recorded if isinstance(recorded, dict) else {}, current)


def bif_work(ctx: JobContext, rank: int, world_size: int, wandb_log: WandbLogger) -> int:
    """Complete this rank's blocks (``blocks[rank::world_size]``)."""
    job = BifJob(ctx)
    train = build.build_dataset(ctx.cfg, "train")
    ctx.run.check_train_size(len(train))
    queries = load_queries(job)
    mine = rank_blocks(run_blocks(ctx.cfg, len(train)), rank, world_size)
    log.info(
        "rank %d/%d on %s (%s): %d blocks x %d checkpoints x %d chains",
        rank, world_size, socket.gethostname(), ctx.device, len(mine), len(ctx.checkpoints),
        job.sgld.num_chains,
    )  # fmt: skip
    code = until_done(
        ctx, mine, lambda block: _attempt(job, train, queries, block, rank, world_size, wandb_log)
    )
    if code:
        return code
    log.info("rank %d/%d: all %d blocks done", rank, world_size, len(mine))
    return 0


def block_state(
    job: BifJob, train: Any, queries: QueryFiles, block: Block
) -> tuple[list[BifUnit], list[dict[str, Any]], list[str]]:
    """The block's units, their current depends, and why each is not done ("" if done)."""
    data_sha = block_digest(train, block.start, block.stop)
    units = block_units(block, len(job.ctx.checkpoints), job.sgld.num_chains)
    currents = [unit_depends(queries.meta[u.ckpt], u, data_sha) for u in units]
    whys = [unit_problem(job.ctx.run, u.name, c) for u, c in zip(units, currents, strict=True)]
    return units, currents, whys


def _attempt(
    job: BifJob,
    train: Any,
    queries: QueryFiles,
    block: Block,
    rank: int,
    world_size: int,
    wandb_log: WandbLogger,
) -> Holder | int:
    ctx, run = job.ctx, job.ctx.run
    lease = acquire(run.lease_path(bif_block_name(block.index)), f"worker-{rank:04d}",
                    ctx.lease_timeout, log=log)  # fmt: skip
    if isinstance(lease, Holder):
        return lease
    in_flight = ""
    try:
        with lease:
            units, currents, whys = block_state(job, train, queries, block)
            for unit, current, why in zip(units, currents, whys, strict=True):
                if not why:
                    continue
                if why != "missing":
                    log.warning("stale: %s: %s; recomputing", unit.name, why)
                if ctx.stop.is_set():
                    return EXIT_INTERRUPTED
                in_flight = unit.name
                stats = record_unit(job, train, queries, unit, current, rank, world_size)
                wandb_log.log_unit(stats)
            in_flight = ""
            score_block_units(job, queries, block, units)
    except SDIError:
        raise
    except Exception as err:
        what = f"unit {in_flight}" if in_flight else f"scoring {bif_block_name(block.index)}"
        raise as_job_error(err, what, f"worker-{rank:04d}") from err
    return EXIT_INTERRUPTED if ctx.stop.is_set() else 0


def record_unit(
    job: BifJob,
    train: Any,
    queries: QueryFiles,
    unit: BifUnit,
    current: dict[str, Any],
    rank: int,
    world_size: int,
) -> dict[str, Any]:
    """Replay the unit's chain, record its block's losses at every draw, write its file
    and then its marker. Refuses a replay whose minibatch losses differ from the query job's."""
    ctx, run, block = job.ctx, job.ctx.run, unit.block
    started = time.perf_counter()
    ctx.use_checkpoint(unit.ckpt)
    run.marker_path_named(unit.name).unlink(missing_ok=True)
    recorder = LossRecorder(
        job.batches(train, block.start, block.stop), ctx.loss, 1, job.sgld.num_draws
    )
    init = float(queries.meta[unit.ckpt]["init_loss"])
    stats = job.record_chain(train, unit.chain, {"loss": recorder}, init)
    expected = queries.step_losses[unit.ckpt][unit.chain]
    if not torch.equal(stats.step_losses, expected):
        step = int((stats.step_losses != expected).nonzero()[0, 0])
        raise DataError(
            f"the replay of chain {unit.chain} at checkpoint {unit.ckpt} differs from the query "
            f"job's from step {step} on (minibatch loss {float(stats.step_losses[step]):.9g} vs "
            f"{float(expected[step]):.9g}): BIF needs chains that replay exactly -- the same "
            "device type for every job, deterministic kernels, unchanged training data; rerun "
            "the query job and workers on one kind of device"
        )
    assert recorder.traces is not None
    digest = record_digest(current)
    path = run.unit_path_named(unit.name)
    write_bif_file(
        path,
        "bif-train",
        {"traces/loss": recorder.traces.numpy()},
        {"depends": current, "content_digest": digest},
    )
    seconds = time.perf_counter() - started
    marker = {
        "unit": unit.name,
        "examples": block.stop - block.start,
        "rank": rank,
        "world_size": world_size,
        "host": socket.gethostname(),
        "content_digest": digest,
        "file_size": path.stat().st_size,
        "seconds": round(seconds, 4),
        "examples_per_s": round((block.stop - block.start) / max(seconds, 1e-9), 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    write_json_atomic(run.marker_path_named(unit.name), marker)
    log.info("done %s in %.2fs", unit.name, seconds)
    return marker


def score_block_units(
    job: BifJob,
    queries: QueryFiles,
    block: Block,
    units: list[BifUnit],
) -> None:
    """Score a block whose units are all done against the query traces (unless its shard
    is current) and write its shard."""
    run = job.ctx.run
    digests = [str((run.read_marker(u.name) or {}).get("content_digest")) for u in units]
    depends = shard_depends(job, block, digests, queries)
    path = run.bif_shard_path(block.index)
    if not shard_problem(path, depends):
        return
    n_ckpt, n_chains = len(job.ctx.checkpoints), job.sgld.num_chains
    per_ckpt = []
    for k in range(n_ckpt):
        chains = [
            torch.from_numpy(
                read_bif_file(run.unit_path_named(u.name), "bif-train").arrays["traces/loss"]
            )
            for u in units[k * n_chains : (k + 1) * n_chains]
        ]
        per_ckpt.append(torch.cat(chains))  # (C, D, n, K)
    rows = score_traces(per_ckpt, queries.traces, job.settings(), block.start)
    arrays = rows | block_topk(rows["bif"], block.start, int(job.cfg.merge.topk))
    # No rank in the shard: it is the same bytes whichever worker (or the merge) wrote it.
    meta = {"depends": depends, "content_digest": record_digest(depends)}
    write_bif_file(path, "bif-scores", arrays, meta)
    log.info("scored %s", bif_block_name(block.index))


def bif_block_done(run: RunDir, block: Block, n_ckpt: int, n_chains: int) -> bool:
    """Cheap check (markers, the shard's presence) for the launchers' progress bar."""
    units = block_units(block, n_ckpt, n_chains)
    return run.bif_shard_path(block.index).exists() and all(
        run.marker_path_named(u.name).exists() for u in units
    )
