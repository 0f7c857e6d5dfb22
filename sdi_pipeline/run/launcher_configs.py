"""The ``launcher`` section of a run's config: one schema per launcher, with its checks.

The schemas live with the rest of the config schema (:mod:`sdi_pipeline.run.config`), not
with the launchers that use them, so reading and validating a run's config never imports
a launcher. :data:`LAUNCHER_SCHEMAS` names them; :mod:`sdi_pipeline.launch.launchers` pairs
each name with its launch function (a test checks the two tables agree).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdi_pipeline.errors import ConfigError


@dataclass
class LocalLauncherConfig:
    """Run the query job, ``workers`` worker processes and the merge on this machine."""

    name: str = "local"
    workers: int = field(
        default=2, metadata={"help": "worker processes on this machine (cores split evenly)"}
    )
    # Torch threads per worker; null splits this machine's cores evenly between workers.
    threads_per_worker: int | None = None


def validate_local(cfg: DictConfig) -> None:
    """launcher.workers and threads_per_worker must be positive."""
    lc = cfg.launcher
    if lc.workers < 1:
        raise ConfigError(
            f"launcher.workers must be at least 1 (the number of worker processes), got "
            f"{lc.workers}"
        )
    if lc.threads_per_worker is not None and lc.threads_per_worker < 1:
        raise ConfigError(
            f"launcher.threads_per_worker must be at least 1 or null, got {lc.threads_per_worker}"
        )


@dataclass
class SlurmLauncherConfig:
    """Submit a query job, a worker job array and a dependent merge job with submitit."""

    name: str = "slurm"
    array_size: int = 8
    # At most this many array tasks run at once (sbatch --array=0-N%P); null: no limit.
    array_parallelism: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 120
    mem_gb: float = 16.0
    cpus_per_task: int = 4
    gpus_per_task: int = 0
    constraint: str | None = None
    # Extra sbatch parameters, e.g. {mail-type: FAIL}.
    additional: dict[str, Any] = field(default_factory=dict)
    query_time_min: int = 60
    merge_time_min: int = 60
    merge_mem_gb: float = 32.0
    merge_cpus: int = 4
    # Requeues after preemption or timeout before a task gives up.
    max_requeues: int = 3


# What SLURM values may hold: they land in #SBATCH lines of generated scripts and on sbatch's
# command line, so no whitespace, quotes, newlines or other shell characters.
_SAFE = re.compile(r"[A-Za-z0-9_.,:=+@%/-]+")
# --constraint also has SLURM's own operators: & | [ ] ( ) * (e.g. "a100|h100", "[rack1|rack2]").
_CONSTRAINT = re.compile(r"[A-Za-z0-9_.,:=+@%/&|\[\]()*-]+")
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_ALLOWED = "letters, digits and _ . , : = + @ % / - only"


def _check_value(key: str, value: Any, pattern: re.Pattern[str], allowed: str = _ALLOWED) -> None:
    text = str(value)
    if pattern.fullmatch(text):
        return
    if re.search(r"[\x00-\x1f\x7f]", text):
        what = "a newline or control character"
    elif not text:
        what = "nothing"
    else:
        bad = sorted({c for c in text if not pattern.fullmatch(c)})
        what = "the character(s) " + " ".join(repr(c) for c in bad)
    raise ConfigError(
        f"{key}={text!r} holds {what}: SLURM values may hold {allowed} (they go into #SBATCH "
        "lines and sbatch's command line)"
    )


def validate_slurm(cfg: DictConfig) -> None:
    """Check the SLURM launcher's values: counts and times in range, names free of newlines
    and shell characters (partition, account, qos, constraint, additional keys and values,
    and run.name / run.id, which name the jobs)."""
    lc = cfg.launcher
    at_least = {
        "array_size": 1, "time_min": 1, "cpus_per_task": 1, "query_time_min": 1,
        "merge_time_min": 1, "merge_cpus": 1, "gpus_per_task": 0, "max_requeues": 0,
    }  # fmt: skip
    for key, low in at_least.items():
        if lc[key] < low:
            raise ConfigError(f"launcher.{key} must be at least {low}, got {lc[key]}")
    for key in ("mem_gb", "merge_mem_gb"):
        if not lc[key] > 0:
            raise ConfigError(f"launcher.{key} must be positive, got {lc[key]}")
    if lc.array_parallelism is not None and lc.array_parallelism < 1:
        raise ConfigError(
            f"launcher.array_parallelism must be at least 1 or null, got {lc.array_parallelism}"
        )
    for key in ("partition", "account", "qos"):
        if lc[key] is not None:
            _check_value(f"launcher.{key}", lc[key], _SAFE)
    if lc.constraint is not None:
        _check_value(
            "launcher.constraint", lc.constraint, _CONSTRAINT, _ALLOWED + " and & | [ ] ( ) *"
        )
    additional = OmegaConf.to_container(lc.additional, resolve=True) or {}
    assert isinstance(additional, dict)
    for key, value in additional.items():
        if not _KEY.fullmatch(str(key)):
            _check_value("launcher.additional key", key, _KEY, "letters, digits, _ and - only")
        if isinstance(value, (bool, int, float)):
            continue
        if not isinstance(value, str):
            raise ConfigError(
                f"launcher.additional.{key} is a {type(value).__name__}: give a string, number "
                "or boolean"
            )
        _check_value(f"launcher.additional.{key}", value, _SAFE)
    for key in ("name", "id"):
        if cfg.run[key] is not None:
            _check_value(f"run.{key}", cfg.run[key], _SAFE)


@dataclass
class PrepareLauncherConfig:
    """Only create the run directory and print the commands to run the jobs by hand."""

    name: str = "prepare"
    # The world size used in the printed worker commands.
    workers: int = 4


def validate_prepare(cfg: DictConfig) -> None:
    """launcher.workers must be a positive world size."""
    if cfg.launcher.workers < 1:
        raise ConfigError(
            f"launcher.workers must be at least 1 (the world size of the printed worker "
            f"commands), got {cfg.launcher.workers}"
        )


@dataclass(frozen=True)
class LauncherSchema:
    """A launcher's config schema (its dataclass) and the check of its values, which raises
    one ConfigError before any run directory exists."""

    schema: type
    validate: Callable[[DictConfig], None]


LAUNCHER_SCHEMAS: dict[str, LauncherSchema] = {
    "local": LauncherSchema(LocalLauncherConfig, validate_local),
    "slurm": LauncherSchema(SlurmLauncherConfig, validate_slurm),
    "prepare": LauncherSchema(PrepareLauncherConfig, validate_prepare),
}
