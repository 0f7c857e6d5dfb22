"""method=bif in the pipeline: config and hash, refusals, resume, world sizes, the
in-process reference, the views' identities, sdi-attribute end to end."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from pipeline_helpers import cli_overrides, run_all, toy_config

from sdi_pipeline import SGLDConfig, attribute_bif
from sdi_pipeline.formats.results import Results
from sdi_pipeline.inputs import build
from sdi_pipeline.jobs.merge import run_merge
from sdi_pipeline.jobs.query import run_query
from sdi_pipeline.jobs.worker import run_worker
from sdi_pipeline.launch.attribute_cli import main
from sdi_pipeline.launch.attribute_cli import run as attribute_main
from sdi_pipeline.launch.status import format_status, run_status
from sdi_pipeline.run.config import config_hash, structured
from sdi_pipeline.run.rundir import RunDir, prepare_run
from sdi_pipeline.toy.parity import parity_loss

SMALL = {"chains": 2, "draws": 3, "batch_size": 8, "lr": 1e-3, "init_loss_batches": 2}
CLI_SMALL = [f"bif.{k}={v}" for k, v in SMALL.items()]
PER_TOKEN = {
    "_target_": "sdi_pipeline.toy.parity.parity_loss",
    "_partial_": True,
    "per_token": True,
}


def bif_config(tmp_path: Path, **bif: Any) -> dict[str, Any]:
    cfg = toy_config(tmp_path, bif=SMALL | bif)
    cfg["method"] = "bif"
    return cfg


def bif_datasets(res_path: Path) -> dict[str, np.ndarray]:
    """Every dataset under bif/ of a results.h5, read (through the shards)."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(res_path, "r") as f:
        f["bif"].visititems(
            lambda name, obj: (
                out.__setitem__(name, np.asarray(obj)) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return out


def test_bif_keys_enter_the_hash_only_with_method_bif(tmp_path) -> None:
    cfg = toy_config(tmp_path)
    sdi = config_hash(structured(cfg))
    assert config_hash(structured(cfg | {"bif": {"draws": 7}})) == sdi
    bif = config_hash(structured(cfg | {"method": "bif"}))
    assert bif != sdi
    assert config_hash(structured(cfg | {"method": "bif", "bif": {"draws": 7}})) != bif


def _refused(tmp_path: Path, capsys, monkeypatch, *extra: str) -> str:
    argv = ["sdi-attribute", *cli_overrides(tmp_path, "method=bif", *CLI_SMALL, *extra)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not (tmp_path / "runs").exists()
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("bif.draws=1", "bif.chains=2"), "a correlation needs at least 3"),
        (("bif.chain_reduction=mean", "bif.draws=2"), "a correlation needs at least 3"),
        (("bif.lr=0",), "bif.lr is 0"),
        (("bif.batch_size=41",), "bif.batch_size=41 is larger than the 40 training examples"),
        (("bif.max_gb=1e-9",), "> bif.max_gb=1e-09"),
        (("bif.correlation=token",), "analysis.loss must return per-token losses"),
        (("bif.correlation=pairs",), "bif.correlation='pairs' is not one of sequence, token"),
    ],
)
def test_bad_bif_settings_are_refused_before_any_unit_in_one_line(
    tmp_path, capsys, monkeypatch, extra, message
) -> None:
    assert message in _refused(tmp_path, capsys, monkeypatch, *extra)


def test_world_sizes_give_identical_results_equal_to_attribute_bif(tmp_path) -> None:
    one = run_all(bif_config(tmp_path / "a"), workers=1)
    two = run_all(bif_config(tmp_path / "b"), workers=2)
    a, b = bif_datasets(one.results_path), bif_datasets(two.results_path)
    assert a.keys() == b.keys() and {"scores", "checkpoints", "llc"} <= a.keys()
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name

    cfg = one.load_config()
    ref = attribute_bif(
        build.build_model(cfg),
        list(cfg.checkpoints.paths),
        build.build_dataset(cfg, "train"),
        build.build_dataset(cfg, "query"),
        parity_loss,
        SGLDConfig(
            lr=1e-3,
            n_beta=8 / np.log(8),
            num_chains=2,
            num_draws=3,
            batch_size=8,
            num_init_loss_batches=2,
        ),
        batch_size=int(cfg.data.batch_size),
        block_size=int(cfg.data.block_size),
    )
    assert ref.bif.tobytes() == a["scores"].tobytes()
    assert ref.bif_checkpoints.tobytes() == a["checkpoints"].tobytes()
    np.testing.assert_array_equal(ref.llc, a["llc"])
    with Results.open(one.path) as res:
        assert res.method == "bif" and res.bif.shape == (40, 5)
        top = res.topk(0, 3, method="bif")
        assert [i for i, _ in top] == list(np.argsort(-a["scores"][:, 0], kind="stable")[:3])
        ds = res.to_xarray()
        assert ds.bif.dims == ("train", "query") and ds.llc.shape == (2, 2)
        with pytest.raises(Exception, match="method=bif run: it has no TracIn"):
            _ = res.tracin


def test_units_lost_in_a_kill_are_recomputed_to_the_same_results(tmp_path) -> None:
    run = run_all(bif_config(tmp_path))
    before = bif_datasets(run.results_path)
    units = sorted(run.units_dir.glob("bif-*.h5"))
    assert len(units) == 3 * 2 * 2  # blocks x checkpoints x chains
    units[0].unlink()  # killed before its file was written
    units[5].write_bytes(units[5].read_bytes()[:100])  # a partial file (a bad disk)
    (run.completions_dir / units[7].stem).unlink()  # killed between its file and marker
    shards = sorted(run.scores_dir.glob("bif-*.h5"))
    shards[0].unlink()
    # sdi-status counts BIF units, traces and shards, cheaply and with verify=true.
    for verify in (False, True):
        status = run_status(run, verify=verify)
        assert (len(status.done), len(status.missing), len(status.corrupt)) == (9, 2, 1)
        assert (len(status.query_done), len(status.scored), len(status.unscored)) == (2, 2, 1)
        assert units[5].stem in status.corrupt
    assert "query traces: 2 of 2 checkpoints" in format_status(run, status)
    with pytest.raises(Exception, match="not done or stale"):
        run_merge(run.path)
    assert run_worker(run.path, 0, 1) == 0
    assert run_merge(run.path) == 0
    after = bif_datasets(run.results_path)
    for name in before:
        assert before[name].tobytes() == after[name].tobytes(), name


def test_a_replay_that_differs_from_the_query_job_is_refused(tmp_path) -> None:
    run = prepare_run(bif_config(tmp_path))
    assert run_query(run.path) == 0
    path = run.bif_query_path(0)
    with h5py.File(path, "r+") as f:  # as if the query job ran other kernels
        data = np.asarray(f["step_losses"])
        data[0, -1] += 1e-3
        del f["step_losses"]
        f.create_dataset("step_losses", data=data)
    with pytest.raises(Exception, match="the replay of chain 0 at checkpoint 0 differs"):
        run_worker(run.path, 0, 1)


def test_views_reduce_to_the_sequence_bif_with_covariance(tmp_path) -> None:
    """With covariance the statistic is bilinear in the traces, so averaging positions
    before or after it agrees: the sequence BIF is the mean over query tokens of the
    query-token BIF, and the mean over (train token, query token) of the token pairs.
    Correlations divide by per-position norms and have no such identity."""
    from sdi_pipeline.examples.parity_dynamics import parity_loop_trace

    cfg = structured(bif_config(tmp_path))
    model = build.build_model(cfg)
    train, query = build.build_dataset(cfg, "train"), build.build_dataset(cfg, "query")
    out = attribute_bif(
        model,
        build.resolve_checkpoints(list(cfg.checkpoints.paths))[:1],
        train,
        query,
        lambda m, b: parity_loss(m, b, per_token=True),
        SGLDConfig(
            lr=1e-3, n_beta=2.0, num_chains=2, num_draws=4, batch_size=8, num_init_loss_batches=2
        ),
        batch_size=8,
        block_size=16,
        loop_trace=parity_loop_trace,
        correlation="token",
        covariance=True,
    )
    n, m = out.bif.shape
    assert out.bif_query_tokens is not None and out.bif_token_pairs is not None
    assert out.bif_loop_steps is not None and out.bif_loop_steps.shape == (n, m, 4)
    scale = np.abs(out.bif).max()
    np.testing.assert_allclose(out.bif_query_tokens.mean(-1), out.bif, atol=1e-5 * scale)
    np.testing.assert_allclose(out.bif_token_pairs.mean((-1, -2)), out.bif, atol=1e-5 * scale)


def test_sdi_attribute_method_bif_end_to_end_with_the_local_launcher(tmp_path, capsys) -> None:
    assert attribute_main(cli_overrides(tmp_path)) == 0  # SDI of the same data first
    capsys.readouterr()
    assert attribute_main(cli_overrides(tmp_path, "method=bif", *CLI_SMALL)) == 0
    out = capsys.readouterr().out
    assert "[sdi] BIF: 2 chains x 3 draws" in out and "top 3 by BIF" in out
    runs = sorted((tmp_path / "runs" / "toy-parity").glob("*/results.h5"))
    assert len(runs) == 2
    bif = next(RunDir(p.parent) for p in runs if Results.open(p).method == "bif")
    assert (bif.path / "plots" / "bif_chains.png").is_file()
    assert (bif.path / "plots" / "bif_vs_tracin.png").is_file()  # the SDI run is there
    # The same command again finds everything done: nothing is recomputed.
    stamps = {p: p.stat().st_mtime_ns for p in bif.units_dir.glob("bif-*.h5")}
    assert attribute_main(cli_overrides(tmp_path, "method=bif", *CLI_SMALL)) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in bif.units_dir.glob("bif-*.h5")}
