"""Scoring at scale: workers score the blocks they sketch, the merge only reduces.

The shards of a block do not depend on who scored it (a worker from memory, sdi-score or the
merge from the stored units), on the world size or on whether train sketches are kept, so
results.h5 is the same array for array; and it equals the contraction of the stored train
sketches with the query sketches computed here directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from pipeline_helpers import parity, run_all, toy_config

from sdi_pipeline.errors import ConfigError, MergeRefused, RunDirError
from sdi_pipeline.formats.results import Results, ResultsWriter
from sdi_pipeline.formats.sketches import read_sketch_file
from sdi_pipeline.jobs.merge import run_merge
from sdi_pipeline.jobs.query import run_query
from sdi_pipeline.jobs.score import run_score
from sdi_pipeline.jobs.worker import run_worker
from sdi_pipeline.run.rundir import RunDir, prepare_run

# Per-example datasets (virtual in results.h5) and the reduced ones.
ROWS = ("tracin", "sdi", "sdi_matrix", "diagnostics/train_loss")
REDUCED = (
    "diagnostics/energy", "diagnostics/signed_share", "diagnostics/train_sketch_norm",
    *(f"topk/{scope}/{sign}/{part}" for scope in ("overall", "per_step")
      for sign in ("positive", "negative") for part in ("indices", "scores")),
)  # fmt: skip


def _config(tmp_path: Path, name: str, store_train: bool = True, **extra: Any) -> dict[str, Any]:
    cfg = toy_config(
        tmp_path,
        data={"block_size": 8},
        merge={"step_matrix": True, "topk": 4},
        sketch={"m": 128, "store_train": store_train},
        run={"root": str(tmp_path / "runs" / name), "name": "toy"},
    )
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def _arrays(run: RunDir) -> dict[str, np.ndarray]:
    with h5py.File(run.results_path, "r") as f:
        return {name: np.asarray(f[name]) for name in (*ROWS, *REDUCED)}


def _ranked(scores: np.ndarray, k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k along axis 0, ties to the smaller index: (..., k) indices and scores."""
    moved = np.moveaxis(scores, 0, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    idx = np.stack(
        [np.lexsort((np.arange(len(r)), -r if largest else r))[:k] for r in flat]
    ).reshape(*moved.shape[:-1], k)
    return idx, np.take_along_axis(moved, idx, axis=-1)


def _direct(run: RunDir, n_ckpt: int, k: int) -> dict[str, np.ndarray]:
    """The contraction of the stored train sketches with the queries, written out here."""
    queries = [read_sketch_file(run.query_path(c)) for c in range(n_ckpt)]
    units = sorted(run.units_dir.glob("*.h5"))
    n_train = max(int(read_sketch_file(u).indices.max()) for u in units) + 1
    m_q, s_q, _ = queries[0].sketch.shape
    sdi = np.zeros((n_train, m_q, s_q), np.float64)
    matrix = None
    loss = np.zeros((n_ckpt, n_train))
    for path in units:
        unit = read_sketch_file(path)
        c = unit.meta["checkpoint"]["index"]
        eta = unit.meta["checkpoint"]["eta"]
        t = unit.sketch.astype(np.float64)
        q = queries[c].sketch.astype(np.float64)
        sdi[unit.indices] += eta * np.einsum("nsw,mtw->nmt", t, q)
        per = eta * np.einsum("nsw,mtw->nmst", t, q)
        if matrix is None:
            matrix = np.zeros((n_train, *per.shape[1:]))
        matrix[unit.indices] += per
        loss[c, unit.indices] = unit.loss
    tracin = sdi.sum(axis=2)
    out = {"tracin": tracin, "sdi": sdi, "sdi_matrix": matrix, "diagnostics/train_loss": loss}
    out["diagnostics/energy"] = np.abs(sdi).sum(axis=0)
    for sign in ("positive", "negative"):
        for scope, scores in (("overall", tracin), ("per_step", sdi)):
            idx, val = _ranked(scores.astype(np.float32), k, sign == "positive")
            out[f"topk/{scope}/{sign}/indices"] = idx
            out[f"topk/{scope}/{sign}/scores"] = val
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    tmp = tmp_path_factory.mktemp("scaling")
    run = run_all(_config(tmp, "ref"), workers=1)
    return tmp, _arrays(run)


def test_results_equal_the_direct_contraction_of_the_stored_sketches(reference) -> None:
    tmp, arrays = reference
    run = RunDir(next((tmp / "runs" / "ref" / "toy").iterdir()))
    direct = _direct(run, 2, 4)
    for name, want in direct.items():
        got = arrays[name]
        if name.endswith("indices"):
            # Same examples in the same order; scores may tie only at float rounding.
            scores = arrays[name.replace("indices", "scores")]
            np.testing.assert_allclose(scores, direct[name.replace("indices", "scores")], rtol=1e-5)
            agree = (got == want).mean()
            assert agree > 0.95, (name, agree)
        else:
            scale = np.abs(want).max()
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("store_train", [True, False])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_world_size_and_stored_sketches_change_nothing(reference, tmp_path, workers, store_train):
    _, want = reference
    run = run_all(_config(tmp_path, "w", store_train=store_train), workers)
    got = _arrays(run)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert any(run.units_dir.glob("*.h5")) == store_train  # no train sketch bytes otherwise
    with h5py.File(run.results_path, "r") as f:
        assert f["sdi"].is_virtual and f["tracin"].is_virtual


def test_without_stored_sketches_the_queries_come_first(tmp_path) -> None:
    run = prepare_run(_config(tmp_path, "q", store_train=False))
    with pytest.raises(ConfigError, match=r"store_train=false .* run sdi-query"):
        run_worker(run.path, 0, 1)
    assert run_query(run.path) == 0
    assert run_worker(run.path, 0, 2) == 0  # rank 1 of 2 not run
    with pytest.raises(MergeRefused, match=r"blocks not scored: block-00001.*run the workers"):
        run_merge(run.path)


def test_a_new_query_set_is_rescored_by_the_scoring_array(reference, tmp_path) -> None:
    """A second query set: the new run adopts the train sketches, sdi-score scores them
    (never sketching), and the results equal a run that sketched from scratch."""
    tmp, _ = reference
    other = {"query": parity(7, 9)}
    scratch = run_all(_config(tmp_path, "scratch", data=other), workers=2)
    cfg = _config(tmp, "ref", data=other)  # beside the reference: adopts its units
    run = prepare_run(cfg)
    assert sum(1 for _ in run.units_dir.glob("*.h5")) == 10  # adopted by prepare_run
    before = {p.name: p.stat().st_mtime_ns for p in run.units_dir.glob("*.h5")}
    assert run_query(run.path) == 0
    for rank in range(3):
        assert run_score(run.path, rank, 3) == 0
    assert {p.name: p.stat().st_mtime_ns for p in run.units_dir.glob("*.h5")} == before
    assert run_merge(run.path) == 0
    merge_log = (run.logs_dir / "merge.log").read_text()
    assert "did not" not in merge_log  # every block came scored
    got, want = _arrays(run), _arrays(scratch)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_sdi_score_refuses_units_that_are_not_stored(tmp_path) -> None:
    run = prepare_run(_config(tmp_path, "s"))
    assert run_query(run.path) == 0
    with pytest.raises(RunDirError, match=r"not stored .* run the workers"):
        run_score(run.path, 0, 1)
    with pytest.raises(ConfigError, match="query sketches, which are not complete"):
        for path in run.query_dir.glob("*.h5"):
            path.unlink()
        run_score(run.path, 0, 1)


def test_killed_between_sketching_and_scoring_resumes_without_sketching(
    reference, tmp_path, monkeypatch
) -> None:
    _, want = reference
    run = prepare_run(_config(tmp_path, "k"))
    assert run_query(run.path) == 0

    def killed(*_args: Any, **_kwargs: Any) -> None:
        raise SystemExit("killed")

    monkeypatch.setattr("sdi_pipeline.jobs.worker.write_shard", killed)
    with pytest.raises(SystemExit):
        run_worker(run.path, 0, 1)
    monkeypatch.undo()
    done = {p.name: p.stat().st_mtime_ns for p in run.units_dir.glob("*.h5")}
    assert len(done) == 2 and not any(run.scores_dir.glob("*.h5"))  # block 0 sketched only
    assert run_worker(run.path, 0, 1) == 0
    assert {n: (run.units_dir / n).stat().st_mtime_ns for n in done} == done  # not sketched again

    def dies(*_args: Any, **_kwargs: Any) -> None:
        raise SystemExit("killed")

    monkeypatch.setattr(ResultsWriter, "write_inputs", dies)
    with pytest.raises(SystemExit):
        run_merge(run.path)  # killed mid-write: no results.h5
    monkeypatch.undo()
    assert not run.results_path.exists()
    assert run_merge(run.path) == 0
    got = _arrays(run)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_the_merge_scores_blocks_the_workers_could_not(reference, tmp_path) -> None:
    """Workers run before the query sketches exist (by hand): the merge scores the blocks."""
    _, want = reference
    run = prepare_run(_config(tmp_path, "m"))
    assert run_worker(run.path, 0, 1) == 0
    assert not any(run.scores_dir.glob("*.h5"))
    assert run_query(run.path) == 0
    assert run_merge(run.path) == 0
    assert "scoring 5 block(s) the workers did not" in (run.logs_dir / "merge.log").read_text()
    got = _arrays(run)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_results_refuse_changed_or_missing_shards(tmp_path) -> None:
    run = run_all(_config(tmp_path, "r", store_train=False), workers=1)
    with Results.open(run.path) as res:
        assert np.isfinite(res.sdi[...]).all()
    shard = run.shard_path(1)
    shard.rename(shard.with_suffix(".bak"))
    with pytest.raises(RunDirError, match=r"score shard.*missing"):
        Results.open(run.path)
    shard.with_suffix(".bak").rename(shard)
    # A copied results.h5 needs the scores/ folder beside it.
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.h5").write_bytes(run.results_path.read_bytes())
    with pytest.raises(RunDirError, match="scores/ folder"):
        Results.open(copy / "results.h5")
    os.symlink(run.scores_dir, copy / "scores")
    with Results.open(copy / "results.h5") as res:
        assert np.isfinite(res.tracin[...]).all()


def test_a_corrupt_shard_is_named_and_rescored(tmp_path) -> None:
    cfg = _config(tmp_path, "c")
    run = run_all(cfg, workers=1)
    want = _arrays(run)
    shard = run.shard_path(2)
    data = bytearray(shard.read_bytes())
    with h5py.File(shard, "r") as f:
        offset = f["sums/energy"].id.get_chunk_info(0).byte_offset
    data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(MergeRefused, match=r"block-00002.*Fletcher-32"):
        run_merge(run.path)
    assert not shard.exists()  # removed: the next run rescores it
    assert run_worker(run.path, 0, 1) == 0
    assert run_merge(run.path) == 0
    got = _arrays(run)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_an_exported_copy_needs_no_shards(tmp_path) -> None:
    run = run_all(_config(tmp_path, "e"), workers=2)
    want = _arrays(run)
    with Results.open(run.path) as res:
        copy = res.export(tmp_path / "elsewhere" / "results.h5")
    for shard in run.scores_dir.glob("*.h5"):
        shard.unlink()
    with pytest.raises(RunDirError, match="missing"):
        Results.open(run.path)  # the run's own results.h5 reads the shards
    with Results.open(copy) as res:
        assert res.topk(0, 2) and res.n_train == 40
    with h5py.File(copy, "r") as f:
        assert not f["sdi"].is_virtual and "shard_names" not in f["inputs"]
        for name, values in want.items():
            np.testing.assert_array_equal(np.asarray(f[name]), values, err_msg=name)


def test_scored_from_memory_or_from_stored_float16_units_is_the_same(tmp_path) -> None:
    """A worker scores the sketches it has just made as the unit files store them: with
    sketch.dtype=float16, the same numbers as the merge scoring those files."""
    half = {"dtype": "float16"}
    in_worker = run_all(_config(tmp_path, "mem", sketch={"m": 128, **half}), workers=1)
    run = prepare_run(_config(tmp_path, "file", sketch={"m": 128, **half}))
    assert run_worker(run.path, 0, 1) == 0  # before the query sketches: no shards
    assert run_query(run.path) == 0
    assert run_merge(run.path) == 0  # scores every block from its float16 unit files
    got, want = _arrays(run), _arrays(in_worker)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
