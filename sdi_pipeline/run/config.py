"""The attribution config: its schema, validation, and the hash that names a run.

One :class:`AttributionConfig` describes a whole run. The launcher resolves it once and
writes it to the run directory; workers, the query job and the merge read only that file.
Fields that change the attribution (model, checkpoints, data, targets, loss, sketch) enter
the config hash and the run id; where and how jobs run (launcher, W&B, threads) do not.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdi_pipeline.errors import ConfigError, RunDirError
from sdi_pipeline.files.atomic import write_text_atomic
from sdi_pipeline.messages import did_you_mean
from sdi_pipeline.run.launcher_configs import LAUNCHER_SCHEMAS

SCHEMA_VERSION = 1

# Top-level sections that do not change what is computed, only where/how it runs.
NON_ATTRIBUTION_KEYS = ("run", "launcher", "wandb", "runtime")
# Fields inside attribution groups that change what is kept on disk, not the results.
NON_ATTRIBUTION_FIELDS = (("sketch", "store_train"), ("analysis", "allow_coupled_batch"))
# Fields added after runs were made with their default behaviour: they count in the hash only
# when set, so those runs keep their ids (and their units stay current).
LATER_FIELDS = {("analysis", "loop_entry"): None}
# Fields that change the results but not the train sketches: train units are shared by
# every run whose attribution differs only in these.
QUERY_SIDE_KEYS = (("data", "query"), ("merge",), ("analysis", "query_tokens"),
                   ("analysis", "query_tokens_max_gb"), ("analysis", "loop_trace"))  # fmt: skip


@dataclass
class RunConfig:
    """Where the run lives: ``<root>/<name>/<id>``; ``id`` defaults to the config hash.

    ``name`` null: ``sdi-attribute`` names the run after the model (see
    :func:`sdi_pipeline.launch.compose.run_name`); a config built otherwise gets ``run``."""

    name: str | None = field(
        default=None,
        metadata={"help": "the run's folder under run.root: the model group's name by default"},
    )
    root: str = "runs"
    id: str | None = None


@dataclass
class CheckpointsConfig:
    """Checkpoints (files or directories, paths or globs, in order) and their TracIn weights."""

    paths: list[str] = field(
        default_factory=list,
        metadata={"help": "checkpoint files or folders, in order; globs sort checkpoint-900 "
                          "before checkpoint-1000"},
    )  # fmt: skip
    # Optional node called once by the launcher before the paths are resolved (e.g. to
    # train the toy model's checkpoints if they do not exist yet).
    prepare: Any = None
    # One eta per resolved checkpoint; null reads each from the checkpoint (a Trainer
    # checkpoint's logged learning rate, else the optimizer's lr, else 1).
    etas: list[float] | None = field(
        default=None,
        metadata={"help": "eta per checkpoint; null: a Trainer's logged learning rate, else the "
                          "optimizer's, else 1"},
    )  # fmt: skip
    # Allow full unpickling (torch.load weights_only=False): only for files you trust.
    trust: bool = False


@dataclass
class DataConfig:
    """Train and query datasets (Hydra ``_target_`` nodes that build a torch Dataset)."""

    train: Any = None
    query: Any = None
    batch_size: int = 32
    # Optional collate_fn node (e.g. padding variable-length token sequences); null: default.
    collate: Any = None
    # Training examples per work unit: the granularity of resume and of the merge's memory.
    block_size: int = 256


@dataclass
class SketchConfig:
    """The sketch: size, seed, Linear kernel, stored precision, and train-side steps."""

    m: int = field(
        default=1024,
        metadata={"help": "sketch size: 4*m bytes per example and loop step; error ~ 1/sqrt(m)"},
    )
    seed: int = 0
    kernel: str = "auto"
    dtype: str = "float32"
    # full: keep per-step train sketches (all outputs); summed: one vector (no step matrix).
    train_steps: str = "full"
    # Keep the train sketches on disk (units/), so that another query set can re-use them;
    # false: the workers only score them (no train sketch bytes on disk; queries first).
    store_train: bool = True


@dataclass
class AnalysisConfig:
    """What is analysed: the looped modules and the per-example loss."""

    targets: list[str] = field(
        default_factory=lambda: ["block"],
        metadata={"help": "the looped modules (names or globs over named_modules())"},
    )
    expected_steps: int | None = None
    # A callable loss_fn(model, batch) -> (B,) losses, e.g. {_target_: pkg.fn, _partial_: true};
    # or (B, L) per-token losses summing to them, which query_tokens needs.
    loss: Any = None
    # Per-token x per-step SDI for the queries: null (off), "all", "last" (each query's last
    # token with a nonzero loss: the answer) or a list of positions (negative from the end).
    query_tokens: Any = None
    # Refuse query_tokens whose query sketches would take more than this (GiB).
    query_tokens_max_gb: float = 4.0
    # A callable trace(model, batch) -> sdi_pipeline.inputs.dynamics.LoopTrace: each query's answer-
    # token state and logit margin after every loop step (the loop-dynamics figure); null: off.
    loop_trace: Any = None
    # The module (name or glob) whose call opens each loop pass, where the order of calls
    # cannot tell (docs/models.md); null: inferred.
    loop_entry: str | None = None
    # Accept examples whose loss depends on their batch-mates (batch norm, MoE capacity):
    # per-example gradients then depend on the batching. Refused unless true.
    allow_coupled_batch: bool = False


@dataclass
class MergeConfig:
    """What the merge writes."""

    topk: int = 10
    step_matrix: bool = False
    # The full SDI tensor is written only below this size; top-k is always written.
    sdi_max_gb: float = 2.0


@dataclass
class BifConfig:
    """BIF (``method=bif``): SGLD around each checkpoint, loss traces, correlations.

    Names follow devinterp's ``sample()``/``compute_bif`` (see README, "BIF").
    """

    lr: float = 1e-4
    # Inverse temperature n*beta; null: devinterp's default batch_size / log(batch_size).
    n_beta: float | None = None
    chains: int = 4
    draws: int = 50
    burnin: int = 0
    steps_bw_draws: int = 1
    # SGLD minibatch (examples of data.train per step).
    batch_size: int = 32
    localization: float = 0.0
    weight_decay: float = 0.0
    noise_level: float = 1.0
    bounding_box_size: float | None = None
    seed: int = 100
    init_loss_batches: int = 32
    # Torch threads of every BIF job (overrides runtime.threads): CPU sums depend on the
    # thread count, and a chain must replay bit for bit in every worker, at any world size.
    threads: int = 1
    # sequence: (N, M) from position-averaged traces; token: also every (train token, query
    # token) pair (N, M, T, T), refused above max_gb.
    correlation: str = "sequence"
    # stack: the C*D draws of all chains are the samples; mean: the D draws averaged over chains.
    chain_reduction: str = "stack"
    covariance: bool = False
    # BIF per query token (N, M, T) when the loss is per token (B, T): the default view.
    query_tokens: bool = True
    # Refuse a run whose BIF datasets would take more than this (GiB).
    max_gb: float = 2.0


@dataclass
class RuntimeConfig:
    """How a job runs on its machine (not part of the hash)."""

    device: str = "auto"
    # Torch threads; null: a job's CPU allocation under launcher=slurm, else torch's default.
    threads: int | None = None
    progress: bool = True
    # Folders put first on sys.path before building factories, in every job: sdi-attribute
    # records its working directory and --config-dir folders here.
    python_path: list[str] = field(default_factory=list)
    # Seconds a unit's lease may go without a heartbeat (a crashed machine, a frozen job)
    # before another worker takes the unit over. A dead process on the same host is seen
    # at once.
    lease_timeout_s: float = 300.0
    # Checkpoints a job keeps loaded in memory (GiB of checkpoint files): a worker uses
    # every checkpoint once per block; beyond this it reads them again.
    checkpoint_cache_gb: float = 4.0


@dataclass
class WandbConfig:
    """Weights & Biases logging (not part of the hash)."""

    mode: str = "offline"
    project: str = "sdi-pipeline"
    entity: str | None = None


@dataclass
class AttributionConfig:
    """A whole attribution run."""

    model: Any = None
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    sketch: SketchConfig = field(default_factory=SketchConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    run: RunConfig = field(default_factory=RunConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # The schema of one launcher of run.launcher_configs.LAUNCHER_SCHEMAS, chosen by launcher.name
    # (see structured()).
    launcher: Any = None
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # sdi: SDI / TracIn from sketched gradients; bif: Bayesian influence from SGLD loss traces.
    method: str = "sdi"
    bif: BifConfig = field(default_factory=BifConfig)
    schema_version: int = SCHEMA_VERSION


_CHOICES = {
    ("sketch", "kernel"): ("auto", "dense", "fft"),
    ("sketch", "dtype"): ("float32", "float16"),
    ("sketch", "train_steps"): ("full", "summed"),
    ("runtime", "device"): ("auto", "cpu", "cuda"),
    ("wandb", "mode"): ("offline", "online", "disabled"),
    ("bif", "correlation"): ("sequence", "token"),
    ("bif", "chain_reduction"): ("stack", "mean"),
}
# The sections only method=bif reads: in the hash only then, so SDI run ids are unchanged.
BIF_KEYS = ("method", "bif")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_folder_name(key: str, value: Any) -> None:
    """``value`` must be one folder name: no path separators, no '..', no control characters."""
    text = str(value)
    if (
        not text.strip()
        or text in (".", "..")
        or "/" in text
        or "\\" in text
        or os.sep in text
        or _CONTROL.search(text)
    ):
        raise ConfigError(
            f"{key}={text!r} cannot be used: it must be one folder name inside run.root (no '/', "
            f"no '..', no control characters), e.g. {key}=my-experiment"
        )


def validate(cfg: DictConfig) -> None:
    """Check values the schema's types cannot: one clear ConfigError for the first problem."""
    for (section, key), allowed in _CHOICES.items():
        value = cfg[section][key]
        if value not in allowed:
            raise ConfigError(f"{section}.{key}={value!r} is not one of {', '.join(allowed)}")
    if cfg.method not in ("sdi", "bif"):
        raise ConfigError(f"method={cfg.method!r} is not one of sdi, bif")
    if cfg.method == "bif":
        validate_bif(cfg)
    positive = {
        "sketch.m": cfg.sketch.m,
        "data.batch_size": cfg.data.batch_size,
        "data.block_size": cfg.data.block_size,
        "merge.topk": cfg.merge.topk,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if cfg.sketch.train_steps == "summed" and cfg.merge.step_matrix:
        raise ConfigError(
            "merge.step_matrix=true needs per-step train sketches: set sketch.train_steps=full"
        )
    for name in ("model", "analysis.loss", "data.train", "data.query"):
        if OmegaConf.select(cfg, name) is None:
            raise ConfigError(f"{name} is not set: give a Hydra _target_ node for it")
    if not cfg.checkpoints.paths:
        raise ConfigError("checkpoints.paths is empty: list checkpoint files or globs")
    if not cfg.analysis.targets:
        raise ConfigError("analysis.targets is empty: name the looped block, e.g. [block]")
    tokens = cfg.analysis.query_tokens
    positions = (
        isinstance(tokens, ListConfig)
        and len(tokens) > 0
        and all(isinstance(p, int) and not isinstance(p, bool) for p in tokens)
    )
    if not (tokens is None or tokens in ("all", "last") or positions):
        raise ConfigError(
            f"analysis.query_tokens={tokens!r} is not null, 'all', 'last' or a list of token "
            "positions (e.g. [-1] or [3,4,5])"
        )
    check_folder_name("run.name", cfg.run.name)
    if cfg.run.id is not None:
        check_folder_name("run.id", cfg.run.id)
    if not cfg.runtime.lease_timeout_s > 0:
        raise ConfigError(
            f"runtime.lease_timeout_s must be positive, got {cfg.runtime.lease_timeout_s}"
        )
    if cfg.runtime.checkpoint_cache_gb < 0:
        raise ConfigError(
            f"runtime.checkpoint_cache_gb must be 0 or more, got {cfg.runtime.checkpoint_cache_gb}"
        )
    if cfg.runtime.threads is not None and cfg.runtime.threads <= 0:
        raise ConfigError(f"runtime.threads must be positive or null, got {cfg.runtime.threads}")
    LAUNCHER_SCHEMAS[cfg.launcher.name].validate(cfg)


def validate_bif(cfg: DictConfig) -> None:
    """The bif section's values, one line each (SGLDConfig.check repeats them in the jobs)."""
    b = cfg.bif
    for name in ("chains", "draws", "steps_bw_draws", "batch_size", "init_loss_batches", "threads"):
        if b[name] < 1:
            raise ConfigError(f"bif.{name} must be at least 1, got {b[name]}")
    if b.burnin < 0:
        raise ConfigError(f"bif.burnin must be 0 or more, got {b.burnin}")
    for name in ("lr", "localization", "weight_decay", "noise_level"):
        if not (math.isfinite(b[name]) and b[name] >= 0):
            raise ConfigError(f"bif.{name} must be a finite number >= 0, got {b[name]}")
    if b.lr == 0:
        raise ConfigError("bif.lr is 0: the chains would not move; set e.g. bif.lr=1e-4")
    if b.n_beta is not None and not (math.isfinite(b.n_beta) and b.n_beta > 0):
        raise ConfigError(f"bif.n_beta must be a positive number or null, got {b.n_beta}")
    if b.bounding_box_size is not None and not b.bounding_box_size > 0:
        raise ConfigError(f"bif.bounding_box_size must be > 0 or null, got {b.bounding_box_size}")
    samples = b.draws * (b.chains if b.chain_reduction == "stack" else 1)
    need = 2 if b.covariance else 3
    if samples < need:
        what = "covariance" if b.covariance else "correlation"
        raise ConfigError(
            f"bif: {samples} samples per trace (bif.draws={b.draws}, bif.chains={b.chains}, "
            f"chain_reduction={b.chain_reduction}) but a {what} needs at least {need}: raise "
            "bif.draws"
        )
    if not b.max_gb > 0:
        raise ConfigError(f"bif.max_gb must be positive, got {b.max_gb}")


def explain(err: OmegaConfBaseException, schema: DictConfig) -> str:
    """One line for a config error; for an unknown key, the valid keys and near matches."""
    full_key = str(getattr(err, "full_key", "") or "")
    first = str(err).splitlines()[0]
    parent_path, _, key = full_key.rpartition(".")
    parent = OmegaConf.select(schema, parent_path) if parent_path else schema
    if "not in" in first and isinstance(parent, DictConfig):
        valid = [str(k) for k in parent]
        hint = did_you_mean(key, valid, n=3)
        return f"unknown key '{full_key}'.{hint} Valid keys here: {', '.join(valid)}"
    return f"{full_key}: {first}" if full_key else first


def structured(data: Any) -> DictConfig:
    """Merge ``data`` onto the schema: unknown keys and wrong types fail with their name."""
    base = OmegaConf.structured(AttributionConfig)
    name = OmegaConf.select(OmegaConf.create(data), "launcher.name", default="local")
    if name not in LAUNCHER_SCHEMAS:
        raise ConfigError(f"launcher.name={name!r} is not one of {', '.join(LAUNCHER_SCHEMAS)}")
    base.launcher = OmegaConf.structured(LAUNCHER_SCHEMAS[name].schema)
    try:
        merged = OmegaConf.merge(base, data)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config: {explain(err, base)}") from err
    assert isinstance(merged, DictConfig)
    if merged.run.name is None:
        merged.run.name = "run"
    validate(merged)
    return merged


def attribution_view(cfg: DictConfig) -> dict[str, Any]:
    """The part of the config that determines the results (resolved, as plain data)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    view = {str(k): v for k, v in data.items() if k not in NON_ATTRIBUTION_KEYS}
    if view.get("method", "sdi") == "sdi":
        for key in BIF_KEYS:
            view.pop(key, None)
    for group, key in NON_ATTRIBUTION_FIELDS:
        if isinstance(view.get(group), dict):
            view[group].pop(key, None)
    for (group, key), default in LATER_FIELDS.items():
        if isinstance(view.get(group), dict) and view[group].get(key, default) == default:
            view[group].pop(key, None)
    return view


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_hash(cfg: DictConfig) -> str:
    """A stable 16-hex-digit hash of :func:`attribution_view`: it names the run."""
    return _digest(attribution_view(cfg))


def train_hash(cfg: DictConfig) -> str:
    """Hash of what determines the train sketches (the attribution minus query and merge)."""
    view = attribution_view(cfg)
    for path in QUERY_SIDE_KEYS:
        node = view
        for key in path[:-1]:
            node = node[key]
        node.pop(path[-1], None)
    return _digest(view)


def save(cfg: DictConfig, path: Path) -> None:
    """Write the resolved config as YAML (temporary name, then rename)."""
    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))


def load(path: Path) -> DictConfig:
    """Read a run's config.yaml back onto the schema."""
    if not path.is_file():
        raise RunDirError(f"no config at {path}: is this a run directory made by sdi-attribute?")
    fix = "run the same sdi-attribute command again to rewrite it (or restore it)"
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # yaml's scanner/parser errors, bad bytes, OmegaConf's own
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        if mark is not None and problem:
            where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
        else:
            where = " ".join(str(err).split())[:200]
        raise RunDirError(f"{path} is damaged: not valid YAML ({where}); {fix}") from err
    if not isinstance(raw, DictConfig):
        raise RunDirError(f"{path} is damaged: it holds no mapping of config keys; {fix}")
    version = raw.get("schema_version")
    if version is None:
        raise RunDirError(f"{path} is damaged: it has no schema_version (truncated?); {fix}")
    if version != SCHEMA_VERSION:
        raise RunDirError(
            f"{path} has config schema version {version}, this sdi-pipeline reads version "
            f"{SCHEMA_VERSION}: run it with the sdi-pipeline version that made the run"
        )
    try:
        return structured(raw)
    except ConfigError as err:
        raise RunDirError(f"{path} does not fit the config schema ({err}); {fix}") from err
