"""``sdi-attribute``: compose the config, check it, create the run, launch the jobs.

    sdi-attribute [--config-dir DIR]... [--cfg] [key=value | group=option]...

Everything that can be checked is checked before anything runs or is submitted: the config
schema, checkpoint files, that each checkpoint fits the model, that the target patterns
match modules, and one real forward/backward of a query batch through the loss. It prints
the loss (and which config group or override set it) and each checkpoint's eta (and where
it was read).
"""

from __future__ import annotations

import argparse

from omegaconf import DictConfig, OmegaConf

from sdi_pipeline import build
from sdi_pipeline.checkpoints import resolve_checkpoint_paths
from sdi_pipeline.cli import guarded
from sdi_pipeline.errors import ConfigError


def preflight(cfg: DictConfig) -> int:
    """Build everything a job builds and sketch one query batch; returns N_train."""
    from sdi_pipeline.jobs import JobContext

    ctx = JobContext(cfg)
    train = build.build_dataset(cfg, "train")
    query = build.build_dataset(cfg, "query")
    for k in range(len(ctx.checkpoints)):
        info = ctx.use_checkpoint(k)
        print(f"[sdi] checkpoint {k}: {info.path}, eta {info.eta:.6g} from {info.eta_source}")
    ctx.progress = False
    feats = ctx.sketch(query, 0, min(len(query), int(cfg.data.batch_size)), "preflight", True)
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
    return len(train)


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

    from sdi_pipeline.compose import compose_config, describe_loss, loss_origin
    from sdi_pipeline.launchers import LAUNCHERS
    from sdi_pipeline.rundir import prepare_run

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
    n_train = preflight(cfg)
    run_dir = prepare_run(cfg)
    run_dir.record_train_size(n_train)
    print(f"[sdi] run dir {run_dir.path} ({n_train} training examples)", flush=True)
    launcher = LAUNCHERS[cfg.launcher.name]
    code = launcher.launch(run_dir, run_dir.load_config(), n_train)
    # A launcher that submits returns before the merge: the same command run after the
    # merge prints the summary.
    if code == 0 and launcher.runs_jobs and run_dir.results_path.exists():
        from sdi_pipeline.summary import print_summary

        print_summary(run_dir, loss)
    return code


main = guarded(run)
