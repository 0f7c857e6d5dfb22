"""The parity-dynamics example: per-step states of the looped model, its training and data,
and `sdi-attribute model=parity_dynamics` end to end (loop trace in results.h5, the
three-panel figure in plots/ and in W&B)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, parity_batch

from sdi_pipeline.errors import DataError
from sdi_pipeline.examples.parity_dynamics import (
    alternating_probe,
    held_out,
    parity_dynamics_data,
    parity_loop_trace,
    prefix_parity_loss,
    train_parity_dynamics,
)
from sdi_pipeline.inputs.dynamics import LoopTrace, trace_batches
from sdi_pipeline.toy.parity import make_parity_dataset

TINY = {"n_bits": 6, "n_train": 64, "n_loops": 3, "d_model": 16, "d_mlp": 32}


def test_loop_states_are_what_forward_reads_out_after_each_step() -> None:
    model = make_model(n_loops=3)
    tokens = parity_batch(4)["tokens"]
    states = model.loop_states(tokens)
    assert states.shape == (4, 3, tokens.shape[1], 32)
    for t in range(3):
        torch.testing.assert_close(model.readout(states[:, t]), model(tokens, n_loops=t + 1))
    assert model.loop_states(tokens, n_loops=0).shape == (4, 0, tokens.shape[1], 32)


def test_the_trace_is_the_answer_tokens_state_and_margin_per_step() -> None:
    model = make_model(n_loops=3)
    batch = parity_batch(5)
    trace = parity_loop_trace(model, batch)
    assert trace.states.shape == (5, 3, 32) and trace.margins.shape == (5, 3)
    for t in range(3):
        logits = model(batch["tokens"], n_loops=t + 1)[:, -1]
        right = logits.gather(1, batch["target"][:, None])[:, 0]
        wrong = logits.gather(1, 1 - batch["target"][:, None])[:, 0]
        torch.testing.assert_close(trace.margins[:, t], right - wrong)
    torch.testing.assert_close(trace.states[:, -1], model.loop_states(batch["tokens"])[:, -1, -1])


def test_a_trace_of_the_wrong_shape_is_refused_in_one_line() -> None:
    model = make_model(n_loops=3)

    def short(model, batch):  # forgets the last step
        full = parity_loop_trace(model, batch)
        return LoopTrace(full.states[:, :2], full.margins[:, :2])

    with pytest.raises(DataError, match=r"the targets show 3 loop steps: return one state"):
        trace_batches(short, model, [parity_batch(2)], loop_steps=3)
    with pytest.raises(DataError, match=r"must return sdi_pipeline.inputs.dynamics.LoopTrace"):
        trace_batches(lambda m, b: (1, 2), model, [parity_batch(2)], loop_steps=3)
    with pytest.raises(DataError, match=r"of torch tensors, got ndarray and ndarray"):
        trace = LoopTrace(np.zeros((2, 3, 4)), np.zeros((2, 3)))  # type: ignore[arg-type]
        trace_batches(lambda m, b: trace, model, [parity_batch(2)], loop_steps=3)


def test_a_wrong_trace_is_refused_before_any_job(tmp_path) -> None:
    from pipeline_helpers import cli_overrides

    from sdi_pipeline.launch.attribute_cli import run

    trace = "{_target_:pipeline_helpers.short_trace,_partial_:true}"
    with pytest.raises(DataError, match=r"returned \(5, 3\) .* targets show 4 loop steps"):
        run(cli_overrides(tmp_path, f"analysis.loop_trace={trace}"))
    assert not (tmp_path / "runs").exists()


def test_the_trace_is_query_side_only(tmp_path) -> None:
    from pipeline_helpers import toy_config

    from sdi_pipeline.run.config import config_hash, structured, train_hash

    plain = structured(toy_config(tmp_path))
    node = {"_target_": "sdi_pipeline.examples.parity_dynamics.parity_loop_trace",
            "_partial_": True}  # fmt: skip
    traced = structured(toy_config(tmp_path, analysis={"loop_trace": node}))
    assert config_hash(traced) != config_hash(plain)  # a run of its own ...
    assert train_hash(traced) == train_hash(plain)  # ... that reuses the train sketches


def test_queries_are_the_alternating_probe_then_unseen_inputs() -> None:
    task = {"n_bits": 6, "n_train": 40, "seed": 3}
    probe = alternating_probe(6)
    assert probe.tokens.tolist() == [[0, 1, 0, 1, 0, 1, 2]] and probe.targets.tolist() == [1]
    train = {tuple(t) for t in make_parity_dataset(40, 6, 3).tokens.tolist()}
    unseen = held_out(task)
    rows = [tuple(t) for t in unseen.tokens.tolist()]
    assert len(set(rows)) == len(rows) == 64 - len(train | {tuple(probe.tokens[0].tolist())})
    assert not set(rows) & train
    assert unseen.targets.tolist() == (unseen.tokens[:, :-1].sum(1) % 2).tolist()
    assert held_out(task, 5).tokens.tolist() == unseen.tokens[:5].tolist()


def test_the_training_loss_supervises_the_running_parity_everywhere() -> None:
    model = make_model(n_loops=2)
    tokens = parity_batch(4)["tokens"]
    logits = model(tokens)
    running = tokens[:, :-1].cumsum(1) % 2
    per_position = [F.cross_entropy(logits[:, p], running[:, min(p, 5)]) for p in range(7)]
    torch.testing.assert_close(prefix_parity_loss(model, tokens), torch.stack(per_position).mean())


def test_training_writes_checkpoints_the_toy_factories_read(tmp_path) -> None:
    from sdi_pipeline.toy.checkpoints import model_from_checkpoints

    paths = train_parity_dynamics(tmp_path, steps=4, n_checkpoints=2, progress=False, **TINY)
    assert [p.name for p in paths] == ["ckpt-000002.pt", "ckpt-000004.pt"]
    ckpt = torch.load(paths[-1], weights_only=True)
    assert ckpt["task"]["n_bits"] == 6 and ckpt["lr"] == pytest.approx(1e-3 * 4 / 100)
    model = model_from_checkpoints([str(tmp_path / "ckpt-*.pt")])
    assert model.config.n_loops == 3
    queries = parity_dynamics_data([str(paths[0])], "query", limit=3)
    assert len(queries) == 4 and queries.tokens[0].tolist() == [0, 1, 0, 1, 0, 1, 2]
    assert len(parity_dynamics_data([str(paths[0])], "train", limit=10)) == 10


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """`sdi-attribute model=parity_dynamics` on briefly trained tiny checkpoints."""
    from pipeline_helpers import cli_overrides

    from sdi_pipeline.launch.attribute_cli import run

    tmp = tmp_path_factory.mktemp("parity_dynamics")
    paths = train_parity_dynamics(tmp / "ex", steps=6, n_checkpoints=2, progress=False, **TINY)
    overrides = cli_overrides(tmp, "model=parity_dynamics", "launcher.workers=1")
    overrides[0] = f"checkpoints.paths=[{tmp / 'ex'}/ckpt-*.pt]"
    overrides = [o for o in overrides if not o.startswith("data.query.limit")]
    overrides.append("data.query.limit=4")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        assert run(overrides) == 0
    return tmp, paths


def test_the_example_records_the_loop_and_draws_the_figure(example_run) -> None:
    from sdi_pipeline.formats.results import Results
    from sdi_pipeline.toy.train import load_toy_model

    tmp, paths = example_run
    with Results.open(tmp / "runs" / "parity_dynamics") as res:
        assert res.has_loop_trace and res.has_sdi_tokens
        assert res.token_positions.tolist() == [[6]] * 5  # the marker, for the probe + 4
        queries = parity_dynamics_data([str(paths[0])], "query", limit=4)
        batch = {"tokens": queries.tokens, "target": queries.targets}
        for k, path in enumerate(paths):
            with torch.no_grad():
                expected = parity_loop_trace(load_toy_model(path), batch)
            np.testing.assert_allclose(res.loop_margins(k), expected.margins, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(res.loop_states(k), expected.states, rtol=1e-5, atol=1e-6)
        # The loss lives at the answer token, so SDI there is the whole SDI.
        np.testing.assert_allclose(res.sdi_tokens[:, :, :, 0], res.sdi[...], rtol=1e-5, atol=1e-8)
        coords, explained = res.phase_portrait()
        assert coords.shape == (5, 3, 2) and 0 < explained[1] <= explained[0] <= 1
        states = res.loop_states().reshape(-1, 16)
        centred = states - states.mean(0)
        spread = np.linalg.svd(centred, compute_uv=False) ** 2
        np.testing.assert_allclose(
            (coords.reshape(-1, 2) ** 2).sum(0), spread[:2], rtol=1e-4, atol=1e-10
        )
        ds = res.to_xarray()
        assert ds.loop_margins.dims == ("checkpoint", "query", "loop_step")
        assert list(ds.loop_step.values) == ["step 1", "step 2", "step 3"]
        run_dir = res.path.parent
    assert (run_dir / "plots" / "loop_dynamics.png").stat().st_size > 10_000


def test_the_figure_and_margins_are_logged_to_wandb(example_run, monkeypatch) -> None:
    from test_wandb_log import _read_finished

    from sdi_pipeline.formats.results import find_results
    from sdi_pipeline.report.wandb_log import WandbLogger
    from sdi_pipeline.run.rundir import RunDir

    tmp, _ = example_run
    run = RunDir(find_results(tmp / "runs" / "parity_dynamics").parent)
    cfg = run.load_config()
    cfg.wandb.mode = "offline"
    for var in [v for v in __import__("os").environ if v.startswith("WANDB_")]:
        monkeypatch.delenv(var)
    with WandbLogger(cfg, run, "merge", "merge") as wb:
        wb.log_merge()
    import wandb

    wandb.teardown()
    (folder,) = (run.path / "wandb").glob("offline-run-*")
    logged = _read_finished(folder)
    assert logged.logged("loop/dynamics")["_type"] == "image-file"
    columns, rows = logged.table("loop/margin")
    assert columns == ["checkpoint", "query", "step", "value"] and len(rows) == 2 * 5 * 3
    from sdi_pipeline.formats.results import Results

    with Results.open(run.path) as res:
        first = [r[3] for r in rows if r[0] == 1 and r[1] == 2]
        np.testing.assert_allclose(first, res.loop_margins(1)[2], rtol=1e-6)
