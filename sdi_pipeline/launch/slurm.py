"""The SLURM launcher (submitit): query job, worker job array, dependent merge job.

``launch_slurm`` submits and returns at once. The worker array starts after the query job
(the workers score each block as they sketch it); each task runs the same code as
``sdi-worker``; on preemption or timeout submitit calls ``checkpoint`` and requeues the task,
which resumes from what is on disk. Running the same command again submits only what is
missing: the query job if its files are not there, array tasks for ranks with blocks left --
``sdi-score`` tasks when those blocks only need scoring (their train sketches are stored, e.g.
adopted by a run with a new query set) -- and the merge, which depends on all of them.

Everything else the package knows about SLURM is here too: the defaults a job takes from
its SLURM environment, where a run records its submitted jobs, and their states for
``sdi-status``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdi_pipeline.errors import ConfigError
from sdi_pipeline.files.atomic import write_json_atomic
from sdi_pipeline.formats.results import stale_reasons
from sdi_pipeline.formats.shards import block_done
from sdi_pipeline.run.freshness import query_digests
from sdi_pipeline.run.rundir import RunDir, rank_blocks, run_blocks


def jobs_path(run: RunDir) -> Path:
    """The ids of the run's last SLURM submission (launcher=slurm or slurm/submit.sh)."""
    return run.path / "commands" / "slurm.json"


@dataclass
class SlurmJobs:
    """The run's last SLURM submission (``commands/slurm.json``) and its jobs' states."""

    query: str | None
    array: str | None  # the worker (or sdi-score) array
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
    path = jobs_path(run)
    if not path.exists():
        return None
    sub = json.loads(path.read_text())
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


def status_lines(run: RunDir, merged: bool) -> list[str]:
    """``sdi-status``'s lines on the run's SLURM jobs and, after a failure, what to do."""
    jobs = slurm_jobs(run)
    if jobs is None:
        return []
    lines = ["  SLURM jobs (commands/slurm.json):"]
    if jobs.error:
        lines.append(f"    states unknown: {jobs.error}")
    for role, states in jobs.role_states():
        shown = ", ".join(f"{j} {s}" for j, s in states) or "not in sacct"
        lines.append(f"    {role:8s}{shown}")
    ended = set(jobs.states.values())
    if not merged and ended & {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"}:
        lines.append(
            "  fix the cause (see the logs above), then run the same command again "
            "(sdi-attribute or slurm/submit.sh): finished work is not redone"
        )
    return lines


class _Task:
    """A picklable job for submitit; requeued on preemption/timeout (``checkpoint``)."""

    def __init__(self, job: str, run_dir: str, rank: int = 0, world_size: int = 1) -> None:
        self.job, self.run_dir, self.rank, self.world_size = job, run_dir, rank, world_size

    def __call__(self) -> int:
        from sdi_pipeline.jobs.context import EXIT_INTERRUPTED
        from sdi_pipeline.jobs.merge import run_merge
        from sdi_pipeline.jobs.query import run_query
        from sdi_pipeline.jobs.score import run_score
        from sdi_pipeline.jobs.worker import run_worker

        if self.job == "worker":
            code = run_worker(self.run_dir, self.rank, self.world_size)
        elif self.job == "score":
            code = run_score(self.run_dir, self.rank, self.world_size)
        elif self.job == "query":
            code = run_query(self.run_dir)
        else:
            code = run_merge(self.run_dir)
        if code == EXIT_INTERRUPTED and os.environ.get("SLURM_JOB_ID"):
            # Stopped by SIGTERM (preemption, scancel --signal=TERM): go back in the queue;
            # the requeued task resumes from the completion markers.
            job_id = os.environ["SLURM_JOB_ID"]
            done = subprocess.run(
                ["scontrol", "requeue", job_id], capture_output=True, text=True, check=False
            )
            if done.returncode == 0:
                raise RuntimeError(f"sdi {self.job} stopped by a signal; job {job_id} requeued")
            raise RuntimeError(
                f"sdi {self.job} stopped by a signal and `scontrol requeue {job_id}` failed "
                f"({done.stderr.strip()}); run the same sdi-attribute command to resubmit"
            )
        if code != 0:
            raise RuntimeError(f"sdi {self.job} exited with status {code}")
        return code

    def checkpoint(self) -> Any:
        import submitit

        # Finished units are on disk; the requeued task skips them.
        return submitit.helpers.DelayedSubmission(self)


def _executor(run: RunDir, cfg: DictConfig, kind: str) -> Any:
    import submitit

    lc = cfg.launcher
    executor = submitit.AutoExecutor(
        folder=run.path / "slurm" / "%j",
        cluster="slurm",
        slurm_max_num_timeout=int(lc.max_requeues),
    )
    container = OmegaConf.to_container(lc.additional, resolve=True)
    additional: dict[str, Any] = {str(k): v for k, v in dict(container or {}).items()}  # type: ignore[arg-type]
    params: dict[str, Any] = {
        "name": f"sdi-{kind}-{run.path.name}",
        "slurm_partition": lc.partition,
        "slurm_account": lc.account,
        "slurm_qos": lc.qos,
        "slurm_constraint": lc.constraint,
        "slurm_additional_parameters": additional,
    }
    if kind in ("worker", "score"):
        params |= {
            "timeout_min": int(lc.time_min),
            "mem_gb": float(lc.mem_gb),
            "cpus_per_task": int(lc.cpus_per_task),
            "gpus_per_node": int(lc.gpus_per_task),
            "slurm_array_parallelism": int(lc.array_parallelism or lc.array_size),
        }
    else:
        params |= {
            "timeout_min": int(lc.query_time_min if kind == "query" else lc.merge_time_min),
            "mem_gb": float(lc.mem_gb if kind == "query" else lc.merge_mem_gb),
            "cpus_per_task": int(lc.cpus_per_task if kind == "query" else lc.merge_cpus),
            "gpus_per_node": int(lc.gpus_per_task if kind == "query" else 0),
        }
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def _depend_on(executor: Any, jobs: list[str]) -> None:
    """The executor's jobs start after all of ``jobs`` succeed (and never if one fails)."""
    extra = dict(executor.parameters.get("slurm_additional_parameters") or {})
    extra |= {"dependency": "afterok:" + ":".join(jobs), "kill-on-invalid-dep": "yes"}
    executor.update_parameters(slurm_additional_parameters=extra)


def launch_slurm(run: RunDir, cfg: DictConfig, n_train: int) -> int:
    """Submit what is missing and print how to follow it; returns 0 once submitted."""
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(
            f"launcher=slurm needs SLURM's {' and '.join(missing)} on PATH: run sdi-attribute "
            "on a cluster login node (or use launcher=local)"
        )
    if run.results_path.exists() and not stale_reasons(run.results_path):
        print(f"[sdi] {run.results_path} exists and is up to date: nothing to submit")
        return 0
    world = int(cfg.launcher.array_size)
    blocks = run_blocks(cfg, n_train)
    store_train = bool(cfg.sketch.store_train)
    queries = query_digests(run, len(cfg.checkpoints.paths))
    ranks = [
        r
        for r in range(world)
        if not all(block_done(run, b, store_train, queries) for b in rank_blocks(blocks, r, world))
    ]
    # Only scoring left (every unit stored): sdi-score tasks, which never sketch.
    kind = (
        "score"
        if store_train and all(run.is_done(u) for b in blocks for u in b.units)
        else "worker"
    )
    after: list[str] = []
    submitted: dict[str, Any] = {"run_dir": str(run.path)}
    if queries is None:
        job = _executor(run, cfg, "query").submit(_Task("query", str(run.path)))
        after.append(str(job.job_id))
        submitted["query"] = str(job.job_id)
    if ranks:
        executor = _executor(run, cfg, kind)
        if after:  # the workers score against the query sketches: they start after them
            _depend_on(executor, after)
        with executor.batch():
            jobs = [executor.submit(_Task(kind, str(run.path), r, world)) for r in ranks]
        array_id = str(jobs[0].job_id).split("_")[0]
        after.append(array_id)
        submitted["workers"] = {
            "array": array_id,
            "job": kind,
            "ranks": ranks,
            "tasks": [str(j.job_id) for j in jobs],
        }
    merge_executor = _executor(run, cfg, "merge")
    if after:
        _depend_on(merge_executor, after)
    merge = merge_executor.submit(_Task("merge", str(run.path)))
    submitted["merge"] = str(merge.job_id)
    write_json_atomic(jobs_path(run), submitted)
    ids = ",".join([*after, str(merge.job_id)])
    print(f"[sdi] submitted to SLURM: {json.dumps(submitted)}")
    print(f"[sdi] run dir: {run.path}")
    print(f"[sdi] follow: squeue -j {ids}   |   sdi-status run_dir={run.path}")
    print(f"[sdi] logs: {Path(run.logs_dir)} and {run.path / 'slurm'}")
    print("[sdi] once merged, the same command prints the top examples and writes the plots")
    return 0
