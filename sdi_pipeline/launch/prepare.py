"""The prepare launcher: create the run directory and print the commands that run its jobs.

For running the jobs by hand, on any machines that see the run directory.
"""

from __future__ import annotations

from omegaconf import DictConfig

from sdi_pipeline.run.rundir import RunDir


def launch_prepare(run: RunDir, cfg: DictConfig, n_train: int) -> int:
    """Print the sdi-query / sdi-worker / sdi-merge / sdi-status commands; returns 0."""
    world = int(cfg.launcher.workers)
    print("[sdi] run the jobs by hand, on any machines that see this directory:")
    print(f"  sdi-query  run_dir={run.path}   # first: the workers score against it")
    print(f"  sdi-worker run_dir={run.path} rank=R world_size={world}   # R = 0..{world - 1}")
    print(f"  sdi-merge  run_dir={run.path}   # after all of the above")
    print(f"  sdi-status run_dir={run.path}")
    return 0
