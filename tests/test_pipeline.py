"""The distributed core end to end: units, workers, query job, merge, Results API."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from pipeline_helpers import run_all, toy_config
from torch.utils.data import DataLoader

from sdi_pipeline.attribute import attribute
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.errors import SDIError
from sdi_pipeline.formats.results import Results
from sdi_pipeline.formats.sketches import read_sketch_file, write_sketch_file
from sdi_pipeline.inputs.build import build_dataset
from sdi_pipeline.jobs.context import EXIT_INTERRUPTED
from sdi_pipeline.jobs.merge import run_merge
from sdi_pipeline.jobs.query import run_query
from sdi_pipeline.jobs.worker import run_worker
from sdi_pipeline.run.rundir import RunDir, prepare_run
from sdi_pipeline.toy.parity import parity_loss

TESTS = Path(__file__).parent


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def in_memory(run: RunDir):
    cfg = run.load_config()
    from sdi_pipeline.inputs.build import build_model

    return attribute(
        build_model(cfg),
        list(cfg.analysis.targets),
        list(cfg.checkpoints.paths),
        DataLoader(build_dataset(cfg, "train"), batch_size=8),
        DataLoader(build_dataset(cfg, "query"), batch_size=8),
        parity_loss,
        spec=SketchSpec(m=int(cfg.sketch.m), seed=int(cfg.sketch.seed)),
    )


def test_one_or_three_workers_give_the_same_files_and_the_engines_results(tmp_path, device) -> None:
    on = {"progress": False, "threads": 1, "device": device.type}
    one = run_all(toy_config(tmp_path, runtime=on), workers=1)
    three = run_all(toy_config(tmp_path, run={"name": "three"}, runtime=on), workers=3)
    assert one.path.name == three.path.name  # same attribution, same run id
    names = sorted(p.name for p in one.units_dir.glob("*.h5"))
    assert names == sorted(p.name for p in three.units_dir.glob("*.h5"))
    assert len(names) == 2 * 3  # 2 checkpoints x 3 blocks of 16, 16, 8
    for name in names:
        if device.type == "cpu":  # any W gives byte-identical unit files
            assert digest(one.units_dir / name) == digest(three.units_dir / name)
        else:  # CUDA's index_add_ adds in no fixed order: equal to float rounding
            a, b = (read_sketch_file(run.units_dir / name).sketch for run in (one, three))
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))
    # The engine in one process on the CPU: any device gives its results.
    expected = in_memory(one)
    with Results.open(one.path) as a, Results.open(three.path) as b:
        if device.type == "cpu":
            np.testing.assert_array_equal(a.tracin[...], b.tracin[...])
        np.testing.assert_allclose(a.sdi[...], expected.sdi.numpy(), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(a.tracin[...], expected.tracin.numpy(), rtol=1e-5, atol=1e-4)
        top = a.topk(2, k=3, step="step 4")
        order = np.argsort(-expected.sdi[:, 2, 3].numpy())[:3]
        assert [i for i, _ in top] == order.tolist()
        np.testing.assert_allclose(a.trajectory(5, 1).sum(), a.tracin[5, 1], rtol=1e-5)
        assert a.etas == pytest.approx([0.1, 0.2])
        assert a.energy().shape == (5, 4)


def test_results_open_finds_the_newest_run_of_a_name(tmp_path) -> None:
    run = run_all(toy_config(tmp_path), workers=1)
    with Results.open(run.path.parent) as res:
        assert res.path == run.results_path
    with pytest.raises(SDIError, match="no complete run"):
        Results.open(run.path.parent.parent)


def _worker_process(run: RunDir, env_seconds: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(TESTS), SDI_TEST_BATCH_SECONDS=env_seconds)
    return subprocess.Popen(
        [sys.executable, "-c", "from sdi_pipeline.launch.cli import worker_main; worker_main()",
         f"run_dir={run.path}", "rank=0", "world_size=1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _wait_for_markers(run: RunDir, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(list(run.completions_dir.glob("*"))) < n:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "worker made no progress"
        time.sleep(0.05)


SLOW_LOSS = {"loss": {"_target_": "pipeline_helpers.slow_parity_loss", "_partial_": True}}


def test_killed_worker_resumes_and_keeps_finished_units(tmp_path) -> None:
    cfg = toy_config(tmp_path, analysis=SLOW_LOSS, data={"block_size": 8, "batch_size": 4})
    run = prepare_run(cfg)
    proc = _worker_process(run, "0.15")
    _wait_for_markers(run, 2, proc)
    time.sleep(0.2)  # into the next unit
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: os.stat(run.units_dir / f"{p.name}.h5") for p in run.completions_dir.glob("*")}
    assert 2 <= len(done) < 10
    proc = _worker_process(run, "0")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"10 units, {len(done)} already done" in out
    for name, before in done.items():  # finished units were not rewritten
        after = os.stat(run.units_dir / f"{name}.h5")
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert run_query(run.path) == 0 and run_merge(run.path) == 0
    fresh = run_all(
        toy_config(tmp_path, run={"name": "fresh"}, data={"block_size": 8, "batch_size": 4}), 1
    )
    with Results.open(run.path) as a, Results.open(fresh.path) as b:
        np.testing.assert_array_equal(a.sdi[...], b.sdi[...])


def test_sigterm_finishes_the_batch_and_exits_for_requeue(tmp_path) -> None:
    cfg = toy_config(tmp_path, analysis=SLOW_LOSS, data={"block_size": 8, "batch_size": 4})
    run = prepare_run(cfg)
    proc = _worker_process(run, "0.3")
    _wait_for_markers(run, 1, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert "received SIGTERM" in out
    markers = {p.name for p in run.completions_dir.glob("*")}
    units = {p.stem for p in run.units_dir.glob("*.h5")}
    assert markers == units  # no unit file without its marker, no stray temporaries
    assert not list(run.units_dir.glob(".*tmp*"))


@pytest.fixture
def finished(tmp_path) -> RunDir:
    run = run_all(toy_config(tmp_path), workers=2)
    run.results_path.unlink()
    return run


def _refused(run: RunDir, *patterns: str) -> None:
    with pytest.raises(SDIError) as err:
        run_merge(run.path)
    for pattern in patterns:
        assert pattern in str(err.value), str(err.value)
    assert not run.results_path.exists()
    assert not list(run.path.glob(".results*"))


def test_merge_refuses_a_truncated_unit(finished: RunDir) -> None:
    path = finished.units_dir / "ckpt-000_block-00001.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(finished, "ckpt-000_block-00001.h5 is not a readable HDF5 file")


def _rewrite(path: Path, **meta_changes) -> None:
    f = read_sketch_file(path)
    meta = {
        k: v
        for k, v in f.meta.items()
        if k not in ("format", "format_version", "package_version", "dtype", "n", "sketch_shape")
    }
    for key, value in meta_changes.items():
        meta[key] = value
    write_sketch_file(
        path,
        torch.from_numpy(f.indices),
        torch.from_numpy(f.sketch),
        torch.from_numpy(f.loss),
        meta,
    )


def test_merge_refuses_a_unit_with_another_seed_or_m(finished: RunDir) -> None:
    _rewrite(
        finished.units_dir / "ckpt-001_block-00002.h5", spec={"m": 128, "seed": 7, "kernel": "auto"}
    )
    _rewrite(
        finished.units_dir / "ckpt-000_block-00000.h5", spec={"m": 64, "seed": 0, "kernel": "auto"}
    )
    _refused(
        finished,
        "ckpt-001_block-00002.h5 does not match query/ckpt-001.h5: spec",
        "'seed': 7",
        "ckpt-000_block-00000.h5 does not match query/ckpt-000.h5: spec",
    )


def test_merge_refuses_a_unit_from_another_checkpoint(finished: RunDir) -> None:
    shutil.copy(
        finished.units_dir / "ckpt-001_block-00000.h5",
        finished.units_dir / "ckpt-000_block-00000.h5",
    )
    _refused(
        finished,
        "ckpt-000_block-00000.h5 does not match query/ckpt-000.h5: checkpoint",
        "covered by more than one unit file",
    )


def test_merge_refuses_a_missing_unit(finished: RunDir) -> None:
    (finished.completions_dir / "ckpt-000_block-00001").unlink()
    (finished.units_dir / "ckpt-000_block-00001.h5").unlink()
    _refused(finished, "1 of 6 units not done: ckpt-000_block-00001")


def test_merge_refuses_a_duplicated_block(finished: RunDir) -> None:
    shutil.copy(
        finished.units_dir / "ckpt-000_block-00001.h5",
        finished.units_dir / "ckpt-000_block-00009.h5",
    )
    _refused(
        finished,
        "ckpt-000_block-00009.h5 is not a unit of this run",
        "16 training indices covered by more than one unit file",
    )


def test_merge_refuses_missing_query_sketches(finished: RunDir) -> None:
    (finished.query_dir / "ckpt-001.h5").unlink()
    _refused(finished, "query sketches for checkpoint 1 missing")


def test_merge_refuses_query_sketches_of_another_config(finished: RunDir) -> None:
    _rewrite(finished.query_dir / "ckpt-000.h5", config_hash="0123456789abcdef")
    _refused(
        finished,
        "query/ckpt-000.h5 was made for config 0123456789abcdef, not "
        f"{finished.stored_hash()}; rerun sdi-query",
    )


def test_a_second_query_set_reuses_the_train_units(tmp_path) -> None:
    first = run_all(toy_config(tmp_path), workers=2)
    second_cfg = toy_config(
        tmp_path,
        data={
            "query": {
                "_target_": "sdi_pipeline.toy.parity.make_parity_dataset",
                "n": 7,
                "n_bits": 6,
                "seed": 9,
            }
        },
    )
    second = prepare_run(second_cfg)
    assert second.path != first.path
    assert len(list(second.completions_dir.glob("*"))) == 6  # adopted, not recomputed
    assert run_query(second.path) == 0 and run_merge(second.path) == 0
    fresh_cfg = toy_config(tmp_path, run={"name": "scratch"}, data=second_cfg["data"])
    fresh = run_all(fresh_cfg, workers=1)
    with Results.open(second.path) as a, Results.open(fresh.path) as b:
        assert a.n_query == 7
        np.testing.assert_array_equal(a.sdi[...], b.sdi[...])


def test_a_config_change_is_refused_with_its_difference(tmp_path) -> None:
    run = prepare_run(toy_config(tmp_path))
    cfg_text = run.config_path.read_text().replace("m: 128", "m: 256")
    run.config_path.write_text(cfg_text)
    with pytest.raises(
        SDIError, match=r"(?s)differs from the run's.*-  \"m\": 128.*\+  \"m\": 256"
    ):
        run_worker(run.path, 0, 1)


def test_summed_train_steps_store_one_vector_and_give_the_same_tracin(tmp_path) -> None:
    full = run_all(toy_config(tmp_path), workers=1)
    summed = run_all(toy_config(tmp_path, sketch={"train_steps": "summed"}), workers=1)
    with h5py.File(next(summed.units_dir.glob("*.h5"))) as f:
        assert f["sketch"].ndim == 2
    with Results.open(full.path) as a, Results.open(summed.path) as b:
        np.testing.assert_allclose(a.sdi[...], b.sdi[...], rtol=1e-5, atol=1e-4)


def test_worker_cli_reports_bad_arguments_in_one_line(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from sdi_pipeline.launch.cli import worker_main; worker_main()",
         "rank=1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: missing argument(s): run_dir=..."
