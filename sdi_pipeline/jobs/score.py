"""The score job (``sdi-score``): score this rank's blocks from stored train sketches
against the run's query sketches, the re-scoring array. It never sketches."""

from __future__ import annotations

import socket
from pathlib import Path

from sdi_pipeline.errors import ConfigError
from sdi_pipeline.inputs import build
from sdi_pipeline.jobs.context import JobContext, ranked_job
from sdi_pipeline.jobs.logs import log
from sdi_pipeline.jobs.worker import Share, complete_blocks
from sdi_pipeline.report.wandb_log import WandbLogger
from sdi_pipeline.run.rundir import rank_blocks, run_blocks


def run_score(run_dir: str | Path, rank: int, world_size: int) -> int:
    """Score this rank's blocks (``blocks[rank::world_size]``) from stored train sketches
    against the run's query sketches: ``sdi-score``, the re-scoring array. Never sketches.

    Returns 0 when all its blocks are scored, EXIT_INTERRUPTED when stopped by a signal.
    """
    return ranked_job(run_dir, rank, world_size, "score", _score)


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
    return complete_blocks(
        Share(ctx, train, rank, world_size, wandb_log, scoring, sketch=False), mine
    )
