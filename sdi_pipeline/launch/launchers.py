"""Launchers: how the query job, the workers and the merge get run (same code everywhere).

Each launcher module owns its config schema (the ``launcher`` section of a run's config)
and its launch function. :data:`LAUNCHERS` is the one table of them: config validation,
Hydra's schema registration, ``sdi-attribute`` and ``sdi-status`` all read it, so a new
launcher is one module, one entry here and one ``conf/launcher/<name>.yaml``.

The defaults a job takes from its cluster environment (worker rank and world size, torch
threads) are exported here too, so the jobs need not know which scheduler set them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig

from sdi_pipeline.launchers import local, prepare, slurm
from sdi_pipeline.launchers.slurm import allocated_cpus, array_task_count, array_task_id
from sdi_pipeline.rundir import RunDir

__all__ = [
    "LAUNCHERS",
    "Launcher",
    "allocated_cpus",
    "array_task_count",
    "array_task_id",
]


@dataclass(frozen=True)
class Launcher:
    """A launcher: its name (``launcher=<name>``), config schema and launch function.

    ``launch(run, cfg, n_train)`` runs or submits the run's jobs and returns the exit status
    of ``sdi-attribute``. ``runs_jobs`` is False for a launcher that only prints how to run
    them (no results summary follows it). ``status_lines(run, merged)``, if set, gives the
    lines ``sdi-status`` adds about the jobs this launcher started for the run.
    ``validate(cfg)``, if set, checks the launcher's values when the config is validated
    (before any run directory exists), raising one ConfigError.
    """

    name: str
    schema: type
    launch: Callable[[RunDir, DictConfig, int], int]
    runs_jobs: bool = True
    status_lines: Callable[[RunDir, bool], list[str]] | None = None
    validate: Callable[[DictConfig], None] | None = None


LAUNCHERS: dict[str, Launcher] = {
    launcher.name: launcher
    for launcher in (
        Launcher(
            "local", local.LocalLauncherConfig, local.launch_local, validate=local.validate_config
        ),
        Launcher(
            "slurm",
            slurm.SlurmLauncherConfig,
            slurm.launch_slurm,
            status_lines=slurm.status_lines,
            validate=slurm.validate_config,
        ),
        Launcher(
            "prepare",
            prepare.PrepareLauncherConfig,
            prepare.launch_prepare,
            runs_jobs=False,
            validate=prepare.validate_config,
        ),
    )
}
