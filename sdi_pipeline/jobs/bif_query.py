"""The BIF query job (``sdi-query`` with method=bif): run every SGLD chain at every
checkpoint once, recording the queries' loss traces (and per loop step with
``analysis.loop_trace``), the chains' minibatch losses and the LLC."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from sdi_pipeline.engine.sgld import LossRecorder, RecordFn, initial_loss
from sdi_pipeline.errors import DataError, SDIError
from sdi_pipeline.files.digests import record_digest
from sdi_pipeline.formats.traces import BIF_FORMAT_VERSION, read_bif_file, write_bif_file
from sdi_pipeline.inputs import build
from sdi_pipeline.inputs.content import block_digest
from sdi_pipeline.jobs.bif_context import BifJob
from sdi_pipeline.jobs.context import EXIT_INTERRUPTED, JobContext, until_done
from sdi_pipeline.jobs.logs import as_job_error, log
from sdi_pipeline.report.wandb_log import WandbLogger
from sdi_pipeline.run.freshness import explain_stale
from sdi_pipeline.run.layout import bif_query_name
from sdi_pipeline.run.leases import Holder, acquire


def query_depends(job: BifJob, k: int, train_sha: str, query_sha: str) -> dict[str, Any]:
    """What checkpoint k's query traces depend on now."""
    return {
        "format_version": BIF_FORMAT_VERSION,
        "kind": "bif-query",
        "chain": job.chain_record(job.ctx.checkpoint_sha(k), train_sha),
        "query_sha256": query_sha,
        "loop_trace": job.ctx.loop_trace is not None,
        "config_hash": job.ctx.hash,
    }


def query_problem(path: Any, current: dict[str, Any]) -> str:
    """Why the query traces at ``path`` are not current ("" when they are; "missing")."""
    if not path.exists():
        return "missing"
    try:
        file = read_bif_file(path, "bif-query")
    except SDIError as err:
        return str(getattr(err, "what", err))
    recorded = file.meta.get("depends")
    why = explain_stale(recorded if isinstance(recorded, dict) else {}, current)
    if not why and file.meta.get("content_digest") != record_digest(current):
        why = "its content digest does not match its record"
    return why


def bif_query(ctx: JobContext, wandb_log: WandbLogger) -> int:
    """Record the query traces of every checkpoint (skipping current files)."""
    job = BifJob(ctx)
    train = build.build_dataset(ctx.cfg, "train")
    ctx.run.check_train_size(len(train))
    query = build.build_dataset(ctx.cfg, "query")
    log.info("hashing the %d training examples the chains sample from", len(train))
    train_sha = block_digest(train, 0, len(train))
    query_sha = block_digest(query, 0, len(query), "query")

    def attempt(k: int) -> Holder | int:
        path = ctx.run.bif_query_path(k)
        current = query_depends(job, k, train_sha, query_sha)
        why = query_problem(path, current)
        if not why:
            log.info("query traces for checkpoint %d exist: %s", k, path)
            return 0
        if why != "missing":
            log.warning("stale: %s: %s; recomputing", path.name, why)
        lease = acquire(ctx.run.lease_path(bif_query_name(k)), "query", ctx.lease_timeout, log=log)
        if isinstance(lease, Holder):
            log.info("query traces of checkpoint %d: %s has them", k, lease.describe())
            return lease
        with lease:
            try:
                if query_problem(path, current):
                    _record(job, train, query, k, current, wandb_log)
            except SDIError:
                raise
            except Exception as err:
                raise as_job_error(err, f"the query traces of checkpoint {k}", "query") from err
        return EXIT_INTERRUPTED if ctx.stop.is_set() else 0

    return until_done(ctx, list(range(len(ctx.checkpoints))), attempt)


def _record(
    job: BifJob, train: Any, query: Any, k: int, current: dict[str, Any], wandb_log: WandbLogger
) -> None:
    ctx, sgld = job.ctx, job.sgld
    started = time.perf_counter()
    info = ctx.use_checkpoint(k)
    if info.sha256 != current["chain"]["checkpoint_sha256"]:
        raise DataError(f"checkpoint {k} changed while it was read: run the command again")
    init = initial_loss(ctx.model, train, ctx.loss, sgld, job.collate)
    batches = job.batches(query, 0, len(query))
    fns: dict[str, RecordFn] = {"loss": ctx.loss}
    loop = job.loop_fn()
    if loop is not None:
        fns["loop"] = loop
    traces: dict[str, list[torch.Tensor]] = {name: [] for name in fns}
    step_losses, seeds = [], []
    for chain in range(sgld.num_chains):
        recorders = {name: LossRecorder(batches, fn, 1, sgld.num_draws) for name, fn in fns.items()}
        stats = job.record_chain(train, chain, recorders, init)
        for name, recorder in recorders.items():
            assert recorder.traces is not None  # num_draws >= 1: every draw recorded
            traces[name].append(recorder.traces[0])
        step_losses.append(stats.step_losses)
        seeds.append(stats.seed)
        log.info("checkpoint %d: chain %d/%d sampled", k, chain + 1, sgld.num_chains)
    losses = torch.stack(step_losses)
    llc = sgld.n_beta * (losses.mean(dim=1) - init)
    arrays: dict[str, np.ndarray] = {
        f"traces/{name}": torch.stack(parts).numpy() for name, parts in traces.items()
    }
    arrays |= {"step_losses": losses.numpy(), "llc": llc.numpy()}
    meta = {
        "init_loss": init,
        "chain_seeds": seeds,
        "eta": info.eta,
        "checkpoint": info.as_meta(),
        "depends": current,
        "content_digest": record_digest(current),
        "config_hash": ctx.hash,
    }
    path = ctx.run.bif_query_path(k)
    write_bif_file(path, "bif-query", arrays, meta)
    seconds = time.perf_counter() - started
    log.info(
        "wrote %s: %d queries x %d chains x %d draws; LLC %.4g +- %.2g (%.1fs)",
        path, len(query), sgld.num_chains, sgld.num_draws, float(llc.mean()),
        float(llc.std(correction=0)), seconds,
    )  # fmt: skip
    wandb_log.log({"bif/query_checkpoint": k, "bif/llc": float(llc.mean()), "bif/seconds": seconds})
