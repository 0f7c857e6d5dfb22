"""Launchers: how the query job, the workers and the merge get run (same code everywhere).

Each launcher module owns its launch function; its config schema (the ``launcher`` section
of a run's config) lives with the config schema in :mod:`sdi_pipeline.run.launcher_configs`.
:data:`LAUNCHERS` is the one table of launchers: ``sdi-attribute``, Hydra's schema
registration and ``sdi-status`` read it, so a new launcher is one module, one entry here,
its schema and one ``conf/launcher/<name>.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig

from sdi_pipeline.launch import local, prepare, slurm
from sdi_pipeline.run.launcher_configs import LAUNCHER_SCHEMAS
from sdi_pipeline.run.rundir import RunDir


@dataclass(frozen=True)
class Launcher:
    """A launcher: its name (``launcher=<name>``), config schema and launch function.

    ``launch(run, cfg, n_train)`` runs or submits the run's jobs and returns the exit status
    of ``sdi-attribute``. ``runs_jobs`` is False for a launcher that only prints how to run
    them (no results summary follows it). ``status_lines(run, merged)``, if set, gives the
    lines ``sdi-status`` adds about the jobs this launcher started for the run.
    """

    name: str
    launch: Callable[[RunDir, DictConfig, int], int]
    runs_jobs: bool = True
    status_lines: Callable[[RunDir, bool], list[str]] | None = None

    @property
    def schema(self) -> type:
        """The dataclass of this launcher's config section."""
        return LAUNCHER_SCHEMAS[self.name].schema


LAUNCHERS: dict[str, Launcher] = {
    launcher.name: launcher
    for launcher in (
        Launcher("local", local.launch_local),
        Launcher("slurm", slurm.launch_slurm, status_lines=slurm.status_lines),
        Launcher("prepare", prepare.launch_prepare, runs_jobs=False),
    )
}
