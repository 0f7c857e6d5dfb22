"""The query job (``sdi-query``): sketch the query set at every checkpoint, once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from sdi_pipeline.errors import DataError, SDIError
from sdi_pipeline.files.digests import record_digest
from sdi_pipeline.formats.sketches import (
    write_sketch_file,
)
from sdi_pipeline.inputs import build
from sdi_pipeline.inputs.content import block_digest
from sdi_pipeline.jobs.bif_query import bif_query
from sdi_pipeline.jobs.context import (
    EXIT_INTERRUPTED,
    Interrupted,
    JobContext,
    query_fresh,
    start_job,
    until_done,
)
from sdi_pipeline.jobs.logs import as_job_error, log
from sdi_pipeline.report.wandb_log import WandbLogger
from sdi_pipeline.run.layout import query_lease_name
from sdi_pipeline.run.leases import Holder, acquire


def run_query(run_dir: str | Path) -> int:
    """Sketch the query set at every checkpoint (skipping files that are up to date)."""
    start_job(run_dir, "query")
    ctx = JobContext.open(run_dir)
    with ctx.signals_stop(), WandbLogger(ctx.cfg, ctx.run, "query", "query") as wandb_log:
        if ctx.cfg.method == "bif":
            return bif_query(ctx, wandb_log)
        return _query(ctx, wandb_log)


def _query(ctx: JobContext, wandb_log: WandbLogger) -> int:
    query = build.build_dataset(ctx.cfg, "query")
    query_sha = block_digest(query, 0, len(query), "query")

    def attempt(k: int) -> Holder | int:
        outcome = _query_checkpoint(ctx, query, query_sha, k, wandb_log)
        if isinstance(outcome, Holder):
            log.info(
                "query sketches of checkpoint %d are being computed by %s: waiting",
                k,
                outcome.describe(),
            )
        return outcome

    return until_done(ctx, list(range(len(ctx.checkpoints))), attempt)


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
