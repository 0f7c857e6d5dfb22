"""``sdi-status``: which units of a run are done, missing or failed, where the logs are, and
the states of its SLURM jobs."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field

from sdi_pipeline import build
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
    slurm: SlurmJobs | None = None


@dataclass
class SlurmJobs:
    """The run's last SLURM submission (``commands/slurm.json``) and its jobs' states."""

    query: str | None
    array: str | None
    merge: str | None
    # Job id (array tasks as ``<array>_<task>``) -> state, as sacct reports it.
    states: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def role_states(self) -> list[tuple[str, list[tuple[str, str]]]]:
        """(role, [(job id, state), ...]) for query, workers and merge, in that order."""
        roles = [("query", self.query), ("workers", self.array), ("merge", self.merge)]
        return [
            (role, [(j, s) for j, s in self.states.items() if j.split("_")[0] == job])
            for role, job in roles
            if job is not None
        ]


def slurm_jobs(run: RunDir) -> SlurmJobs | None:
    """States of the jobs last submitted for this run (None if it was never submitted)."""
    if not run.slurm_jobs_path.exists():
        return None
    sub = json.loads(run.slurm_jobs_path.read_text())
    jobs = SlurmJobs(sub.get("query"), (sub.get("workers") or {}).get("array"), sub.get("merge"))
    ids = [j for j in (jobs.query, jobs.array, jobs.merge) if j]
    if shutil.which("sacct") is None:
        jobs.error = "sacct is not on PATH"
        return jobs
    try:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        jobs.error = f"sacct failed: {' '.join(str(getattr(err, 'stderr', '') or err).split())}"
        return jobs
    for line in out.splitlines():
        job, _, state = line.partition("|")
        if job:
            jobs.states[job] = state.split(" ")[0]  # "CANCELLED by 0" -> "CANCELLED"
    return jobs


def run_status(run: RunDir) -> RunStatus:
    cfg = run.load_config()
    # The recorded size spares building the user's data set (and importing its code).
    n_train = run.recorded_train_size()
    if n_train is None:
        n_train = len(build.build_dataset(cfg, "train"))
    status = RunStatus(merged=run.results_path.exists(), slurm=slurm_jobs(run))
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
    if status.slurm is not None:
        lines.append("  SLURM jobs (commands/slurm.json):")
        if status.slurm.error:
            lines.append(f"    states unknown: {status.slurm.error}")
        for role, states in status.slurm.role_states():
            shown = ", ".join(f"{j} {s}" for j, s in states) or "not in sacct"
            lines.append(f"    {role:8s}{shown}")
        ended = set(status.slurm.states.values())
        if not status.merged and ended & {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"}:
            lines.append(
                "  fix the cause (see the logs above), then run the same command again "
                "(sdi-attribute or slurm/submit.sh): finished work is not redone"
            )
    return "\n".join(lines)
