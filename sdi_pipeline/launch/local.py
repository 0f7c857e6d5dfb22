"""The local launcher: query job, W parallel worker processes, then the merge.

Workers are separate processes running the same ``sdi-worker`` code as on a cluster. The
machine's cores are split between them (threads per worker), and with several GPUs each
worker sees one (CUDA_VISIBLE_DEVICES). One progress bar follows the units; Ctrl-C (or a
SIGTERM / SIGHUP to the launcher) asks the workers to stop after their current batch, and
running the same command again resumes.

The jobs die with their launcher: each is started with Linux's parent-death signal
(``PR_SET_PDEATHSIG``: SIGTERM when the launcher dies, even by SIGKILL), and the launcher
stops every job's process group on its way out. A failed job is reported in one line: the
job, its error line and its log.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sdi_pipeline.errors import EXIT_ATTENTION, EXIT_INTERRUPTED_BY_USER
from sdi_pipeline.files.atomic import ensure_dir, write_error, write_text_atomic
from sdi_pipeline.formats.shards import block_done
from sdi_pipeline.run.freshness import query_digests
from sdi_pipeline.run.rundir import Block, RunDir, run_blocks

# PR_SET_PDEATHSIG from <sys/prctl.h>.
_PR_SET_PDEATHSIG = 1
# Seconds the jobs get to finish their batch after a stop request before they are killed.
STOP_GRACE_S = 60.0


def worker_gpus(workers: int, gpus: int, visible: str | None) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` of each worker: one GPU each, round robin.

    ``gpus`` is how many CUDA devices this process sees and ``visible`` its own
    ``CUDA_VISIBLE_DEVICES``: a list there (indices, UUIDs or MIG ids) is respected, so a
    launcher limited to GPUs 2,3 gives its workers 2 and 3, never the machine's 0 and 1.
    With fewer GPUs than workers, workers share them; with none, an empty list.
    """
    if gpus <= 0:
        return []
    if visible is None:
        names = [str(i) for i in range(gpus)]
    else:
        # torch counts the entries up to the first it cannot use: the same ones here.
        names = [v.strip() for v in visible.split(",") if v.strip()][:gpus]
    return [names[rank % len(names)] for rank in range(workers)] if names else []


def job_command(job: str, run: RunDir, *extra: str) -> list[str]:
    """The command line of one job (the same entry points a user runs by hand)."""
    return [sys.executable, "-m", "sdi_pipeline.launch.cli", job, f"run_dir={run.path}", *extra]


def _record(run: RunDir, name: str, cmd: list[str], env: dict[str, str]) -> None:
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    write_text_atomic(run.path / "commands" / f"{name}.sh", f"{shown} {shlex.join(cmd)}\n".lstrip())


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when this process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the launcher died before the signal was armed
            os._exit(143)

    return preexec


class Jobs:
    """The launcher's child processes; each leads its own process group."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], env_extra: dict[str, str]) -> subprocess.Popen:
        _record(self.run, name, cmd, env_extra)
        path = self.run.logs_dir / f"{name}.out"
        try:
            log = open(path, "ab")  # noqa: SIM115 - owned by the child
        except OSError as err:
            mapped = write_error(path, err)
            if mapped is not None:
                raise mapped from err
            raise
        with log:
            proc = subprocess.Popen(
                cmd,
                env=os.environ | env_extra,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        self.procs.append(proc)
        return proc

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every live job's process group, wait up to ``grace_s``, then SIGKILL."""
        live = [p for p in self.procs if p.poll() is None]
        for p in live:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP to the launcher act as Ctrl-C: the jobs are stopped cleanly."""

    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def launch_local(run: RunDir, cfg: DictConfig, n_train: int) -> int:
    """Run everything on this machine; returns the exit status (0 when results.h5 exists)."""
    # Here, not at the top: the launcher table (read by config validation) stays cheap.
    import torch

    from sdi_pipeline.jobs.bif_worker import bif_block_done

    workers = int(cfg.launcher.workers)
    cores = os.cpu_count() or 1
    threads = int(cfg.launcher.threads_per_worker or max(1, cores // workers))
    # A CPU run leaves the GPUs alone; otherwise each worker is given its own one.
    gpus = torch.cuda.device_count() if cfg.runtime.device != "cpu" else 0
    devices = worker_gpus(workers, gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    blocks = run_blocks(cfg, n_train)
    store_train = bool(cfg.sketch.store_train)
    quiet = {"SDI_PROGRESS": "0"}
    ensure_dir(run.logs_dir)
    jobs = Jobs(run)
    try:
        with _stop_signals_interrupt():
            print(
                f"[sdi] query sketches ({len(cfg.checkpoints.paths)} checkpoints) ...", flush=True
            )
            code = _run_one(
                jobs, "query", job_command("query", run), quiet | {"SDI_THREADS": str(cores)}
            )
            if code != 0:
                return _failed(run, "query", code)
            queries = query_digests(run, len(cfg.checkpoints.paths))

            def done(block: Block) -> bool:
                if cfg.method == "bif":
                    return bif_block_done(
                        run, block, len(cfg.checkpoints.paths), int(cfg.bif.chains)
                    )
                return block_done(run, block, store_train, queries)

            todo = sum(not done(b) for b in blocks)
            print(
                f"[sdi] {workers} workers x {threads} threads"
                + (f" on {len(set(devices))} GPUs ({','.join(devices)})" if devices else "")
                + f": {todo} of {len(blocks)} blocks to sketch and score",
                flush=True,
            )
            procs = []
            for rank in range(workers):
                env = quiet | {"SDI_THREADS": str(threads)}
                if devices:
                    env["CUDA_VISIBLE_DEVICES"] = devices[rank]
                cmd = job_command("worker", run, f"rank={rank}", f"world_size={workers}")
                procs.append(jobs.start(f"worker-{rank:04d}", cmd, env))
            _follow(blocks, procs, done)
            failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
            if failed:
                for rank, code in failed:
                    _failed(run, f"worker-{rank:04d}", code)
                return EXIT_ATTENTION
            print("[sdi] merging ...", flush=True)
            code = _run_one(jobs, "merge", job_command("merge", run), {"SDI_THREADS": str(cores)})
            if code != 0:
                return _failed(run, "merge", code)
    except KeyboardInterrupt:
        print("\n[sdi] stopping the jobs after their current batch ...", flush=True)
        jobs.stop()
        print(f"[sdi] stopped. Run the same command again to resume {run.path}", flush=True)
        return EXIT_INTERRUPTED_BY_USER
    finally:
        jobs.stop(grace_s=10.0)  # nothing outlives the launcher
    return 0


def _run_one(jobs: Jobs, name: str, cmd: list[str], env: dict[str, str]) -> int:
    return jobs.start(name, cmd, env).wait()


def _follow(
    blocks: list[Block], procs: list[subprocess.Popen], done: Callable[[Block], bool]
) -> None:
    from tqdm.auto import tqdm

    with tqdm(
        total=len(blocks), initial=sum(map(done, blocks)), desc="blocks", unit="block"
    ) as bar:
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
            bar.update(sum(map(done, blocks)) - bar.n)
        bar.update(sum(map(done, blocks)) - bar.n)


def job_error(log: Path) -> str | None:
    """The ``error:`` line a job printed last (its one-line SDIError), if any."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    errors = [line for line in lines if line.startswith("error: ")]
    return errors[-1][len("error: ") :] if errors else None


def _failed(run: RunDir, name: str, code: int) -> int:
    """One line on stderr: which job failed, its error (or exit status), and its log; the
    launcher's exit status for a failed job (whatever the job's own)."""
    log = Path(run.logs_dir / f"{name}.out")
    error = job_error(log)
    if error is not None:
        print(f"error: {name} failed: {error} (log: {log})", file=sys.stderr)
        return EXIT_ATTENTION
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
    tail = []
    with suppress(OSError):
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
    last = f"; last output: {tail[0].strip()[:200]}" if tail else ""
    print(f"error: {name} failed ({how}){last}; full log: {log}", file=sys.stderr)
    return EXIT_ATTENTION
