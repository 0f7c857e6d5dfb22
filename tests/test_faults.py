"""Fault tests: kills at every stage, corrupted files, bad inputs, concurrency.

Every case asserts what the user sees -- the exit status and one ``error:`` line naming the
thing and the fix, never a traceback -- and, after the recovery a user would do (usually the
same command again), a results.h5 whose arrays equal a clean run's. docs/reliability.md has
the table of these cases and their outcomes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from conftest import make_model
from pipeline_helpers import (
    cli_overrides,
    run_all,
    token_overrides,
    toy_config,
    write_toy_checkpoints,
)

from sdi_pipeline.errors import ConfigError, MergeRefused, RunDirError, SDIError
from sdi_pipeline.formats.results import Results
from sdi_pipeline.jobs.merge import run_merge
from sdi_pipeline.jobs.query import run_query
from sdi_pipeline.jobs.worker import run_worker
from sdi_pipeline.launch import attribute_cli, cli
from sdi_pipeline.launch.status import format_status, run_status
from sdi_pipeline.run import config
from sdi_pipeline.run.leases import Lease, acquire
from sdi_pipeline.run.rundir import RunDir, prepare_run

pytestmark = pytest.mark.faults

TESTS = Path(__file__).parent
# Subprocesses import the helpers here and this checkout's sdi_pipeline (not an installed one).
SUBPROCESS_PATH = os.pathsep.join([str(TESTS), str(TESTS.parent)])
SLOW_LOSS = {"loss": {"_target_": "pipeline_helpers.slow_parity_loss", "_partial_": True}}
UNITS = [f"ckpt-{k:03d}_block-{b:05d}" for b in range(3) for k in range(2)]


# --- helpers ----------------------------------------------------------------------------------


def arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a results.h5 but per-unit timings and the record of its inputs."""
    found: dict[str, np.ndarray] = {}

    def keep(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and not name.startswith(("diagnostics/units", "inputs")):
            found[name] = obj[()]

    with h5py.File(path, "r") as f:
        f.visititems(keep)
    return found


def assert_same(path: Path, ref: dict[str, np.ndarray]) -> None:
    got = arrays(path)
    assert got.keys() == ref.keys()
    for name, values in ref.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)


def error_line(stderr: str) -> str:
    """The one ``error:`` line of a command's stderr (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def cli_run(
    main: Callable[[], None], argv: list[str], capsys: Any, monkeypatch: Any
) -> tuple[int, str, str]:
    """Run a CLI entry point in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["sdi", *argv])
    with pytest.raises(SystemExit) as done:
        main()
    out = capsys.readouterr()
    return int(done.value.code or 0), out.out, out.err


def refused(capsys: Any, monkeypatch: Any, main: Callable[[], None], argv: list[str]) -> str:
    """A CLI that exits 2 with one error line; returns the line."""
    code, _, err = cli_run(main, argv, capsys, monkeypatch)
    assert code == 2, err
    return error_line(err)


def recover(run: RunDir) -> None:
    """What a user runs after fixing something by hand: the three jobs again."""
    assert run_query(run.path) == 0
    assert run_worker(run.path, 0, 1) == 0
    assert run_merge(run.path) == 0


def spawn(job: str, run: RunDir, *args: str, **env: str) -> subprocess.Popen:
    """A job in a subprocess (with the fault hooks of tests/fault_hooks.py)."""
    return subprocess.Popen(
        [sys.executable, "-c", f"import fault_hooks; fault_hooks.main({job!r})",
         f"run_dir={run.path}", *args],
        env=os.environ | {"PYTHONPATH": SUBPROCESS_PATH} | env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for(condition: Callable[[], bool], *procs: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for p in procs:
            if p.poll() is not None:
                out, err = p.communicate()
                pytest.fail(f"process ended early ({p.returncode}):\n{out}\n{err}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.communicate()


def temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp-*"))


def overwrite_checkpoint(path: Path, seed: int) -> None:
    """The same file name, other weights (as a training script overwriting it would)."""
    data = torch.load(path, weights_only=True)
    data["model_state_dict"] = make_model(seed=seed).state_dict()
    torch.save(data, path)


def corrupt_chunk(path: Path, dataset: str = "sketch") -> None:
    """Garbage bytes inside a dataset's data, the HDF5 header intact."""
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 64 : offset + 64 + 4096] = os.urandom(4096)  # 4 KiB inside the first chunk
    path.write_bytes(bytes(data))


def marker_times(run: RunDir) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in run.completions_dir.iterdir()}


def log_text(run: RunDir, name: str) -> str:
    return (run.logs_dir / f"{name}.log").read_text()


# --- references: clean runs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_ref(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """The arrays of a clean run of the toy config (2 checkpoints, 3 blocks, 5 queries)."""
    return arrays(run_all(toy_config(tmp_path_factory.mktemp("toy-ref"))).results_path)


def prepared_cli_run(tmp: Path, *extra: str) -> RunDir:
    """``sdi-attribute launcher=prepare`` with the CLI's toy overrides: the run dir."""
    assert attribute_cli.run(cli_overrides(tmp, "launcher=prepare", *extra)) == 0
    (path,) = (tmp / "runs" / "toy-parity").iterdir()
    return RunDir(path)


@pytest.fixture(scope="module")
def cli_ref(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """The arrays of a clean run of sdi-attribute's toy overrides (tests/pipeline_helpers)."""
    run = prepared_cli_run(tmp_path_factory.mktemp("cli-ref"))
    recover(run)
    return arrays(run.results_path)


TOKENS_MODEL = {"analysis": {"loss": {"_target_": "sdi_pipeline.inputs.losses.next_token_loss",
                                      "_partial_": True}}}  # fmt: skip


def token_rows(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, (40, 7)), rng.integers(0, 3, (5, 7))


def tokens_config(tmp: Path, train: np.ndarray, query: np.ndarray, **sections: Any) -> dict:
    """The toy model on token arrays saved as .npy files in ``tmp``."""
    np.save(tmp / "train.npy", train)
    np.save(tmp / "query.npy", query)
    data = {
        "train": {
            "_target_": "sdi_pipeline.inputs.data.token_dataset",
            "path": str(tmp / "train.npy"),
        },
        "query": {
            "_target_": "sdi_pipeline.inputs.data.token_dataset",
            "path": str(tmp / "query.npy"),
        },
        "collate": {"_target_": "sdi_pipeline.inputs.data.PadCollate", "pad_id": 0},
    }
    return toy_config(tmp, data=data, **TOKENS_MODEL, **sections)


# --- kills ------------------------------------------------------------------------------------


def test_worker_killed_mid_write_leaves_no_half_unit(tmp_path, toy_ref) -> None:
    run = prepare_run(toy_config(tmp_path))
    assert run_query(run.path) == 0
    flag, name = tmp_path / "paused", "ckpt-001_block-00000"
    proc = spawn("worker", run, "rank=0", "world_size=1",
                 SDI_TEST_PAUSE_WRITE=f"{name}.h5", SDI_TEST_PAUSE_FLAG=str(flag))  # fmt: skip
    wait_for(flag.exists, proc)
    kill(proc)  # SIGKILL while the unit's file is written but not yet renamed
    assert not run.unit_path_named(name).exists() and not run.marker_path_named(name).exists()
    (half,) = temps(run.units_dir)
    assert run.lease_path("block-00000").exists()  # its owner is dead: taken over at once
    assert run_worker(run.path, 0, 1) == 0
    assert not half.exists() and not temps(run.units_dir)  # cleaned on the next run
    assert "taking over block-00000" in log_text(run, "worker-0000")
    assert run_merge(run.path) == 0
    assert_same(run.results_path, toy_ref)


def test_worker_killed_mid_unit_its_lease_is_taken_over_at_once(
    tmp_path, toy_ref, monkeypatch
) -> None:
    run = prepare_run(toy_config(tmp_path, analysis=SLOW_LOSS))
    assert run_query(run.path) == 0
    proc = spawn("worker", run, "rank=0", "world_size=1", SDI_TEST_BATCH_SECONDS="0.2")
    wait_for(run.marker_path_named(UNITS[0]).exists, proc)  # into its second unit
    kill(proc)
    monkeypatch.setenv("SDI_TEST_BATCH_SECONDS", "0")
    start = time.monotonic()
    assert run_worker(run.path, 0, 1) == 0
    assert time.monotonic() - start < 30  # no waiting for a lease timeout: the pid is gone
    assert "taking over block-00000" in log_text(run, "worker-0000")
    assert "process" in log_text(run, "worker-0000").split("taking over block-00000")[1]
    assert run_merge(run.path) == 0
    assert_same(run.results_path, toy_ref)


def test_merge_killed_mid_write_keeps_the_old_results_and_no_half_file(tmp_path, toy_ref) -> None:
    run = run_all(toy_config(tmp_path))
    before = run.results_path.read_bytes()
    flag = tmp_path / "paused"
    proc = spawn("merge", run, SDI_TEST_PAUSE_ROWS="1", SDI_TEST_PAUSE_FLAG=str(flag))
    wait_for(flag.exists, proc)  # results.h5 half written under its temporary name
    kill(proc)
    assert run.results_path.read_bytes() == before
    assert len(temps(run.path)) == 1
    assert run_merge(run.path) == 0
    assert not temps(run.path)
    assert_same(run.results_path, toy_ref)


def test_query_job_killed_mid_write(tmp_path, toy_ref) -> None:
    run = prepare_run(toy_config(tmp_path))
    flag = tmp_path / "paused"
    proc = spawn("query", run, SDI_TEST_PAUSE_WRITE="ckpt-001.h5", SDI_TEST_PAUSE_FLAG=str(flag))
    wait_for(flag.exists, proc)
    kill(proc)
    assert run.query_path(0).exists() and not run.query_path(1).exists()
    assert len(temps(run.query_dir)) == 1
    recover(run)
    assert not temps(run.query_dir)
    assert "query sketches for checkpoint 0 exist" in log_text(run, "query")
    assert_same(run.results_path, toy_ref)


def _launcher(tmp_path: Path, *extra: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from sdi_pipeline.launch.attribute_cli import main; main()",
         *cli_overrides(tmp_path, *extra)],
        env=os.environ | {"PYTHONPATH": SUBPROCESS_PATH} | env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _worker_pids(run_path: Path) -> list[int]:
    return [
        json.loads(p.read_text())["pid"]
        for p in (run_path / "leases").glob("block-*")
        if p.read_text().strip()
    ]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie (exited, not yet reaped by its orphaned parent) counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_second_launch_is_told_and_a_killed_launcher_takes_its_jobs_along(
    tmp_path, cli_ref, capsys, monkeypatch
) -> None:
    slow = "analysis.loss._target_=pipeline_helpers.slow_parity_loss"
    first = _launcher(tmp_path, slow, "launcher.workers=2", SDI_TEST_BATCH_SECONDS="0.5")
    runs = tmp_path / "runs" / "toy-parity"
    wait_for(lambda: runs.is_dir() and any(_worker_pids(p) for p in runs.iterdir()), first)
    (run_path,) = runs.iterdir()
    wait_for(lambda: len(_worker_pids(run_path)) == 2, first)
    pids = _worker_pids(run_path)
    # A second launch of the same config while the first runs: told, nothing started.
    monkeypatch.setenv("PYTHONPATH", SUBPROCESS_PATH)
    line = refused(capsys, monkeypatch, attribute_cli.main, cli_overrides(tmp_path, slow))
    assert f"run {run_path} is already being run by sdi-attribute (pid {first.pid}" in line
    assert f"or stop it (kill {first.pid}" in line and "run the same command again" in line
    assert sorted(_worker_pids(run_path)) == sorted(pids)
    # The launcher is killed outright: its workers die with it (parent-death signal).
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()
    deadline = time.monotonic() + 30
    while not all(_gone(p) for p in pids):
        assert time.monotonic() < deadline, "workers outlived their launcher"
        time.sleep(0.1)
    # The same command again takes over the dead launcher's lock and the workers' leases.
    monkeypatch.setenv("SDI_TEST_BATCH_SECONDS", "0")
    code, out, err = cli_run(
        attribute_cli.main,
        [*cli_overrides(tmp_path, slow), "launcher.workers=1"],
        capsys,
        monkeypatch,
    )
    assert code == 0, out + err
    assert_same(run_path / "results.h5", cli_ref)


def test_exit_status_tells_refused_failed_and_interrupted_apart(tmp_path, cli_ref) -> None:
    """One convention (docs/reliability.md, "Exit status"): 2 a user error refused before any
    job started, 1 a job failed (named with its error and log), 130 interrupted, 0 done."""
    bug = "analysis.loss._target_=pipeline_helpers.worker_bug_parity_loss"
    flag = tmp_path / "bug"
    flag.touch()
    refused_run = _launcher(tmp_path, bug, "launcher.workers=0")
    _, err = refused_run.communicate()
    assert refused_run.returncode == 2 and "launcher.workers must be at least 1" in error_line(err)
    assert not (tmp_path / "runs").exists()

    failing = _launcher(tmp_path, bug, "launcher.workers=1", SDI_TEST_BUG=str(flag))
    _, err = failing.communicate()
    assert failing.returncode == 1, err
    (run_path,) = (tmp_path / "runs" / "toy-parity").iterdir()
    assert error_line(err) == (
        f"error: worker-0000 failed: unit {UNITS[0]} failed: IndexError: index out of range in "
        "self (in the model, loss, collate or dataset code; the traceback is in "
        f"{run_path / 'logs' / 'worker-0000.log'}) (log: {run_path / 'logs' / 'worker-0000.out'})"
    )

    slow = _launcher(
        tmp_path, "analysis.loss._target_=pipeline_helpers.slow_parity_loss",
        "launcher.workers=1", SDI_TEST_BATCH_SECONDS="0.5",
    )  # fmt: skip
    runs = tmp_path / "runs" / "toy-parity"
    wait_for(lambda: any(_worker_pids(p) for p in runs.iterdir() if p != run_path), slow)
    slow.send_signal(signal.SIGTERM)
    out, err = slow.communicate()
    assert slow.returncode == 130, out + err
    assert "Run the same command again to resume" in out and "Traceback" not in err

    flag.unlink()  # the user's fix, then the same command
    done = _launcher(tmp_path, bug, "launcher.workers=1", SDI_TEST_BUG=str(flag))
    out, err = done.communicate()
    assert done.returncode == 0, out + err
    assert_same(run_path / "results.h5", cli_ref)


def test_a_frozen_worker_loses_its_unit_after_the_lease_timeout(
    tmp_path, toy_ref, monkeypatch
) -> None:
    cfg = toy_config(tmp_path, analysis=SLOW_LOSS, runtime={"lease_timeout_s": 2.0})
    run = prepare_run(cfg)
    assert run_query(run.path) == 0
    proc = spawn("worker", run, "rank=0", "world_size=1", SDI_TEST_BATCH_SECONDS="0.3")
    try:
        wait_for(lambda: run.lease_path("block-00000").exists(), proc)
        proc.send_signal(signal.SIGSTOP)  # alive but silent: no more heartbeats
        monkeypatch.setenv("SDI_TEST_BATCH_SECONDS", "0")
        assert run_worker(run.path, 0, 1) == 0
        log = log_text(run, "worker-0000")
        assert "taking over block-00000" in log and "silent for" in log
    finally:
        kill(proc)
    assert run_merge(run.path) == 0
    assert_same(run.results_path, toy_ref)


# --- concurrency ------------------------------------------------------------------------------


def _done_units(run: RunDir) -> list[str]:
    """The units every worker logged as done (each worker appends to logs/worker-RRRR.log)."""
    return [
        line.split(" done ")[1].split(":")[0]
        for log in run.logs_dir.glob("worker-*.log")
        for line in log.read_text().splitlines()
        if " done " in line
    ]


def _finished(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, out + err


def test_duplicate_ranks_compute_each_unit_once(tmp_path, toy_ref, monkeypatch) -> None:
    run = prepare_run(toy_config(tmp_path, analysis=SLOW_LOSS))
    assert run_query(run.path) == 0
    proc = spawn("worker", run, "rank=0", "world_size=1", SDI_TEST_BATCH_SECONDS="0.2")
    wait_for(lambda: run.lease_path("block-00000").exists(), proc)
    monkeypatch.setenv("SDI_TEST_BATCH_SECONDS", "0.05")
    assert run_worker(run.path, 0, 1) == 0  # the same rank again, in this process
    _finished(proc)
    assert sorted(_done_units(run)) == sorted(UNITS)  # each unit once, by one of them
    assert "is being computed by worker-0000" in log_text(run, "worker-0000")
    assert run_merge(run.path) == 0
    assert_same(run.results_path, toy_ref)


def test_mismatched_world_sizes_compute_each_unit_once_and_are_named(
    tmp_path, toy_ref, monkeypatch
) -> None:
    run = prepare_run(toy_config(tmp_path, analysis=SLOW_LOSS))
    assert run_query(run.path) == 0
    proc = spawn("worker", run, "rank=0", "world_size=2", SDI_TEST_BATCH_SECONDS="0.2")
    wait_for(lambda: run.lease_path("block-00000").exists(), proc)
    monkeypatch.setenv("SDI_TEST_BATCH_SECONDS", "0.05")
    assert run_worker(run.path, 2, 3) == 0  # 2/3 overlaps 0/2 in block 2
    _finished(proc)
    # 0/2 takes blocks 0 and 2, 2/3 takes block 2: block 2 once, block 1 by nobody.
    assert sorted(_done_units(run)) == sorted(UNITS[i] for i in (0, 1, 4, 5))
    with pytest.raises(MergeRefused) as err:
        run_merge(run.path)
    assert f"2 of 6 units not done: {UNITS[2]}, {UNITS[3]}" in str(err.value)
    assert "workers ran with world sizes 2, 3: run every rank 0..W-1 of one" in str(err.value)
    assert run_worker(run.path, 1, 2) == 0  # the missing rank of world size 2
    assert "units of this run were done by workers with world size 3" in log_text(
        run, "worker-0001"
    )
    assert run_merge(run.path) == 0
    assert_same(run.results_path, toy_ref)


def test_a_bug_in_the_users_loss_is_one_line_with_its_traceback_in_the_log(
    tmp_path, toy_ref, capsys, monkeypatch
) -> None:
    loss = {"loss": {"_target_": "pipeline_helpers.buggy_parity_loss", "_partial_": True}}
    run = prepare_run(toy_config(tmp_path, analysis=loss))
    assert run_query(run.path) == 0
    flag = tmp_path / "bug"
    flag.touch()
    monkeypatch.setenv("SDI_TEST_BUG", str(flag))
    line = refused(capsys, monkeypatch, cli.worker_main, [f"run_dir={run.path}"])
    log = run.logs_dir / "worker-0000.log"
    assert line == (
        f"error: unit {UNITS[0]} failed: IndexError: index out of range in self (in the model, "
        f"loss, collate or dataset code; the traceback is in {log})"
    )
    assert "Traceback" in log.read_text()
    assert run_status(run).failed[UNITS[0]]["error"].startswith("IndexError")
    flag.unlink()  # the user fixes the code
    recover(run)
    assert not run_status(run).failed
    assert_same(run.results_path, toy_ref)


def test_a_unit_leased_by_a_live_job_is_named_by_status_and_the_merge(tmp_path, toy_ref) -> None:
    run = run_all(toy_config(tmp_path))
    run.results_path.unlink()
    run.marker_path_named(UNITS[2]).unlink()  # as if being recomputed right now
    lease = acquire(run.lease_path("block-00001"), "worker-0007")
    assert isinstance(lease, Lease)
    try:
        status = run_status(run)
        assert f"worker-0007 (pid {os.getpid()}" in status.running[UNITS[2]]
        assert f"RUNNING {UNITS[2]}: worker-0007" in format_status(run, status)
        with pytest.raises(MergeRefused) as err:  # the merge waits for nothing, names it
            run_merge(run.path)
        assert f"1 of 6 units not done: {UNITS[2]} (being computed now: {UNITS[2]} by " in str(
            err.value
        )
    finally:
        lease.release()
    recover(run)
    assert_same(run.results_path, toy_ref)


def test_leases_work_on_a_filesystem_without_hard_links(tmp_path, toy_ref, monkeypatch) -> None:
    def no_links(*args: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    run = run_all(toy_config(tmp_path))
    assert not list(run.leases_dir.iterdir())  # every lease taken and released
    assert_same(run.results_path, toy_ref)


# --- corrupted and changed files --------------------------------------------------------------


def test_an_overwritten_checkpoint_makes_its_units_and_results_stale(tmp_path) -> None:
    run = run_all(toy_config(tmp_path))
    ckpt = tmp_path / "ckpts" / "ckpt-000001.pt"
    overwrite_checkpoint(ckpt, seed=7)
    with pytest.raises(RunDirError, match=r"results\.h5 is stale: checkpoint 1 .* changed since"):
        Results.open(run.path)
    with Results.open(run.path, allow_stale=True) as res:  # still readable on request
        assert res.n_train == 40
    status = run_status(run)
    assert sorted(status.stale) == [u for u in UNITS if u.startswith("ckpt-001")]
    assert "its checkpoint changed" in status.stale[UNITS[1]]
    assert "results.h5: STALE" in format_status(run, status)
    with pytest.raises(MergeRefused) as err:
        run_merge(run.path)
    assert "query/ckpt-001.h5 is stale (its checkpoint changed" in str(err.value)
    assert "stale units, markers removed: ckpt-001_block-00000" in str(err.value)
    assert "\n" not in str(err.value)
    kept = {n: t for n, t in marker_times(run).items() if n.startswith("ckpt-000")}
    recover(run)
    assert {n: t for n, t in marker_times(run).items() if n.startswith("ckpt-000")} == kept
    fresh_cfg = toy_config(tmp_path / "fresh")  # writes the original checkpoints there
    overwrite_checkpoint(tmp_path / "fresh" / "ckpts" / "ckpt-000001.pt", seed=7)
    fresh = run_all(fresh_cfg)
    assert_same(run.results_path, arrays(fresh.results_path))
    Results.open(run.path).close()  # up to date again


def test_deleting_a_unit_and_its_marker_after_a_checkpoint_change_does_not_loop(
    tmp_path, toy_ref
) -> None:
    """The merge's advice for a mismatching unit is to delete it and its marker; the next
    run must then recompute it, and the query file, with the current checkpoint."""
    run = run_all(toy_config(tmp_path))
    ckpt = tmp_path / "ckpts" / "ckpt-000001.pt"
    original = ckpt.read_bytes()
    overwrite_checkpoint(ckpt, seed=7)
    assert run_worker(run.path, 0, 1) == 0  # units recomputed, the query file not yet
    run.unit_path_named(UNITS[1]).unlink()
    run.marker_path_named(UNITS[1]).unlink()
    ckpt.write_bytes(original)  # and the user restores the old checkpoint after all
    recover(run)
    assert_same(run.results_path, toy_ref)


def test_a_touched_checkpoint_is_hashed_again_but_nothing_is_recomputed(tmp_path) -> None:
    run = run_all(toy_config(tmp_path))
    before = marker_times(run)
    ckpt = tmp_path / "ckpts" / "ckpt-000000.pt"
    os.utime(ckpt, (time.time() + 60, time.time() + 60))
    Results.open(run.path).close()  # same sha256: not stale
    recover(run)
    assert marker_times(run) == before
    cache = json.loads(run.digest_cache_path.read_text())
    assert cache[str(ckpt)]["stat"][0][1] == ckpt.stat().st_mtime_ns  # per file: one here


def test_checkpoints_deleted_after_the_run_leave_the_results_usable(
    tmp_path, toy_ref, capsys, monkeypatch
) -> None:
    run = run_all(toy_config(tmp_path))
    shutil.rmtree(tmp_path / "ckpts")  # cleaned up to save space: nothing changed
    with Results.open(run.path) as res:
        assert res.n_query == 5
    code, out, _ = cli_run(cli.status_main, [f"run_dir={run.path}"], capsys, monkeypatch)
    assert code == 0 and "checkpoint missing: " in out and "results.h5: written, up to date" in out
    assert_same(run.results_path, toy_ref)


def test_changed_training_data_of_the_same_size_recomputes_its_block(
    tmp_path, capsys, monkeypatch
) -> None:
    train, query = token_rows()
    run = run_all(tokens_config(tmp_path, train, query))
    before = marker_times(run)
    old_tracin = np.asarray(Results.open(run.path).tracin)
    os.utime(tmp_path / "query.npy")  # touched, same bytes: nothing changed
    assert "results.h5: written, up to date" in format_status(run, run_status(run))
    train[20, 3] = 2 - train[20, 3]  # one token of example 20 (block 1), same shape
    np.save(tmp_path / "train.npy", train)
    # The cheap paths see the file changed (a stat, then its digest), without the dataset.
    with pytest.raises(RunDirError) as stale:
        Results.open(run.path)
    message = str(stale.value)
    assert "\n" not in message
    assert f"data.train file {tmp_path / 'train.npy'} changed since the merge (sha256 " in message
    assert "Run the same sdi-attribute command again" in message and "allow_stale=True" in message
    with Results.open(run.path, allow_stale=True) as res:  # the old numbers, on request
        np.testing.assert_array_equal(np.asarray(res.tracin), old_tracin)
    code, out, _ = cli_run(cli.status_main, [f"run_dir={run.path}"], capsys, monkeypatch)
    assert code == 1 and "results.h5: STALE (data.train file " in out
    assert run_status(run).stale == {}  # which blocks changed needs the data: verify=true
    status = run_status(run, verify=True)
    assert sorted(status.stale) == ["ckpt-000_block-00001", "ckpt-001_block-00001"]
    assert "training examples 16..31 changed" in status.stale["ckpt-000_block-00001"]
    assert status.results_stale
    recover(run)
    log = log_text(run, "worker-0000")
    assert "stale: ckpt-000_block-00001: training examples 16..31 changed" in log
    after = marker_times(run)
    assert {n for n in after if after[n] != before[n]} == set(status.stale)
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    fresh = run_all(tokens_config(fresh_dir, train, query))
    assert_same(run.results_path, arrays(fresh.results_path))


def test_changed_query_data_rescores_every_block_without_sketching(tmp_path) -> None:
    """The query examples change under the same config: the query job recomputes its files,
    every shard is rescored against them, no train sketch is computed again."""
    train, query = token_rows()
    run = run_all(tokens_config(tmp_path, train, query))
    before = marker_times(run)
    query[2, 1] = 2 - query[2, 1]
    np.save(tmp_path / "query.npy", query)
    recover(run)
    assert "the query sketches changed since it was scored" in log_text(run, "worker-0000")
    assert marker_times(run) == before
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    fresh = run_all(tokens_config(fresh_dir, train, query))
    assert_same(run.results_path, arrays(fresh.results_path))


def test_garbage_inside_a_unit_is_named_and_recomputed(
    tmp_path, toy_ref, capsys, monkeypatch
) -> None:
    run = run_all(toy_config(tmp_path))
    name = "ckpt-000_block-00001"
    corrupt_chunk(run.unit_path_named(name))
    # The merge reads train sketches only to score a block nobody scored (a new query set).
    run.shard_path(1).unlink()
    assert name in run_status(run).done  # the cheap status reads headers only
    status = run_status(run, verify=True)
    assert "fails the Fletcher-32 checksum" in status.corrupt[name]
    assert f"delete {run.unit_path_named(name)}" in status.corrupt[name]
    line = refused(capsys, monkeypatch, cli.merge_main, [f"run_dir={run.path}"])
    assert f"corrupt units, markers removed: {name}" in line
    assert "fails the Fletcher-32 checksum" in line and "run the same sdi-attribute command" in line
    assert not run.marker_path_named(name).exists()
    with pytest.raises(RunDirError, match=f"unit {name} is no longer done"):
        Results.open(run.path)  # the old results.h5 is not handed out as current
    recover(run)
    assert_same(run.results_path, toy_ref)


def test_garbage_inside_a_query_file_is_recomputed(tmp_path, toy_ref) -> None:
    run = run_all(toy_config(tmp_path))
    corrupt_chunk(run.query_path(0))
    with pytest.raises(MergeRefused, match=r"query/ckpt-000\.h5 is corrupt: its data fails"):
        run_merge(run.path)
    assert not run.query_path(0).exists()  # removed, so the query job redoes it
    corrupt_chunk(run.query_path(1))  # the query job itself verifies its files too
    recover(run)
    assert "stale: ckpt-001.h5" in log_text(run, "query")
    assert_same(run.results_path, toy_ref)


def test_nan_in_a_unit_with_valid_checksums_is_refused(tmp_path, toy_ref) -> None:
    run = run_all(toy_config(tmp_path))
    name = "ckpt-001_block-00002"
    with h5py.File(run.unit_path_named(name), "r+") as f:
        f["sketch"][0, 0, 0] = np.nan  # HDF5 computes a valid checksum for it
    size = run.unit_path_named(name).stat().st_size
    marker = json.loads(run.marker_path_named(name).read_text())
    marker["file_size"] = size
    run.marker_path_named(name).write_text(json.dumps(marker))
    run.shard_path(2).unlink()  # scored again (by the merge): it reads the unit
    with pytest.raises(MergeRefused, match=f"{name}.h5 is corrupt: it holds NaN or inf values"):
        run_merge(run.path)
    recover(run)
    assert_same(run.results_path, toy_ref)


def test_a_truncated_unit_is_corrupt_in_status_and_recomputed(
    tmp_path, toy_ref, capsys, monkeypatch
) -> None:
    run = run_all(toy_config(tmp_path))
    path = run.unit_path_named(UNITS[2])
    path.write_bytes(path.read_bytes()[:3000])
    code, out, err = cli_run(cli.status_main, [f"run_dir={run.path}"], capsys, monkeypatch)
    assert code == 1 and "Traceback" not in err
    assert f"CORRUPT {UNITS[2]}: {path} has 3000 bytes, its marker says" in out
    assert "1 corrupt" in out and "fix: run the same sdi-attribute command again" in out
    line = refused(capsys, monkeypatch, cli.merge_main, [f"run_dir={run.path}"])
    assert f"{UNITS[2]}.h5 is not a readable HDF5 file" in line
    recover(run)
    assert_same(run.results_path, toy_ref)


def test_a_truncated_completion_marker(tmp_path, toy_ref, capsys, monkeypatch) -> None:
    run = run_all(toy_config(tmp_path))
    marker = run.marker_path_named(UNITS[3])
    marker.write_text(marker.read_text()[:25])
    status = run_status(run)
    assert "is not valid JSON (truncated" in status.corrupt[UNITS[3]]
    line = refused(capsys, monkeypatch, cli.merge_main, [f"run_dir={run.path}"])
    assert f"completion marker {marker} is not valid JSON" in line
    assert run_worker(run.path, 0, 1) == 0  # the worker redoes the unit
    assert json.loads(marker.read_text())["unit"] == UNITS[3]
    assert run_merge(run.path) == 0
    assert_same(run.results_path, toy_ref)


def test_a_unit_deleted_under_its_marker_is_recomputed(tmp_path, toy_ref) -> None:
    run = run_all(toy_config(tmp_path))
    run.unit_path_named(UNITS[4]).unlink()
    with pytest.raises(MergeRefused, match=f"1 of 6 units not done: {UNITS[4]}"):
        run_merge(run.path)
    recover(run)
    assert_same(run.results_path, toy_ref)


def test_a_unit_of_an_older_format_is_recomputed(tmp_path, toy_ref) -> None:
    run = run_all(toy_config(tmp_path))
    for name in UNITS[:2]:
        with h5py.File(run.unit_path_named(name), "r+") as f:
            f.attrs["format_version"] = 1
    assert run_worker(run.path, 0, 1) == 0  # the worker finds the first and redoes it
    assert "stale: ckpt-000_block-00000: it has format version 1" in log_text(run, "worker-0000")
    for name in UNITS[:2]:
        with h5py.File(run.unit_path_named(name), "r+") as f:
            f.attrs["format_version"] = 1
    with pytest.raises(MergeRefused, match=r"ckpt-000_block-00000, ckpt-001_block-00000 \(it "):
        run_merge(run.path)  # the merge names both, and removes their markers
    assert run_worker(run.path, 0, 1) == 0
    assert run_merge(run.path) == 0
    assert_same(run.results_path, toy_ref)


def test_temporary_files_of_killed_writers_are_removed(tmp_path, toy_ref) -> None:
    run = prepare_run(toy_config(tmp_path))
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    killed = run.units_dir / f".{UNITS[0]}.h5.tmp-{host}-{dead}-0123abcd"
    live = run.units_dir / f".{UNITS[1]}.h5.tmp-{host}-{os.getpid()}-0123abcd"
    foreign = run.query_dir / ".ckpt-000.h5.tmp-elsewhere-1-0123abcd"
    for p in (killed, live, foreign):
        p.write_bytes(b"half")
    os.utime(foreign, (time.time() - 7 * 3600,) * 2)  # untouched for hours
    recover(run)
    assert not killed.exists() and not foreign.exists()
    assert live.exists()  # a writer still alive keeps its file
    live.unlink()
    assert_same(run.results_path, toy_ref)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda t: "model:\n  _target_: [unclosed\n", "is damaged: not valid YAML (line 3"),
        (lambda t: t[:100], "is damaged: it has no schema_version"),
        (lambda t: "", "is damaged: it has no schema_version"),
    ],
    ids=["bad-yaml", "truncated", "empty"],
)
def test_a_broken_config_yaml(tmp_path, cli_ref, capsys, monkeypatch, damage, message) -> None:
    run = prepared_cli_run(tmp_path)
    run.config_path.write_text(damage(run.config_path.read_text()))
    for main, args in (
        (cli.worker_main, ["rank=0", "world_size=1"]),
        (cli.query_main, []),
        (cli.merge_main, []),
        (cli.status_main, []),
    ):
        line = refused(capsys, monkeypatch, main, [f"run_dir={run.path}", *args])
        assert f"{run.config_path} {message}" in line, line
        assert "run the same sdi-attribute command again to rewrite it" in line
    assert prepared_cli_run(tmp_path).path == run.path  # the same command rewrites it
    recover(run)
    assert_same(run.results_path, cli_ref)


def test_a_damaged_config_hash_is_restored_by_the_same_command(
    tmp_path, cli_ref, capsys, monkeypatch
) -> None:
    run = prepared_cli_run(tmp_path)
    run.hash_path.write_text("garbage")
    line = refused(capsys, monkeypatch, cli.query_main, [f"run_dir={run.path}"])
    assert f"{run.hash_path} is damaged" in line and "run the same sdi-attribute command" in line
    prepared_cli_run(tmp_path)
    recover(run)
    assert_same(run.results_path, cli_ref)


# --- disks that cannot be written -------------------------------------------------------------


def _unshare_works(*flags: str) -> bool:
    probe = subprocess.run(["unshare", *flags, "true"], capture_output=True, check=False)
    return shutil.which("unshare") is not None and probe.returncode == 0


# One Python process in a private mount namespace, with the run dir on a small tmpfs: it
# prepares the run and its query files, runs sdi-worker's entry point (capturing its stderr),
# checks what was left, then remounts with room and recovers.
DISK_SCRIPT = """
import io, json, shutil, subprocess, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from pipeline_helpers import toy_config
from sdi_pipeline.launch import cli
from sdi_pipeline.jobs.query import run_query
from sdi_pipeline.jobs.worker import run_worker
from sdi_pipeline.jobs.merge import run_merge
from sdi_pipeline.run.rundir import prepare_run
from sdi_pipeline.formats.sketches import read_meta

disk, out = Path({disk!r}), Path({out!r})
subprocess.run(["mount", "-t", "tmpfs", "-o", "size={size}", "tmpfs", str(disk)], check=True)
cfg = toy_config(Path({ckpts!r}))
cfg["run"]["root"] = str(disk / "runs")
run = prepare_run(cfg)
assert run_query(run.path) == 0
if {read_only!r}:
    from sdi_pipeline.jobs.logs import log
    for handler in log.handlers:  # the query job's log file is still open
        handler.close()
    log.handlers.clear()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
err, real = io.StringIO(), sys.stderr
sys.stderr, sys.argv = err, ["sdi-worker", f"run_dir={{run.path}}", "rank=0", "world_size=1"]
try:
    cli.worker_main()
except SystemExit as done:
    code = done.code
sys.stderr = real
for f in sorted(run.path.glob("units/*.h5")) + sorted(run.path.glob("query/*.h5")):
    read_meta(f)  # every file under its final name is complete
left = {{
    "code": code,
    "stderr": err.getvalue(),
    "temporaries": sorted(p.name for p in run.path.rglob(".*.tmp-*")),
    "markers without a unit": [m.name for m in run.path.glob("completions/*")
                               if not (run.path / "units" / (m.name + ".h5")).exists()],
}}
subprocess.run(["mount", "-o", "remount,rw,size=64m", str(disk)], check=True)
assert run_query(run.path) == 0 and run_worker(run.path, 0, 1) == 0 and run_merge(run.path) == 0
shutil.copy(run.results_path, out / "results.h5")
shutil.copytree(run.scores_dir, out / "scores")  # results.h5 reads its rows from the shards
(out / "left.json").write_text(json.dumps(left))
"""


def _on_small_disk(tmp_path: Path, size: str, *, read_only: bool = False) -> tuple[int, str, str]:
    """Prepare a run (and its query files) on a tmpfs of ``size``, run a worker there
    (read-only: after remounting it so), check what is left, then recover with room."""
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    write_toy_checkpoints(tmp_path / "ckpts")
    script = DISK_SCRIPT.format(
        tests=str(TESTS), disk=str(disk), out=str(out), ckpts=str(tmp_path), size=size,
        read_only=read_only,
    )  # fmt: skip
    proc = subprocess.run(
        ["unshare", "-rm", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    left = json.loads((out / "left.json").read_text())
    assert left["temporaries"] == [] and left["markers without a unit"] == [], left
    return int(left["code"]), left["stderr"], str(out / "results.h5")


needs_unshare = pytest.mark.skipif(
    not _unshare_works("-rm"), reason="needs unshare -rm (a user and mount namespace) for a tmpfs"
)


@needs_unshare
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, toy_ref) -> None:
    code, err, results = _on_small_disk(tmp_path, "200k")
    assert code == 2
    line = error_line(err)
    assert (
        "no space left on the device (ENOSPC)" in line and "(nothing was left half-written)" in line
    )
    assert "free space there" in line and "run the same command again" in line
    assert_same(Path(results), toy_ref)


@needs_unshare
def test_a_read_only_run_dir_is_one_line(tmp_path, toy_ref) -> None:
    code, err, results = _on_small_disk(tmp_path, "16m", read_only=True)
    assert code == 2
    line = error_line(err)
    assert "read-only filesystem (EROFS)" in line and "remount it writable" in line
    assert_same(Path(results), toy_ref)


@pytest.mark.skipif(
    os.geteuid() == 0 and not _unshare_works("-U"),
    reason="as root, permissions are only enforced in a user namespace (unshare -U)",
)
def test_a_folder_without_write_permission_is_one_line(tmp_path, toy_ref) -> None:
    run = prepare_run(toy_config(tmp_path))
    assert run_query(run.path) == 0
    run.units_dir.chmod(0o555)
    # As root, unshare -U drops the rights over root's files that bypass permissions.
    prefix = ["unshare", "-U"] if os.geteuid() == 0 else []
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "sdi_pipeline.launch.cli", "worker", f"run_dir={run.path}",
         "rank=0", "world_size=1"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    assert f"cannot write {run.units_dir / UNITS[0]}.h5: permission denied (EACCES)" in line
    assert f"make {run.units_dir} writable" in line
    assert not temps(run.units_dir) and not list(run.completions_dir.iterdir())
    run.units_dir.chmod(0o755)
    recover(run)
    assert_same(run.results_path, toy_ref)


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failing_disk_without_a_namespace(tmp_path, toy_ref, capsys, monkeypatch, number) -> None:
    """The same errors injected in this process (where unshare is not available the tests
    above skip; these always run): the unit write fails as the disk would fail it."""
    import sdi_pipeline.files.atomic as atomic

    run = prepare_run(toy_config(tmp_path))
    assert run_query(run.path) == 0
    real = atomic._fsync

    def failing(path: Path) -> None:
        if path.parent == run.units_dir:
            raise OSError(number, os.strerror(number), str(path))
        real(path)

    monkeypatch.setattr(atomic, "_fsync", failing)
    line = refused(capsys, monkeypatch, cli.worker_main, [f"run_dir={run.path}"])
    assert f"cannot write {run.units_dir / UNITS[0]}.h5: " in line
    assert f"({errno.errorcode[number]}) in {run.units_dir} (nothing was left half-written)" in line
    assert not list(run.units_dir.iterdir()) and not list(run.completions_dir.iterdir())
    monkeypatch.setattr(atomic, "_fsync", real)
    recover(run)
    assert_same(run.results_path, toy_ref)


def test_no_room_for_results_is_refused_before_writing(tmp_path, toy_ref, monkeypatch) -> None:
    import sdi_pipeline.jobs.merge as merge

    run = run_all(toy_config(tmp_path))
    written = run.results_path.stat().st_size
    run.results_path.unlink()
    real = os.statvfs

    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    with pytest.raises(RunDirError, match=r"needs about \d+ KiB but only 40 KiB are free in "):
        run_merge(run.path)
    assert not run.results_path.exists() and not temps(run.path)
    monkeypatch.setattr(os, "statvfs", real)
    asked: list[int] = []
    monkeypatch.setattr(merge, "check_free_space", lambda path, needed: asked.append(needed))
    assert run_merge(run.path) == 0
    assert_same(run.results_path, toy_ref)
    # The estimate comes from what the merge writes: above the file's size, not megabytes more.
    assert written <= asked[0] <= 4 * written + 2**20, (written, asked)


def test_a_read_only_run_root_names_the_read_only_folder(
    tmp_path, cli_ref, capsys, monkeypatch
) -> None:
    """run.root on a read-only disk: the error names that folder, not the run's folders
    below it, which do not exist (EROFS injected: as root, permissions do not stop writes)."""
    from pathlib import Path as PathType

    root = tmp_path / "ro"
    root.mkdir()
    real_mkdir = PathType.mkdir

    def read_only(self: PathType, *args: Any, **kwargs: Any) -> None:
        if root in self.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(PathType, "mkdir", read_only)
    argv = cli_overrides(tmp_path, "launcher=prepare", f"run.root={root}")
    line = refused(capsys, monkeypatch, attribute_cli.main, argv)
    assert line.startswith(
        f"error: cannot write {root / 'toy-parity'}: read-only filesystem (EROFS) in {root} "
    )
    assert "remount it writable or set run.root to a writable place" in line
    monkeypatch.setattr(PathType, "mkdir", real_mkdir)  # the user remounts it
    code, _, err = cli_run(attribute_cli.main, argv, capsys, monkeypatch)
    assert code == 0, err
    (run_path,) = (root / "toy-parity").iterdir()
    recover(RunDir(run_path))
    assert_same(run_path / "results.h5", cli_ref)


def test_a_truncated_score_shard_is_named_damaged(tmp_path, toy_ref, capsys, monkeypatch) -> None:
    run = run_all(toy_config(tmp_path))
    shard = run.shard_path(1)
    shard.write_bytes(shard.read_bytes()[:3000])
    code, out, _ = cli_run(cli.status_main, [f"run_dir={run.path}"], capsys, monkeypatch)
    assert code == 1
    assert f"DAMAGED block-00001: {shard} is not a readable HDF5 file (truncated or corrupt" in out
    assert "run the same command again: the block is scored again" in out
    assert "results.h5: STALE (1 score shard(s) it reads are damaged (not a readable HDF5 " in out
    assert "recomputed" not in out
    with pytest.raises(RunDirError, match="score shard\\(s\\) it reads are damaged"):
        Results.open(run.path)
    recover(run)
    assert_same(run.results_path, toy_ref)


# --- bad inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_a_launcher_without_workers_is_refused_before_the_run_exists(
    tmp_path, capsys, monkeypatch, workers
) -> None:
    argv = cli_overrides(tmp_path, f"launcher.workers={workers}")
    line = refused(capsys, monkeypatch, attribute_cli.main, argv)
    expected = "launcher.workers must be at least 1 (the number of worker processes), got"
    assert line == f"error: {expected} {workers}"
    assert not (tmp_path / "runs").exists()


def _bad_checkpoint(tmp: Path, kind: str) -> None:
    path = tmp / "ckpts" / "ckpt-000001.pt"
    if kind == "text":
        path.write_text("step 1000\nloss 0.3\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:800])
    elif kind == "pickled":
        data = torch.load(path, weights_only=True)
        data["extra"] = Path("/data/run")  # an object weights_only loading refuses
        torch.save(data, path)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("text", "is not a PyTorch checkpoint (it starts with b'step', not a torch.save archive)"),
        ("empty", "is empty (0 bytes): it was not written completely"),
        ("truncated", "is truncated or damaged (RuntimeError: PytorchStreamReader failed"),
        ("pickled", "holds objects other than tensors and plain containers (such as pathlib."),
    ],
)
def test_a_checkpoint_that_cannot_be_loaded(tmp_path, capsys, monkeypatch, kind, message) -> None:
    argv = cli_overrides(tmp_path)
    _bad_checkpoint(tmp_path, kind)
    line = refused(capsys, monkeypatch, attribute_cli.main, argv)
    assert f"checkpoint {tmp_path / 'ckpts' / 'ckpt-000001.pt'} {message}" in line
    assert not (tmp_path / "runs").exists()
    if kind == "pickled":  # the advice names the switch, and the switch works
        assert "If you trust the file, allow full unpickling: checkpoints.trust=true" in line
        assert attribute_cli.run([*argv, "checkpoints.trust=true", "launcher=prepare"]) == 0


@pytest.mark.parametrize(
    ("which", "edit", "message"),
    [
        ("train", lambda a: a.__setitem__((5, 2), 7),
         "data.train row 5 ({train} row 5) holds token id 7, outside the model's vocabulary "
         "of 3 ids (0..2; model.config.vocab_size)"),
        ("train", lambda a: a.__setitem__((9, 0), -1),
         "data.train row 9 ({train} row 9) holds the negative token id -1"),
        ("query", lambda a: a.__setitem__((3, 6), 3),
         "data.query row 3 ({query} row 3) holds token id 3, outside the model's vocabulary"),
        ("long", None,
         "data.train row 0 ({train} row 0) has 35 tokens, more than the model's 32 "
         "(model.config.max_len)"),
    ],
    ids=["train-vocab", "train-negative", "query-vocab", "train-too-long"],
)  # fmt: skip
def test_token_ids_the_model_cannot_take_are_named_by_row(
    tmp_path, capsys, monkeypatch, which, edit, message
) -> None:
    train, query = token_rows()
    if which == "long":
        train = np.concatenate([train] * 5, axis=1)
    elif edit is not None:
        edit(train if which == "train" else query)
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "query.npy", query)
    argv = token_overrides(tmp_path, tmp_path / "train.npy", tmp_path / "query.npy")
    line = refused(capsys, monkeypatch, attribute_cli.main, argv)
    expected = message.format(train=tmp_path / "train.npy", query=tmp_path / "query.npy")
    assert expected in line, line
    assert not (tmp_path / "runs").exists()


def test_a_bad_id_in_a_jsonl_query_names_its_line(tmp_path, capsys, monkeypatch) -> None:
    train, _ = token_rows()
    np.save(tmp_path / "train.npy", train)
    rows = [[0, 1, 2], [1, 1], [2, 0, 1], [0, -4, 1]]
    (tmp_path / "query.jsonl").write_text("\n".join(json.dumps({"input_ids": r}) for r in rows))
    argv = token_overrides(tmp_path, tmp_path / "train.npy", tmp_path / "query.jsonl")
    line = refused(capsys, monkeypatch, attribute_cli.main, argv)
    assert (
        f"data.query row 3 ({tmp_path / 'query.jsonl'} line 4) holds the negative token id -4"
        in line
    )


@pytest.mark.parametrize("row", [[], [2]], ids=["empty", "one-token"])
def test_an_example_the_loss_cannot_use_is_named_before_anything_runs(
    tmp_path, capsys, monkeypatch, row
) -> None:
    """next_token_loss needs two real tokens per example: the preflight collates every batch
    the jobs will form and checks it as the loss will, naming the file and line."""
    train, query = token_rows()
    np.save(tmp_path / "query.npy", query)
    rows = [list(map(int, r)) for r in train]
    rows[21] = row
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"input_ids": r}) for r in rows) + "\n")
    argv = token_overrides(tmp_path, path, tmp_path / "query.npy", "launcher=prepare")
    line = refused(capsys, monkeypatch, attribute_cli.main, argv)
    assert line == (
        f"error: data.train row 21 ({path} line 22) cannot be used: next_token_loss: the example "
        "has no target positions (each needs at least two real tokens); filter out such short "
        "sequences; fix or remove that example"
    )
    assert not (tmp_path / "runs").exists()
    del rows[21]  # the user's fix
    path.write_text("\n".join(json.dumps({"input_ids": r}) for r in rows) + "\n")
    code, _, err = cli_run(attribute_cli.main, argv, capsys, monkeypatch)
    assert code == 0, err
    (run_path,) = (tmp_path / "runs" / "toy-parity").iterdir()
    recover(RunDir(run_path))
    with Results.open(run_path) as res:
        assert res.n_train == 39 and np.isfinite(np.asarray(res.tracin)).all()


def test_an_unreadable_example_is_named_before_anything_runs(tmp_path, capsys, monkeypatch) -> None:
    flag = tmp_path / "corrupted"
    flag.touch()
    argv = cli_overrides(
        tmp_path, "data.train._target_=pipeline_helpers.corruptible_parity",
        "+data.train.bad_index=20", f"+data.train.flag={flag}",
    )  # fmt: skip
    monkeypatch.syspath_prepend(str(TESTS))
    line = refused(capsys, monkeypatch, attribute_cli.main, argv)
    assert "data.train row 20 cannot be read (ValueError: example 20 is corrupted" in line
    assert not (tmp_path / "runs").exists()


def test_a_dataset_that_reads_differently_each_time_is_refused(
    tmp_path, capsys, monkeypatch
) -> None:
    argv = cli_overrides(tmp_path, "data.train._target_=pipeline_helpers.noisy_parity")
    monkeypatch.syspath_prepend(str(TESTS))
    line = refused(capsys, monkeypatch, attribute_cli.main, argv)
    assert "data.train row 0 reads differently each time" in line
    assert "make its __getitem__ deterministic" in line


@pytest.mark.parametrize("job", ["worker", "query", "merge", "status"])
def test_a_run_dir_that_is_a_file(tmp_path, capsys, monkeypatch, job) -> None:
    path = tmp_path / "results.txt"
    path.write_text("not a run")
    main = {"worker": cli.worker_main, "query": cli.query_main, "merge": cli.merge_main,
            "status": cli.status_main}[job]  # fmt: skip
    line = refused(capsys, monkeypatch, main, [f"run_dir={path}"])
    assert line == (
        f"error: run_dir {path} is a file, not a run directory: give the folder "
        "runs/<name>/<run id> that sdi-attribute printed"
    )


def test_a_run_root_that_is_a_file(tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "runs").write_text("a file where the runs should go")
    line = refused(capsys, monkeypatch, attribute_cli.main, cli_overrides(tmp_path))
    assert f"{tmp_path / 'runs'} is a file, not a directory" in line
    assert "set run.root to another place" in line


@pytest.mark.parametrize("value", ["../escape", "a/b", "..", "/etc", "", "a\nb"], ids=repr)
@pytest.mark.parametrize("key", ["name", "id"])
def test_run_name_and_id_cannot_leave_the_run_root(tmp_path, key, value) -> None:
    with pytest.raises(ConfigError) as err:
        config.structured(toy_config(tmp_path, run={key: value}))
    assert f"run.{key}={value!r} cannot be used: it must be one folder name inside run.root" in str(
        err.value
    )


SLURM_BAD = [
    ({"partition": "gpu\n#SBATCH --wrap=reboot"}, "launcher.partition", "a newline or control"),
    ({"account": "proj;rm -rf ~"}, "launcher.account", "the character(s) ' ' ';' '~'"),
    ({"qos": "$(id)"}, "launcher.qos", "the character(s) '$' '(' ')'"),
    ({"constraint": "a100`id`"}, "launcher.constraint", "the character(s) '`'"),
    ({"additional": {"mail-user": "me@x.org; x"}}, "launcher.additional.mail-user", "' ' ';'"),
    ({"additional": {"bad key": "1"}}, "launcher.additional key", "the character(s) ' '"),
    ({"additional": {"comment": "a\tb"}}, "launcher.additional.comment", "a newline or control"),
    ({"array_size": 0}, "launcher.array_size must be at least 1", ""),
    ({"mem_gb": -1.0}, "launcher.mem_gb must be positive", ""),
]  # fmt: skip


@pytest.mark.parametrize(("values", "key", "what"), SLURM_BAD, ids=[k for _, k, _ in SLURM_BAD])
def test_slurm_values_are_checked_before_submission(tmp_path, values, key, what) -> None:
    cfg = toy_config(tmp_path, launcher={"name": "slurm", **values})
    with pytest.raises(ConfigError) as err:
        config.structured(cfg)
    assert key in str(err.value) and what in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_slurm_constraint_operators_and_plain_values_are_accepted(tmp_path) -> None:
    cfg = toy_config(
        tmp_path,
        launcher={"name": "slurm", "partition": "gpu,gpu-long", "account": "proj-7",
                  "constraint": "[a100|h100]&ib", "additional": {"mail-type": "FAIL,END",
                  "mail-user": "me@x.org", "exclusive": True, "nice": 10}},
    )  # fmt: skip
    assert config.structured(cfg).launcher.constraint == "[a100|h100]&ib"


def test_a_corrupt_unit_never_reaches_a_results_file(tmp_path) -> None:
    """No results.h5 comes out of a merge that met a corrupt unit, not even a partial one."""
    run = run_all(toy_config(tmp_path))
    run.results_path.unlink()
    corrupt_chunk(run.unit_path_named(UNITS[5]))
    run.shard_path(2).unlink()  # scored again (by the merge): it reads the unit
    with pytest.raises(SDIError):
        run_merge(run.path)
    assert not run.results_path.exists() and not temps(run.path)


def test_a_large_data_file_is_compared_by_samples_and_its_stat(tmp_path, monkeypatch) -> None:
    """Files above FULL_DIGEST_MAX are not hashed whole: a changed sample is a content
    change; a rewrite the samples miss still counts as changed (never a silent match)."""
    from sdi_pipeline.files import digests

    monkeypatch.setattr(digests, "FULL_DIGEST_MAX", 1000)
    path = tmp_path / "big.bin"
    data = bytearray(os.urandom(4 * 2**20))
    path.write_bytes(data)
    record = digests.file_identity(path)
    assert "sha256" not in record
    assert digests.identity_change(record) is None
    os.utime(path, ns=(1, record["mtime_ns"]))  # atime only: the stat identity is the same
    assert digests.identity_change(record) is None
    data[0] ^= 1  # inside the first sample
    path.write_bytes(data)
    assert digests.identity_change(record) == "its content changed"
    data[0] ^= 1
    data[100_000] ^= 1  # between two samples
    path.write_bytes(data)
    assert digests.identity_change(record) == (
        "it was rewritten (new modification time or inode); too large to hash here"
    )
    path.unlink()  # deleted data changes no result made from it
    assert digests.identity_change(record) is None
