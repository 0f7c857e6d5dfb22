"""launcher=slurm and the slurm/ templates against a real SLURM (slurmctld, slurmd, slurmdbd).

The README's test command brings a one-node cluster up with ``slurm/local-cluster.sh`` when
it runs as root with apt (as in CI). Without a cluster these tests skip with the reason; with
``CI=true`` that is a failure, so CI can never pass without running them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from pipeline_helpers import cli_overrides

from sdi_pipeline.launch.slurm import jobs_path, slurm_jobs
from sdi_pipeline.launch.status import run_status
from sdi_pipeline.run.rundir import RunDir, Unit, rank_blocks, run_blocks, run_units

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
BIN = Path(sys.executable).parent
# Small jobs, so the one-node cluster runs them side by side.
SLURM = [
    "launcher=slurm",
    "launcher.cpus_per_task=1",
    "launcher.merge_cpus=1",
    "launcher.mem_gb=1",
    "launcher.merge_mem_gb=1",
    "launcher.time_min=15",
    "launcher.query_time_min=15",
    "launcher.merge_time_min=15",
    "runtime.threads=1",
]
SLOW_LOSS = "analysis.loss._target_=pipeline_helpers.slow_parity_loss"
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "COMPLETING", "CONFIGURING",
          "SUSPENDED", "RESIZING", "REQUEUE_FED"}  # fmt: skip
JOB_TIMEOUT_S = 300
LOCAL_CLUSTER = "sdilocal"  # ClusterName in slurm/local-cluster.sh's slurm.conf


def _out(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def _cluster_missing() -> str | None:
    """Why no SLURM cluster can run jobs here, or None when one can."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH"
    try:
        if "UP" not in _out("scontrol", "ping"):
            return "slurmctld does not answer `scontrol ping`"
        _out("sacct", "-n", "-X", "-S", "now")
        states = _out("sinfo", "-h", "-o", "%T").split()
    except subprocess.TimeoutExpired as err:
        return f"`{' '.join(map(str, err.cmd))}` timed out"
    except subprocess.CalledProcessError as err:
        said = " ".join((err.stderr or err.stdout or "").split())
        return f"`{' '.join(map(str, err.cmd))}` failed: {said or f'exit {err.returncode}'}"
    if not any(s.rstrip("*") in ("idle", "mixed", "allocated") for s in states):
        return f"no node is up (sinfo: {' '.join(states) or 'no nodes'})"
    name = re.search(r"^ClusterName\s*=\s*(\S+)", _out("scontrol", "show", "config"), re.M)
    if (name and name[1]) != LOCAL_CLUSTER and os.environ.get("SDI_SLURM_TESTS") != "1":
        # Never queue test jobs on a real cluster by accident.
        return f"cluster {name and name[1]!r} is not {LOCAL_CLUSTER!r}; SDI_SLURM_TESTS=1 uses it"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A SLURM cluster that runs jobs; at the end, this session's jobs left are cancelled."""
    reason = _cluster_missing()
    if reason is not None:
        hint = "run the tests as root with apt-get (tools/test.sh starts slurm/local-cluster.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no SLURM cluster: {reason}; {hint}", pytrace=False)
        pytest.skip(f"no SLURM cluster: {reason}; {hint}")
    yield
    # A failed test can leave jobs queued; ours are those submitted from our temp dirs.
    base = str(tmp_path_factory.getbasetemp())
    rows = (line.split(" ", 1) for line in _out("squeue", "-h", "-o", "%i %Z").splitlines())
    left = [job for job, workdir in rows if workdir.startswith(base)]
    if left:
        subprocess.run(["scancel", *left], check=False, timeout=60)


def _env(**extra: str) -> dict[str, str]:
    # Jobs inherit the submitting environment (sbatch --export=ALL): tests/ on the path for
    # the test helpers named in configs.
    return dict(os.environ, PYTHONPATH=str(TESTS), **extra)


def _attribute(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    # kernel=auto picks the dense or FFT Linear kernel from timings measured per host and
    # thread count (1-thread SLURM tasks, 2-thread local workers): the two agree to float
    # rounding only. One kernel here, so SLURM and local results compare bit for bit.
    proc = subprocess.run(
        [str(BIN / "sdi-attribute"), *cli_overrides(tmp_path, "sketch.kernel=dense", *extra)],
        cwd=tmp_path, env=env or _env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _run_dir(out: str) -> RunDir:
    (path,) = set(re.findall(r"\[sdi\] run dir:? (\S+)", out))
    return RunDir(path)


def _submitted(run: RunDir) -> dict:
    return json.loads(jobs_path(run).read_text())


def _sacct(*ids: str) -> list[dict[str, str]]:
    fields = ["JobID", "State", "Start", "End", "ExitCode"]
    text = _out("sacct", "-n", "-X", "-P", "-o", ",".join(fields), "-j", ",".join(ids))
    return [dict(zip(fields, line.split("|"), strict=True)) for line in text.splitlines()]


def _diagnostics(run: RunDir | None) -> str:
    parts = [_out("squeue", "-o", "%i %j %T %r %E"), _out("sacct", "-X", "-o", "JobID,State")]
    if run is not None:
        for log in sorted([*run.logs_dir.glob("*.log"), *run.path.glob("slurm/*/*.err")]):
            parts.append(f"--- {log}\n" + "\n".join(log.read_text().splitlines()[-15:]))
    return "\n".join(parts)


def _wait(job: str, run: RunDir | None, timeout: float = JOB_TIMEOUT_S) -> str:
    """Poll sacct until ``job`` has left the queue; returns its final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [r for r in _sacct(job) if r["JobID"] == job]
        if rows and rows[0]["State"].split()[0] not in ACTIVE:
            return rows[0]["State"].split()[0]
        time.sleep(0.5)
    pytest.fail(f"job {job} did not finish in {timeout:.0f}s\n{_diagnostics(run)}")


def _datasets(path: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}

    def keep(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            found[name] = obj[()]

    with h5py.File(path, "r") as f:
        f.visititems(keep)
    return found


def _assert_same_results(a: Path, b: Path) -> None:
    """Every array of two results.h5 files equal, but per-unit timings and ranks and the
    record of the inputs (their paths differ between runs)."""
    da, db = _datasets(a), _datasets(b)
    assert da.keys() == db.keys()
    for name in da:
        # inputs/: what each file was made from (checkpoint paths, digests): run-specific.
        if not name.startswith(("diagnostics/units/", "inputs/")):
            np.testing.assert_array_equal(da[name], db[name], err_msg=name)


@pytest.fixture(scope="module")
def local_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """results.h5 of the local launcher on the same data, checkpoints and sketch."""
    tmp = tmp_path_factory.mktemp("local")
    out = _attribute(tmp, "launcher=local", "launcher.workers=1")
    return _run_dir(out).results_path


def test_launcher_runs_query_array_and_dependent_merge(cluster, tmp_path, local_results) -> None:
    out = _attribute(tmp_path, *SLURM, "launcher.array_size=3")
    run = _run_dir(out)
    jobs = _submitted(run)
    query, array, merge = jobs["query"], jobs["workers"]["array"], jobs["merge"]
    assert jobs["workers"]["ranks"] == [0, 1, 2]
    # While the query job and the array run, the merge waits on both.
    pending = _out("squeue", "-h", "-j", merge, "-o", "%T|%r|%E").strip()
    state, reason, dependency = pending.split("|")
    assert (state, reason) == ("PENDING", "Dependency"), (state, reason)
    assert f"afterok:{query}" in dependency and f"afterok:{array}" in dependency, dependency

    assert _wait(merge, run) == "COMPLETED", _diagnostics(run)
    rows = {r["JobID"]: r for r in _sacct(query, array, merge)}
    assert set(rows) == {query, f"{array}_0", f"{array}_1", f"{array}_2", merge}
    assert all(r["State"] == "COMPLETED" for r in rows.values()), rows
    # The array started after the query job (its workers score against the query sketches),
    # the merge only after the query job and every array task had ended.
    assert all(rows[f"{array}_{r}"]["Start"] >= rows[query]["End"] for r in range(3)), rows
    assert rows[merge]["Start"] >= max(r["End"] for j, r in rows.items() if j != merge)
    _assert_same_results(run.results_path, local_results)
    again = _attribute(tmp_path, *SLURM, "launcher.array_size=3")
    # Up to date: nothing is submitted (the launcher is not even asked), the summary shows.
    assert "up to date" in again and "nothing to run" in again, again
    assert "top 3 overall (TracIn)" in again, again
    assert _submitted(run) == jobs
    assert (run.path / "plots" / "sdi_steps.png").exists()


def test_a_new_query_set_is_scored_by_an_sdi_score_array(cluster, tmp_path) -> None:
    """A run that differs only in its queries adopts the stored train sketches; the launcher
    then submits sdi-score tasks (which never sketch) and the reduce after them."""
    first = _run_dir(_attribute(tmp_path, *SLURM, "launcher.array_size=2"))
    assert _wait(_submitted(first)["merge"], first) == "COMPLETED", _diagnostics(first)
    other = "data.query.split=train"  # the first training examples as queries
    run = _run_dir(_attribute(tmp_path, *SLURM, "launcher.array_size=2", other))
    assert run.path != first.path
    jobs = _submitted(run)
    assert jobs["workers"]["job"] == "score", jobs
    assert _wait(jobs["merge"], run) == "COMPLETED", _diagnostics(run)
    assert {p.name for p in run.logs_dir.glob("*.log")} >= {"score-0000.log", "score-0001.log"}
    assert not list(run.logs_dir.glob("worker-*.log"))
    local = _run_dir(_attribute(tmp_path / "local", "launcher=local", "launcher.workers=1", other))
    _assert_same_results(run.results_path, local.results_path)


def test_a_failed_unit_stops_the_merge_and_a_rerun_submits_only_the_rest(
    cluster, tmp_path, local_results
) -> None:
    flag = tmp_path / "corrupted"
    flag.touch()
    command = [
        *SLURM,
        "launcher.array_size=3",
        "data.train._target_=pipeline_helpers.corruptible_parity",
        "+data.train.bad_index=20",  # in block 1 (examples 16..31) of each checkpoint
        f"+data.train.flag={flag}",
        # Only in the SLURM jobs: sdi-attribute's preflight reads every example and would
        # refuse the corrupted one before submitting anything.
        "+data.train.only_in_jobs=true",
    ]
    run = _run_dir(_attribute(tmp_path, *command))
    first = _submitted(run)
    merge_state = _wait(first["merge"], run)
    assert merge_state == "CANCELLED", _diagnostics(run)  # kill-on-invalid-dep
    for task in first["workers"]["tasks"]:  # every worker has ended before the rerun
        _wait(task, run)
    (merge_row,) = _sacct(first["merge"])
    assert merge_row["Start"] in ("None", "Unknown") or merge_row["Start"] >= merge_row["End"]
    assert not run.results_path.exists() and not (run.logs_dir / "merge.log").exists()
    tasks = {r["JobID"]: r["State"] for r in _sacct(first["workers"]["array"])}
    assert "FAILED" in tasks.values() and "COMPLETED" in tasks.values(), tasks

    status = run_status(run)
    assert status.failed and all(name.endswith("block-00001") for name in status.failed)
    # Without tests/ on the path: sdi-status needs neither the data set nor its code.
    no_helpers = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [str(BIN / "sdi-status"), f"run_dir={run.path}"],
        env=no_helpers, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    text = proc.stdout
    assert proc.returncode == 1, text + proc.stderr  # 1: failed units
    assert f"merge   {first['merge']} CANCELLED" in text, text
    assert "then run the same command again" in text, text
    for name, info in status.failed.items():
        assert f"FAILED {name} (rank {info['rank']})" in text, text
        assert f"log: {info['log']}" in text, text
        assert "example 20 is corrupted" in Path(info["log"]).read_text()
        assert tasks[f"{first['workers']['array']}_{info['rank']}"] == "FAILED"

    world = 3
    unfinished = [r for r in range(world) if not all(map(run.is_done, _rank_units(run, r, world)))]
    finished_before = _done_times(run)
    flag.unlink()  # the cause is removed; the same command again
    run_again = _run_dir(_attribute(tmp_path, *command))
    assert run_again.path == run.path
    second = _submitted(run)
    assert "query" not in second  # query sketches are on disk
    assert second["workers"]["ranks"] == unfinished
    assert _wait(second["merge"], run) == "COMPLETED", _diagnostics(run)
    after = _done_times(run)
    assert all(after[name] == t for name, t in finished_before.items())  # not recomputed
    assert not run_status(run).failed
    _assert_same_results(run.results_path, local_results)


def _interrupt_after_first_unit(
    run: RunDir, world: int, actions: dict[int, list[str]], timeout: float = JOB_TIMEOUT_S
) -> dict[str, int]:
    """Run ``actions[rank]`` (a command) as soon as that rank has finished a unit, so it is
    caught mid-run; returns the completion times of the units done by then."""
    before: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while actions:
        for rank in list(actions):
            if any(run.is_done(u) for u in _rank_units(run, rank, world)):
                _out(*actions.pop(rank))
                before |= _done_times(run)
        if time.monotonic() > deadline:
            pytest.fail(f"workers made no progress in {timeout:.0f}s\n{_diagnostics(run)}")
        time.sleep(0.1)
    return before


def _units(run: RunDir) -> list[Unit]:
    size = run.recorded_train_size()
    assert size is not None
    return run_units(run.load_config(), size)


def _rank_units(run: RunDir, rank: int, world: int) -> list[Unit]:
    """The units of rank ``rank`` of ``world``: those of its blocks."""
    size = run.recorded_train_size()
    assert size is not None
    blocks = rank_blocks(run_blocks(run.load_config(), size), rank, world)
    return [u for b in blocks for u in b.units]


def _done_times(run: RunDir) -> dict[str, int]:
    units = _units(run)
    return {u.name: run.marker_path(u).stat().st_mtime_ns for u in units if run.is_done(u)}


def _assert_resumed(run: RunDir, rank: int) -> None:
    log = (run.logs_dir / f"worker-{rank:04d}.log").read_text()
    assert "received SIGTERM: stopping after the current batch" in log, log
    starts = re.findall(r"rank \d+/\d+ on .*: (\d+) units, (\d+) already done", log)
    assert len(starts) >= 2 and int(starts[-1][1]) >= 1, log  # restarted with units on disk
    assert re.search(r"all \d+ blocks done", log), log


def test_preempted_workers_requeue_resume_and_keep_finished_units(
    cluster, tmp_path, local_results
) -> None:
    env = _env(SDI_TEST_BATCH_SECONDS="2")  # 4 s per unit of 16: time to interrupt
    run = _run_dir(_attribute(tmp_path, *SLURM, "launcher.array_size=2", SLOW_LOSS, env=env))
    jobs = _submitted(run)
    array = jobs["workers"]["array"]
    # Preemption as a cluster does it (SIGTERM, the task requeues itself), and a requeue by
    # an administrator.
    actions = {
        0: ["scancel", "--signal=TERM", f"{array}_0"],
        1: ["scontrol", "requeue", f"{array}_1"],
    }
    before = _interrupt_after_first_unit(run, 2, actions)
    assert _wait(jobs["merge"], run) == "COMPLETED", _diagnostics(run)
    for rank in (0, 1):
        _assert_resumed(run, rank)
    after = _done_times(run)
    assert all(after[name] == t for name, t in before.items())  # not recomputed
    assert len(after) == 6
    _assert_same_results(run.results_path, local_results)


def test_sbatch_templates_run_and_requeue_on_the_cluster(cluster, tmp_path, local_results) -> None:
    env = _env(SDI_TEST_BATCH_SECONDS="2", SDI_VENV=sys.prefix)
    run = _run_dir(_attribute(tmp_path, "launcher=prepare", SLOW_LOSS, env=env))
    submit = subprocess.run(
        ["bash", str(REPO / "slurm" / "submit.sh"), "--cpus-per-task=1", "--mem=1G",
         "--time=15"],
        cwd=tmp_path, env=env | {"RUN_DIR": str(run.path), "TASKS": "2"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr
    ids = re.search(r"query (\d+)\s+workers (\d+) .*merge (\d+)", submit.stdout)
    assert ids, submit.stdout
    _query, array, merge = ids.groups()
    # The template's worker is a child of the batch shell, which traps TERM (as sent by
    # --signal=B:TERM before the time limit) and requeues the task.
    before = _interrupt_after_first_unit(
        run, 2, {0: ["scancel", "--batch", "--signal=TERM", f"{array}_0"]}
    )
    assert _wait(merge, run) == "COMPLETED", _diagnostics(run)
    _assert_resumed(run, 0)
    after = _done_times(run)
    assert all(after[name] == t for name, t in before.items())
    tasks = {r["JobID"]: r["State"] for r in _sacct(array)}
    assert tasks == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED"}, tasks
    jobs = slurm_jobs(run)  # submit.sh recorded its jobs for sdi-status
    assert jobs is not None and (jobs.query, jobs.array, jobs.merge) == ids.groups()
    _assert_same_results(run.results_path, local_results)
