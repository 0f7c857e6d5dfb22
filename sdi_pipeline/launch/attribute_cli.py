"""``sdi-attribute``: compose the config, check it, create the run, launch the jobs.

    sdi-attribute [--config-dir DIR]... [--cfg] [key=value | group=option]...

Everything that can be checked is checked before anything runs or is submitted: the config
schema, checkpoint files, that each checkpoint fits the model, that the target patterns
match modules, every training and query example (readable, token ids inside the model's
vocabulary, not longer than the model takes, the same each time it is read), and one real
forward/backward of a query batch through the loss. It prints the loss (and which config
group or override set it), each checkpoint's eta (and where it was read) and what the
calls showed (loop steps, prelude, readout).

While it runs the jobs, ``sdi-attribute`` holds the run's launcher lock: a second launch of
the same config is told who is running it instead of starting duplicate workers. Before
launching, units and query files whose inputs changed (checkpoint rewritten, examples
changed) lose their markers, so every launcher recomputes exactly them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sdi_pipeline.errors import ConfigError, RunDirError, SDIError
from sdi_pipeline.inputs import build
from sdi_pipeline.inputs.checkpoints import resolve_checkpoint_paths
from sdi_pipeline.launch.cli import guarded


@dataclass
class Preflight:
    """What the checks found: the job context, and the digests of the data as it is now."""

    ctx: Any  # jobs.JobContext
    n_train: int
    train_blocks: list[str]
    query_sha: str


def preflight(cfg: DictConfig) -> Preflight:
    """Build everything a job builds, read every example, sketch one query batch."""
    from sdi_pipeline.inputs.content import scan_dataset, token_limits
    from sdi_pipeline.jobs.context import JobContext

    ctx = JobContext(cfg)
    train = build.build_dataset(cfg, "train")
    query = build.build_dataset(cfg, "query")
    limits = token_limits(ctx.model)
    progress = bool(cfg.runtime.progress)
    train_scan = scan_dataset(train, "train", limits, int(cfg.data.block_size), progress=progress)
    query_scan = scan_dataset(query, "query", limits, len(query), progress=progress)
    for k in range(len(ctx.checkpoints)):
        info = ctx.use_checkpoint(k)
        print(f"[sdi] checkpoint {k}: {info.path}, eta {info.eta:.6g} from {info.eta_source}")
    ctx.progress = False
    if cfg.method == "bif":
        _preflight_bif(ctx, train, query)
        return Preflight(ctx, len(train), train_scan.block_digests, query_scan.block_digests[0])
    try:
        batch = min(len(query), int(cfg.data.batch_size))
        feats, _ = ctx.sketch(query, 0, batch, "preflight", "query")
    except SDIError:
        raise
    except Exception as err:  # the user's model, loss or collate failing on real data
        first = " ".join(str(err).split())[:300]
        raise ConfigError(
            f"one forward/backward of the first query batch failed ({type(err).__name__}: "
            f"{first}): check the model, analysis.loss and data.collate against the data"
        ) from err
    print(f"[sdi] targets: {ctx.featurizer.assignment}", flush=True)
    if feats.tokens is not None:
        _check_token_size(cfg, len(query), feats.tokens.shape)
    if ctx.loop_trace is not None:
        trace = ctx.trace(query, feats.layout.loop_steps, stop=len(feats))
        print(
            f"[sdi] loop trace: answer-token states (d={trace.states.shape[2]}) and logit "
            f"margins after each of {trace.margins.shape[1]} loop steps",
            flush=True,
        )
    return Preflight(ctx, len(train), train_scan.block_digests, query_scan.block_digests[0])


def _preflight_bif(ctx: Any, train: Any, query: Any) -> None:
    """What method=bif can refuse before any chain runs: the sampler settings, the SGLD
    minibatch against the training set, the loss's shape on real data, the output size."""
    from sdi_pipeline.engine.sgld import initial_loss
    from sdi_pipeline.jobs.bif_context import BifJob

    cfg = ctx.cfg
    job = BifJob(ctx)  # SGLDConfig.check: one line per bad setting
    sgld = job.sgld
    if sgld.batch_size > len(train):
        raise ConfigError(
            f"bif.batch_size={sgld.batch_size} is larger than the {len(train)} training examples "
            f"the chains sample from: use bif.batch_size <= {len(train)}"
        )
    samples = sgld.num_draws * (sgld.num_chains if cfg.bif.chain_reduction == "stack" else 1)
    try:
        batch = job.batches(query, 0, min(len(query), int(cfg.data.batch_size)))[0]
        loss = ctx.loss(ctx.model, batch)
        init = initial_loss(ctx.model, train, ctx.loss, sgld, job.collate)
        loop_fn = job.loop_fn()
        loop = None if loop_fn is None else loop_fn(ctx.model, batch)
    except SDIError:
        raise
    except Exception as err:  # the user's model, loss or collate failing on real data
        first = " ".join(str(err).split())[:300]
        raise ConfigError(
            f"the loss of the first query batch failed ({type(err).__name__}: {first}): check "
            "the model, analysis.loss and data.collate against the data"
        ) from err
    if not isinstance(loss, torch.Tensor) or loss.dim() not in (1, 2):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ConfigError(
            f"analysis.loss must return per-example (B,) or per-token (B, T) losses, got {shape}"
        )
    tokens = loss.shape[1] if loss.dim() == 2 else 1
    if cfg.bif.correlation == "token" and tokens == 1:
        raise ConfigError(
            "bif.correlation=token pairs train and query tokens: analysis.loss must return "
            "per-token losses (B, T) (e.g. per_token: true), or use bif.correlation=sequence"
        )
    steps = 0 if loop is None else int(loop.shape[1])
    per_row = 1 + len(ctx.checkpoints)
    per_row += tokens if (tokens > 1 and cfg.bif.query_tokens) else 0
    per_row += steps + (tokens * tokens if cfg.bif.correlation == "token" else 0)
    size = len(train) * len(query) * per_row * 4 / 2**30
    print(
        f"[sdi] BIF: {sgld.num_chains} chains x {sgld.num_draws} draws ({sgld.num_steps} SGLD "
        f"steps each, n_beta={sgld.n_beta:.4g}) = {samples} samples per trace; loss at "
        f"checkpoint 0: {init:.4g}; {tokens} position(s) per query"
        + (f", {steps} loop steps" if steps else "")
        + f"; BIF datasets {len(train)} x {len(query)} x {per_row} = {size:.3g} GiB",
        flush=True,
    )
    if size > float(cfg.bif.max_gb):
        raise ConfigError(
            f"the BIF datasets would take {size:.3g} GiB > bif.max_gb={cfg.bif.max_gb}: use "
            "bif.correlation=sequence, bif.query_tokens=false, fewer queries, or raise the limit"
        )


def _check_token_size(cfg: DictConfig, n_query: int, shape: tuple[int, ...]) -> None:
    """Refuse per-token query sketches larger than analysis.query_tokens_max_gb."""
    _, slots, n_tokens, width = shape
    itemsize = 2 if cfg.sketch.dtype == "float16" else 4
    size = n_query * slots * n_tokens * width * itemsize * len(cfg.checkpoints.paths) / 2**30
    print(
        f"[sdi] per-token query sketches: {n_query} queries x {slots} slots x {n_tokens} tokens "
        f"x m={width} x {len(cfg.checkpoints.paths)} checkpoints = {size:.2f} GiB",
        flush=True,
    )
    if size > float(cfg.analysis.query_tokens_max_gb):
        raise ConfigError(
            f"analysis.query_tokens={cfg.analysis.query_tokens} needs {size:.2f} GiB of query "
            f"sketches (> analysis.query_tokens_max_gb={cfg.analysis.query_tokens_max_gb}): "
            "choose 'last' or fewer positions, fewer queries, or raise the limit"
        )


def reconcile(run: Any, pre: Preflight) -> list[str]:
    """Remove the markers of stale or damaged units and stale query files, so that every
    launcher recomputes exactly them; returns what was found."""
    from sdi_pipeline.jobs.context import query_fresh
    from sdi_pipeline.run.freshness import CORRUPT, STALE, check_unit
    from sdi_pipeline.run.rundir import run_units

    ctx = pre.ctx
    ctx.run = run
    ctx.digests.attach(run.digest_cache_path)
    ctx._block_digests = dict(enumerate(pre.train_blocks))
    found = []
    for unit in run_units(ctx.cfg, pre.n_train):
        if not run.marker_path(unit).exists():
            continue
        check = check_unit(run, unit.name, current=ctx.unit_depends(unit, None))
        if check.state in (STALE, CORRUPT):
            run.marker_path(unit).unlink(missing_ok=True)
            found.append(f"{unit.name}: {check.why}")
    for k in range(len(ctx.checkpoints)):
        path = run.query_path(k)
        fresh, why = query_fresh(path, ctx.query_depends(k, pre.query_sha))
        if path.exists() and not fresh:
            path.unlink(missing_ok=True)
            found.append(f"{path.name}: {why}")
    return found


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sdi-attribute",
        description="Step-Decomposed Influence for a looped transformer: compose the config "
        "from conf/ (Hydra overrides as arguments) and run or submit the jobs.",
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. launcher=slurm sketch.m=4096"
    )
    parser.add_argument("--config-dir", action="append", default=[], help="extra config groups")
    parser.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    args = parser.parse_args(argv)

    from sdi_pipeline.launch.compose import compose_config, describe_loss, loss_origin
    from sdi_pipeline.launch.launchers import LAUNCHERS
    from sdi_pipeline.run.leases import Holder, acquire
    from sdi_pipeline.run.rundir import RunDir, prepare_run, run_path

    cfg = compose_config(args.overrides, args.config_dir)
    if args.cfg:
        print(OmegaConf.to_yaml(cfg))
        return 0
    build.use_python_path(cfg)
    loss = (
        f"{describe_loss(cfg.analysis.loss)} (from {loss_origin(args.overrides, args.config_dir)})"
    )
    print(f"[sdi] loss: {loss}", flush=True)
    if cfg.checkpoints.prepare is not None:
        build.instantiate_node(cfg.checkpoints.prepare, "checkpoints.prepare")
    cfg.checkpoints.paths = resolve_checkpoint_paths(cfg.checkpoints.paths)
    pre = preflight(cfg)
    path = run_path(cfg)
    lock = acquire(
        RunDir(path).launcher_lock_path, "sdi-attribute", float(cfg.runtime.lease_timeout_s)
    )
    if isinstance(lock, Holder):
        pid = lock.record.get("pid")
        raise RunDirError(
            f"run {path} is already being run by {lock.describe()}: wait for it to "
            f"finish (sdi-status run_dir={path} shows its progress), or stop it (kill {pid} on "
            f"{lock.record.get('host', 'its host')}) and run the same command again; a lock "
            f"not refreshed for runtime.lease_timeout_s={cfg.runtime.lease_timeout_s:g}s is "
            "taken over"
        )
    with lock:
        run_dir = prepare_run(cfg)
        run_dir.record_train_size(pre.n_train)
        print(f"[sdi] run dir {run_dir.path} ({pre.n_train} training examples)", flush=True)
        # BIF units and query traces are checked by the jobs themselves.
        found = reconcile(run_dir, pre) if cfg.method == "sdi" else []
        if found:
            print(
                f"[sdi] {len(found)} file(s) no longer match their inputs and will be recomputed"
                f" (stale: {found[0]}{' ...' if len(found) > 1 else ''})",
                flush=True,
            )
        launcher = LAUNCHERS[cfg.launcher.name]
        code = launcher.launch(run_dir, run_dir.load_config(), pre.n_train)
    # A launcher that submits returns before the merge: the same command run after the
    # merge prints the summary.
    if code == 0 and launcher.runs_jobs and run_dir.results_path.exists():
        from sdi_pipeline.formats.results import stale_reasons
        from sdi_pipeline.report.summary import print_summary

        if not stale_reasons(run_dir.results_path):
            print_summary(run_dir, loss)
    return code


main = guarded(run)
