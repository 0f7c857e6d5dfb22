"""Per-token x per-step query features: each chosen token's own per-step gradient, summing
over tokens to the example's; SDI per (step, token) summing to SDI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_model

from sdi_pipeline.attribute import attribute
from sdi_pipeline.engine.featurizer import StepFeaturizer
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.errors import DataError
from sdi_pipeline.inputs.losses import next_token_loss

EDGES = ["tok_emb", "pos_emb", "block", "ln_f", "head"]


def _batch(n: int, length: int, seed: int, pad_from: int | None = None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 3, (n, length), generator=gen)
    mask = torch.ones_like(ids)
    if pad_from is not None:  # right padding on the first example
        mask[0, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def per_token(model, batch):
    return next_token_loss(model, batch, per_token=True)


def only_token(p: int):
    def loss(model, batch):
        return next_token_loss(model, batch, per_token=True)[:, p]

    return loss


@pytest.mark.parametrize("spec", [None, SketchSpec(m=256)], ids=["exact", "sketch"])
def test_each_token_is_the_gradient_of_its_own_loss(spec) -> None:
    model = make_model(n_loops=3)
    batch = _batch(4, 6, seed=0)
    featurizer = StepFeaturizer(model, EDGES, spec)
    feats = featurizer.featurize([batch], per_token, tokens="all")
    assert feats.tokens is not None and feats.positions is not None
    assert feats.tokens.shape == (4, 5, 5, featurizer.width)  # 3 steps + edges, 5 tokens
    assert feats.positions.tolist() == [list(range(5))] * 4
    scale = float(feats.values.abs().max())
    for p in (0, 2, 4):
        alone = featurizer.featurize([batch], only_token(p))
        torch.testing.assert_close(
            feats.tokens[:, :, p], alone.values, rtol=1e-5, atol=1e-6 * scale
        )
    # All tokens together are the whole loss: the per-token parts sum to the ordinary features.
    whole = featurizer.featurize([batch], per_token)
    torch.testing.assert_close(feats.tokens.sum(dim=2), whole.values, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(feats.values, whole.values)


def test_last_picks_each_examples_last_real_token_and_positions_count_from_the_end() -> None:
    model = make_model(n_loops=2)
    batch = _batch(3, 6, seed=1, pad_from=4)  # example 0: 4 real tokens, targets at 0..2
    featurizer = StepFeaturizer(model, ["block"], None)
    last = featurizer.featurize([batch], per_token, tokens="last")
    assert last.positions is not None and last.positions[:, 0].tolist() == [2, 4, 4]
    listed = featurizer.featurize([batch], per_token, tokens=[-1, 0])
    assert listed.positions is not None and listed.positions.tolist() == [[4, 0]] * 3
    assert last.tokens is not None and listed.tokens is not None
    torch.testing.assert_close(last.tokens[1:, :, 0], listed.tokens[1:, :, 0])


def test_token_choices_need_a_per_token_loss_and_valid_positions() -> None:
    model = make_model(n_loops=2)
    featurizer = StepFeaturizer(model, ["block"], SketchSpec(m=64))
    batch = _batch(2, 5, seed=2)
    with pytest.raises(DataError, match=r"need a loss_fn that returns per-token losses"):
        featurizer.featurize([batch], next_token_loss, tokens="last")
    with pytest.raises(DataError, match=r"positions \[7\] are outside"):
        featurizer.featurize([batch], per_token, tokens=[0, 7])
    with pytest.raises(DataError, match=r"'all', 'last' or a list"):
        featurizer.featurize([batch], per_token, tokens="first")


def _save(model, path) -> None:
    torch.save({"model_state_dict": model.state_dict(), "lr": 0.5}, path)


def test_attribute_sdi_per_token_sums_to_sdi(tmp_path) -> None:
    model = make_model(n_loops=3)
    paths = []
    for k in range(2):
        _save(make_model(n_loops=3, seed=k), tmp_path / f"c{k}.pt")
        paths.append(tmp_path / f"c{k}.pt")
    train = [_batch(5, 6, seed=3)]
    query = [_batch(2, 6, seed=4)]
    spec = SketchSpec(m=512)
    result = attribute(
        model, ["block"], paths, train, query, per_token, spec=spec, query_tokens="all"
    )
    assert result.sdi_tokens is not None and result.sdi_tokens.shape == (5, 2, 3, 5)
    scale = float(result.sdi.abs().max())
    torch.testing.assert_close(
        result.sdi_tokens.sum(dim=3), result.sdi, rtol=1e-4, atol=1e-5 * scale
    )
    energy = result.token_map(0)
    assert energy.shape == (3, 5)
    torch.testing.assert_close(energy, result.sdi_tokens[:, 0].abs().sum(dim=0))
    torch.testing.assert_close(result.token_map(1, train=2), result.sdi_tokens[2, 1])


def _token_run_config(tmp_path, query_tokens) -> dict:
    """A toy run on token sequences with a per-token next-token loss."""
    import numpy as np
    from pipeline_helpers import toy_config

    gen = np.random.default_rng(0)
    np.save(tmp_path / "train.npy", gen.integers(0, 3, (24, 7)))
    np.save(tmp_path / "query.npy", gen.integers(0, 3, (3, 7)))

    def tokens(name: str) -> dict:
        return {"_target_": "sdi_pipeline.inputs.data.token_dataset", "path": str(tmp_path / name)}

    return toy_config(
        tmp_path,
        data={
            "train": tokens("train.npy"),
            "query": tokens("query.npy"),
            "collate": {"_target_": "sdi_pipeline.inputs.data.PadCollate", "pad_id": 0},
        },
        analysis={
            "loss": {
                "_target_": "sdi_pipeline.inputs.losses.next_token_loss",
                "_partial_": True,
                "per_token": True,
            },
            "query_tokens": query_tokens,
        },
    )


@pytest.mark.parametrize("choice", ["all", "last"])
def test_pipeline_writes_per_token_sdi_equal_to_the_engines(tmp_path, choice) -> None:
    from pipeline_helpers import run_all
    from torch.utils.data import DataLoader

    from sdi_pipeline.formats.results import Results
    from sdi_pipeline.inputs import build

    run = run_all(_token_run_config(tmp_path, choice), workers=2)
    cfg = run.load_config()
    collate = build.build_collate(cfg)
    expected = attribute(
        build.build_model(cfg),
        ["block"],
        list(cfg.checkpoints.paths),
        DataLoader(build.build_dataset(cfg, "train"), batch_size=8, collate_fn=collate),
        DataLoader(build.build_dataset(cfg, "query"), batch_size=8, collate_fn=collate),
        build.build_loss(cfg),
        spec=SketchSpec(m=128),
        query_tokens=choice,
    )
    assert expected.sdi_tokens is not None and expected.token_positions is not None
    with Results.open(run.path) as res:
        assert res.has_tokens and res.has_sdi_tokens
        got = torch.from_numpy(np.asarray(res.sdi_tokens))
        scale = float(got.abs().max())
        torch.testing.assert_close(got, expected.sdi_tokens, rtol=1e-4, atol=1e-5 * scale)
        assert res.token_positions.tolist() == expected.token_positions.tolist()
        if choice == "all":  # the tokens' parts add up to SDI
            sdi = torch.from_numpy(np.asarray(res.sdi))
            torch.testing.assert_close(got.sum(dim=3), sdi, rtol=1e-4, atol=1e-5 * scale)
        energy = res.token_map(1)
        torch.testing.assert_close(
            torch.from_numpy(energy).float(), got[:, 1].abs().sum(dim=0), rtol=1e-4, atol=1e-6
        )
        best = res.topk(2, 3, step="step 4", token=0)
        order = got[:, 2, 3, 0].argsort(descending=True)[:3]
        assert [i for i, _ in best] == order.tolist()


def test_per_token_queries_need_a_per_token_loss_before_any_job(tmp_path) -> None:
    from pipeline_helpers import cli_overrides

    from sdi_pipeline.launch.attribute_cli import run

    with pytest.raises(DataError, match=r"need a loss_fn that returns per-token losses"):
        run(cli_overrides(tmp_path, "analysis.query_tokens=last"))  # parity_loss is (B,)
    assert not (tmp_path / "runs").exists()


def test_per_token_query_sketches_over_the_size_limit_are_refused(tmp_path) -> None:
    from sdi_pipeline.errors import ConfigError
    from sdi_pipeline.launch.attribute_cli import run

    cfg = _token_run_config(tmp_path, "all")
    overrides = [
        "model=toy",
        f"checkpoints.paths=[{tmp_path / 'ckpts'}/ckpt-*.pt]",
        "checkpoints.prepare=null",
        f"run.root={tmp_path / 'runs'}",
        "data=tokens",
        f"data.train.path={cfg['data']['train']['path']}",
        f"data.query.path={cfg['data']['query']['path']}",
        "+analysis.loss.per_token=true",
        "analysis.query_tokens=all",
        "analysis.query_tokens_max_gb=0.0001",
        "wandb=disabled",
    ]
    with pytest.raises(ConfigError, match=r"needs .* GiB of query sketches .*query_tokens_max_gb"):
        run(overrides)
