"""What a cluster scheduler gave this job: its array task index and count, its CPUs, its
rank on its node.

The defaults a job takes from its environment, so that the jobs need not know which
launcher started them.
"""

from __future__ import annotations

import os


def array_task_id() -> int:
    """This job array task's index (``SLURM_ARRAY_TASK_ID``): a worker's default rank; else 0."""
    return int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))


def array_task_count() -> int:
    """The job array's size (``SLURM_ARRAY_TASK_COUNT``): a worker's default world size; else 1."""
    return int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))


def allocated_cpus() -> str | None:
    """The CPUs per task of this SLURM job (``SLURM_CPUS_PER_TASK``); None outside one.

    A job uses its allocation for its torch threads, not every core of the node.
    """
    return os.environ.get("SLURM_CPUS_PER_TASK")


def local_rank() -> int:
    """This task's rank among the tasks of its job step on this node (``SLURM_LOCALID``, or
    torchrun's ``LOCAL_RANK``); else 0.

    A job whose tasks share a node and all see its GPUs uses it to take GPU
    ``local_rank % visible``; where each task sees one GPU (SLURM's gres binding, the local
    launcher) it changes nothing.
    """
    return int(os.environ.get("SLURM_LOCALID") or os.environ.get("LOCAL_RANK") or 0)
