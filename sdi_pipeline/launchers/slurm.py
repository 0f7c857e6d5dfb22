"""The SLURM launcher (submitit): query job, worker job array, dependent merge job.

``launch_slurm`` submits and returns at once. Each worker task runs the same code as
``sdi-worker``; on preemption or timeout submitit calls ``checkpoint`` and requeues the task,
which resumes from the completion markers. Running the same command again submits only
what is missing: the query job if its files are not there, array tasks for ranks with units
left, and the merge.
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

from sdi_pipeline.atomic import write_json_atomic
from sdi_pipeline.errors import SDIError
from sdi_pipeline.rundir import RunDir, run_units


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


class _Task:
    """A picklable job for submitit; requeued on preemption/timeout (``checkpoint``)."""

    def __init__(self, job: str, run_dir: str, rank: int = 0, world_size: int = 1) -> None:
        self.job, self.run_dir, self.rank, self.world_size = job, run_dir, rank, world_size

    def __call__(self) -> int:
        from sdi_pipeline.jobs import EXIT_INTERRUPTED, run_query, run_worker
        from sdi_pipeline.merge import run_merge

        if self.job == "worker":
            code = run_worker(self.run_dir, self.rank, self.world_size)
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
    if kind == "worker":
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


def launch_slurm(run: RunDir, cfg: DictConfig, n_train: int) -> int:
    """Submit what is missing and print how to follow it; returns 0 once submitted."""
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise SDIError(
            f"launcher=slurm needs SLURM's {' and '.join(missing)} on PATH: run sdi-attribute "
            "on a cluster login node (or use launcher=local)"
        )
    if run.results_path.exists():
        print(f"[sdi] {run.results_path} exists: nothing to submit")
        return 0
    world = int(cfg.launcher.array_size)
    units = run_units(cfg, n_train)
    ranks = [r for r in range(world) if any(not run.is_done(u) for u in units[r::world])]
    need_query = any(not run.query_path(k).exists() for k in range(len(cfg.checkpoints.paths)))
    after: list[str] = []
    submitted: dict[str, Any] = {"run_dir": str(run.path)}
    if need_query:
        job = _executor(run, cfg, "query").submit(_Task("query", str(run.path)))
        after.append(str(job.job_id))
        submitted["query"] = str(job.job_id)
    if ranks:
        executor = _executor(run, cfg, "worker")
        with executor.batch():
            jobs = [executor.submit(_Task("worker", str(run.path), r, world)) for r in ranks]
        array_id = str(jobs[0].job_id).split("_")[0]
        after.append(array_id)
        submitted["workers"] = {
            "array": array_id,
            "ranks": ranks,
            "tasks": [str(j.job_id) for j in jobs],
        }
    merge_executor = _executor(run, cfg, "merge")
    if after:
        extra = dict(merge_executor.parameters.get("slurm_additional_parameters") or {})
        extra |= {"dependency": "afterok:" + ":".join(after), "kill-on-invalid-dep": "yes"}
        merge_executor.update_parameters(slurm_additional_parameters=extra)
    merge = merge_executor.submit(_Task("merge", str(run.path)))
    submitted["merge"] = str(merge.job_id)
    write_json_atomic(run.slurm_jobs_path, submitted)
    ids = ",".join([*after, str(merge.job_id)])
    print(f"[sdi] submitted to SLURM: {json.dumps(submitted)}")
    print(f"[sdi] run dir: {run.path}")
    print(f"[sdi] follow: squeue -j {ids}   |   sdi-status run_dir={run.path}")
    print(f"[sdi] logs: {Path(run.logs_dir)} and {run.path / 'slurm'}")
    print("[sdi] once merged, the same command prints the top examples and writes the plots")
    return 0
