"""The local launcher: query job, W parallel worker processes, then the merge.

Workers are separate processes running the same ``sdi-worker`` code as on a cluster. The
machine's cores are split between them (threads per worker), and with several GPUs each
worker sees one (CUDA_VISIBLE_DEVICES). One progress bar follows the units; Ctrl-C asks the
workers to stop after their current batch, and running the same command again resumes.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from sdi_pipeline.atomic import write_text_atomic
from sdi_pipeline.errors import ConfigError
from sdi_pipeline.rundir import RunDir, run_units

EXIT_CTRL_C = 130


@dataclass
class LocalLauncherConfig:
    """Run the query job, ``workers`` worker processes and the merge on this machine."""

    name: str = "local"
    workers: int = 2
    # Torch threads per worker; null splits this machine's cores evenly between workers.
    threads_per_worker: int | None = None


def validate_config(cfg: DictConfig) -> None:
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


def job_command(job: str, run: RunDir, *extra: str) -> list[str]:
    """The command line of one job (the same entry points a user runs by hand)."""
    return [sys.executable, "-m", "sdi_pipeline.cli", job, f"run_dir={run.path}", *extra]


def _record(run: RunDir, name: str, cmd: list[str], env: dict[str, str]) -> None:
    folder = run.path / "commands"
    folder.mkdir(exist_ok=True)
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    write_text_atomic(folder / f"{name}.sh", f"{shown} {shlex.join(cmd)}\n".lstrip())


def _start(run: RunDir, name: str, cmd: list[str], env_extra: dict[str, str]) -> subprocess.Popen:
    _record(run, name, cmd, env_extra)
    log = open(run.logs_dir / f"{name}.out", "ab")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(
        cmd,
        env=os.environ | env_extra,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()


def _run_one(run: RunDir, name: str, cmd: list[str], env: dict[str, str]) -> int:
    proc = _start(run, name, cmd, env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        _stop([proc])
        raise


def launch_local(run: RunDir, cfg: DictConfig, n_train: int) -> int:
    """Run everything on this machine; returns the exit status (0 when results.h5 exists)."""
    # Here, not at the top: the launcher table (read by config validation) stays cheap.
    import torch

    workers = int(cfg.launcher.workers)
    cores = os.cpu_count() or 1
    threads = int(cfg.launcher.threads_per_worker or max(1, cores // workers))
    gpus = torch.cuda.device_count()
    units = run_units(cfg, n_train)
    quiet = {"SDI_PROGRESS": "0"}
    try:
        print(f"[sdi] query sketches ({len(cfg.checkpoints.paths)} checkpoints) ...", flush=True)
        code = _run_one(
            run, "query", job_command("query", run), quiet | {"SDI_THREADS": str(cores)}
        )
        if code != 0:
            return _failed(run, "query", code)
        todo = sum(not run.is_done(u) for u in units)
        print(
            f"[sdi] {workers} workers x {threads} threads"
            + (f" on {gpus} GPUs" if gpus else "")
            + f": {todo} of {len(units)} units to sketch",
            flush=True,
        )
        procs = []
        for rank in range(workers):
            env = quiet | {"SDI_THREADS": str(threads)}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(rank % gpus)
            cmd = job_command("worker", run, f"rank={rank}", f"world_size={workers}")
            procs.append(_start(run, f"worker-{rank:04d}", cmd, env))
        try:
            _follow(run, units, procs)
        except KeyboardInterrupt:
            print("\n[sdi] stopping workers after their current batch ...", flush=True)
            _stop(procs)
            print(f"[sdi] stopped. Run the same command again to resume {run.path}")
            return EXIT_CTRL_C
        failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
        if failed:
            for rank, code in failed:
                _failed(run, f"worker-{rank:04d}", code)
            return 1
        print("[sdi] merging ...", flush=True)
        code = _run_one(run, "merge", job_command("merge", run), {"SDI_THREADS": str(cores)})
        if code != 0:
            return _failed(run, "merge", code)
    except KeyboardInterrupt:
        print(f"\n[sdi] stopped. Run the same command again to resume {run.path}")
        return EXIT_CTRL_C
    return 0


def _follow(run: RunDir, units: list, procs: list[subprocess.Popen]) -> None:
    from tqdm.auto import tqdm

    done = sum(run.is_done(u) for u in units)
    with tqdm(total=len(units), initial=done, desc="units", unit="unit") as bar:
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
            now = sum(run.is_done(u) for u in units)
            bar.update(now - bar.n)
        bar.update(sum(run.is_done(u) for u in units) - bar.n)


def _failed(run: RunDir, name: str, code: int) -> int:
    log = Path(run.logs_dir / f"{name}.out")
    tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
    print(f"[sdi] {name} failed (exit {code}); log: {log}", file=sys.stderr)
    for line in tail:
        print(f"    {line}", file=sys.stderr)
    return code or 1
