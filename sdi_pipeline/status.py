"""``sdi-status``: which units of a run are done, missing or failed, where the logs are, and
what the launchers report about its jobs (e.g. their states under launcher=slurm)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sdi_pipeline import build
from sdi_pipeline.launchers import LAUNCHERS
from sdi_pipeline.messages import shortened
from sdi_pipeline.rundir import RunDir, run_units


@dataclass
class RunStatus:
    done: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failed: dict[str, dict] = field(default_factory=dict)
    query_done: list[int] = field(default_factory=list)
    query_missing: list[int] = field(default_factory=list)
    merged: bool = False
    # What the launchers say about the jobs they started for the run (Launcher.status_lines).
    launcher_lines: list[str] = field(default_factory=list)


def run_status(run: RunDir) -> RunStatus:
    cfg = run.load_config()
    # The recorded size spares building the user's data set (and importing its code).
    n_train = run.recorded_train_size()
    if n_train is None:
        n_train = len(build.build_dataset(cfg, "train"))
    status = RunStatus(merged=run.results_path.exists())
    # Every launcher is asked, not only the config's: after launcher=prepare, jobs may have
    # been submitted by hand.
    for launcher in LAUNCHERS.values():
        if launcher.status_lines is not None:
            status.launcher_lines += launcher.status_lines(run, status.merged)
    for k in range(len(cfg.checkpoints.paths)):
        (status.query_done if run.query_path(k).exists() else status.query_missing).append(k)
    for unit in run_units(cfg, n_train):
        if run.is_done(unit):
            status.done.append(unit.name)
        elif run.failure_path(unit).exists():
            status.failed[unit.name] = json.loads(run.failure_path(unit).read_text())
        else:
            status.missing.append(unit.name)
    return status


def format_status(run: RunDir, status: RunStatus) -> str:
    total = len(status.done) + len(status.missing) + len(status.failed)
    lines = [
        f"run {run.path}",
        f"  query sketches: {len(status.query_done)} of "
        f"{len(status.query_done) + len(status.query_missing)} checkpoints",
        f"  units: {len(status.done)} done, {len(status.missing)} missing, "
        f"{len(status.failed)} failed (of {total})",
    ]
    for name, info in sorted(status.failed.items()):
        lines.append(f"    FAILED {name} (rank {info.get('rank')}): {info.get('error')}")
        lines.append(f"           log: {info.get('log')}")
    if status.missing:
        lines.append(f"    missing: {shortened(status.missing, 8)}")
    lines.append(f"  results.h5: {'written' if status.merged else 'not yet'}")
    lines += status.launcher_lines
    return "\n".join(lines)
