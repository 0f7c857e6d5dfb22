"""``sdi-attribute``: compose the config, check it, create the run, launch the jobs.

    sdi-attribute [--config-dir DIR]... [--cfg] [key=value | group=option]...

Everything that can be checked is checked before anything runs or is submitted: the config
schema, checkpoint files, that each checkpoint fits the model, that the target patterns
match modules, every training and query example (readable, token ids inside the model's
vocabulary, not longer than the model takes, the same each time it is read), every batch the
jobs will form (through data.collate and the loss's checks of its inputs, e.g. a target
position in each example), and one real forward/backward of a query batch through the loss.
It prints the loss (and which config group or override set it), each checkpoint's eta (and
where it was read) and what the calls showed (loop steps, prelude, readout).

While it runs the jobs, ``sdi-attribute`` holds the run's launcher lock: a second launch of
the same config is told who is running it instead of starting duplicate workers. Before
launching, units and query files whose inputs changed (checkpoint rewritten, examples
changed) lose their markers, so every launcher recomputes exactly them.

A run with nothing left to do (:func:`up_to_date`: every unit, query file and score shard
records the inputs read now, and results.h5 is current) starts no job and writes nothing:
the summary is printed again (the forward/backward check is skipped: nothing will run).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
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


def preflight(cfg: DictConfig, digests: Path | None = None) -> Preflight:
    """Build everything a job builds, read every example and every checkpoint (each
    checkpoint's eta printed); :func:`check_calls` then sketches one query batch.

    ``digests``: an existing run's checkpoint digest cache, so that unchanged checkpoints
    are not hashed again."""
    from sdi_pipeline.inputs.content import scan_dataset, token_limits
    from sdi_pipeline.jobs.context import JobContext

    ctx = JobContext(cfg)
    if digests is not None and digests.is_file():
        ctx.digests.attach(digests)
    train = build.build_dataset(cfg, "train")
    query = build.build_dataset(cfg, "query")
    limits = token_limits(ctx.model)
    # Every batch the jobs will form, collated and checked as the loss will check it.
    check, batch_size = ctx.batch_check(), int(cfg.data.batch_size)
    progress = bool(cfg.runtime.progress)
    train_scan = scan_dataset(
        train, "train", limits, int(cfg.data.block_size),
        check=check, batch_size=batch_size, progress=progress,
    )  # fmt: skip
    query_scan = scan_dataset(
        query, "query", limits, len(query), check=check, batch_size=batch_size, progress=progress
    )
    for k in range(len(ctx.checkpoints)):
        info = ctx.use_checkpoint(k)
        print(f"[sdi] checkpoint {k}: {info.path}, eta {info.eta:.6g} from {info.eta_source}")
    return Preflight(ctx, len(train), train_scan.block_digests, query_scan.block_digests[0])


def check_calls(cfg: DictConfig, pre: Preflight) -> None:
    """One real forward/backward of the first query batch through the loss (and the loop
    trace): what the calls show (loop steps, prelude, readout) is printed."""
    ctx = pre.ctx
    query = build.build_dataset(cfg, "query")
    ctx.progress = False
    if cfg.method == "bif":
        _preflight_bif(ctx, build.build_dataset(cfg, "train"), query)
        return
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


def up_to_date(path: Path, cfg: DictConfig, pre: Preflight) -> str | None:
    """What a finished run at ``path`` holds, when nothing would change if it ran again
    (None otherwise). Reads only headers, markers and the digests the preflight computed,
    and writes nothing: results.h5 is current (its shards, units, query files and
    checkpoints as at the merge, the same config hash), and every unit, query file and
    score shard records the inputs the preflight found now (checkpoint sha256, the digests
    of the training blocks and the queries, sketch spec, targets, parameters)."""
    from sdi_pipeline.formats.results import stale_reasons
    from sdi_pipeline.formats.shards import read_shard_summary
    from sdi_pipeline.jobs.context import query_fresh
    from sdi_pipeline.run.config import config_hash
    from sdi_pipeline.run.freshness import DONE, check_unit, explain_stale, query_digests
    from sdi_pipeline.run.rundir import RunDir, run_blocks

    if cfg.method != "sdi":
        return None  # BIF units and traces are checked by its jobs, which skip what is done
    run = RunDir(path)
    ctx = pre.ctx
    try:
        if (
            not run.results_path.is_file()
            or run.hash_path.read_text().strip() != config_hash(cfg)
            or json.loads(run.train_size_path.read_text()).get("n_train") != pre.n_train
            or stale_reasons(run.results_path)
        ):
            return None
        ctx.run = run
        ctx.digests.attach(run.digest_cache_path)
        ctx._block_digests = dict(enumerate(pre.train_blocks))
        n_ckpt = len(ctx.checkpoints)
        queries = query_digests(run, n_ckpt)
        if queries is None or not all(
            query_fresh(run.query_path(k), ctx.query_depends(k, pre.query_sha))[0]
            for k in range(n_ckpt)
        ):
            return None
        for block in run_blocks(ctx.cfg, pre.n_train):
            currents = [ctx.unit_depends(unit, None) for unit in block.units]
            if ctx.store_train and any(
                check_unit(run, u.name, current=c).state != DONE
                for u, c in zip(block.units, currents, strict=True)
            ):
                return None
            # The summary, as the merge reads it: top-k and sums verified, not only the header.
            depends = read_shard_summary(run.shard_path(block.index)).meta.get("depends")
            if not isinstance(depends, dict):
                return None
            recorded = depends.get("train")
            if (
                not isinstance(recorded, list)
                or len(recorded) != len(currents)
                or depends.get("query") != queries
                or depends.get("block") != {"index": block.index, "start": block.start,
                                            "stop": block.stop}
                or any(explain_stale(r, c) for r, c in zip(recorded, currents, strict=True))
            ):  # fmt: skip
                return None
    except (OSError, ValueError, SDIError):
        return None  # anything unreadable: the jobs look closer, and say what is wrong
    return f"{len(run_blocks(ctx.cfg, pre.n_train))} blocks x {n_ckpt} checkpoints"


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


HELP_TITLE = "options everyone sets (key=VALUE; the default in parentheses):"
HELP_MORE = (
    "Every key: sdi-attribute --cfg prints the composed config; an unknown key lists the valid\n"
    "ones. Your own model: docs/your-model.md."
)


def _show_kernel_build() -> None:
    """Print the native kernel's build notes (its first build takes about half a minute)
    here, where the preflight's sketch builds it; the jobs log them to their own logs."""
    native = logging.getLogger("sdi_pipeline.engine.native")
    if not any(isinstance(h, _Printed) for h in native.handlers):
        native.addHandler(_Printed())
        native.setLevel(logging.INFO)


class _Printed(logging.Handler):
    """``[sdi] message`` on whatever ``sys.stdout`` is when a record comes."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"[sdi] {record.getMessage()}", flush=True)


def run(argv: list[str]) -> int:
    from sdi_pipeline.launch.usage import common_options

    parser = argparse.ArgumentParser(
        prog="sdi-attribute",
        description="Step-Decomposed Influence for a looped transformer: compose the config "
        "from conf/ (Hydra overrides as arguments) and run or submit the jobs.",
        epilog=f"{HELP_TITLE}\n{common_options()}\n\n{HELP_MORE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    _show_kernel_build()
    loss = (
        f"{describe_loss(cfg.analysis.loss)} (from {loss_origin(args.overrides, args.config_dir)})"
    )
    print(f"[sdi] loss: {loss}", flush=True)
    if cfg.checkpoints.prepare is not None:
        build.instantiate_node(cfg.checkpoints.prepare, "checkpoints.prepare")
    cfg.checkpoints.paths = resolve_checkpoint_paths(cfg.checkpoints.paths)
    path = run_path(cfg)
    pre = preflight(cfg, RunDir(path).digest_cache_path)
    launcher = LAUNCHERS[cfg.launcher.name]
    # A rerun with nothing to do starts no job and rewrites nothing: the checks above read
    # every example and checkpoint digest, so "up to date" means the same inputs.
    held = up_to_date(path, cfg, pre) if launcher.runs_jobs else None
    if held is not None:
        print(f"[sdi] run dir {path}: up to date ({held}), nothing to run", flush=True)
        _summarise(RunDir(path), loss)
        return 0
    check_calls(cfg, pre)
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
        code = launcher.launch(run_dir, run_dir.load_config(), pre.n_train)
    # A launcher that submits returns before the merge: the same command run after the
    # merge prints the summary.
    if code == 0 and launcher.runs_jobs and run_dir.results_path.exists():
        _summarise(run_dir, loss)
    return code


def _summarise(run_dir: Any, loss: str) -> None:
    """Print the summary of a merged run whose results.h5 is current."""
    from sdi_pipeline.formats.results import stale_reasons
    from sdi_pipeline.report.summary import print_summary

    if not stale_reasons(run_dir.results_path):
        print_summary(run_dir, loss)


main = guarded(run)
