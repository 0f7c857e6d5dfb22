"""Per-token x per-step query features: each chosen token's own per-step gradient, summing
over tokens to the example's; SDI per (step, token) summing to SDI."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from sdi_pipeline.attribute import attribute
from sdi_pipeline.engine.featurizer import StepFeaturizer
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.errors import DataError
from sdi_pipeline.losses import next_token_loss

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
