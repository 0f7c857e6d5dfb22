"""Scoring: SDI, step matrix and TracIn contractions; top-k; streamed totals; in-memory
attribution across checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, parity_batch

from sdi_pipeline.attribute import attribute
from sdi_pipeline.engine.featurizer import StepFeaturizer
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.errors import ConfigError
from sdi_pipeline.inputs.checkpoints import CheckpointSpec
from sdi_pipeline.jobs import scores
from sdi_pipeline.toy.parity import parity_loss


def _features(seed: int, n: int, s: int, w: int = 24) -> torch.Tensor:
    return torch.randn(n, s, w, generator=torch.Generator().manual_seed(seed))


def test_sdi_sums_to_tracin_and_step_matrix_sums_to_sdi() -> None:
    train, query = _features(0, 7, 5), _features(1, 3, 4)
    sdi = scores.query_step_sdi(train, query)
    matrix = scores.step_matrix(train, query)
    assert sdi.shape == (7, 3, 4) and matrix.shape == (7, 3, 5, 4)
    torch.testing.assert_close(sdi.sum(dim=2), scores.tracin(train, query))
    torch.testing.assert_close(matrix.sum(dim=2), sdi)
    by_hand = torch.einsum("isw,jtw->ijst", train, query)
    torch.testing.assert_close(matrix, by_hand)
    torch.testing.assert_close(scores.query_step_sdi(train.sum(1), query), sdi)


def test_streamed_blocks_give_the_one_shot_scores() -> None:
    """The merge's path (blocks of rows, checkpoints accumulated with eta, totals folded per
    block) equals the in-memory contraction, top-k and per-step totals."""
    train = [_features(10 + k, 50, 3) for k in range(2)]
    query = [_features(20 + k, 4, 3) for k in range(2)]
    etas = [0.5, 2.0]
    sdi = sum(
        eta * scores.query_step_sdi(t, q) for t, q, eta in zip(train, query, etas, strict=True)
    )
    assert isinstance(sdi, torch.Tensor)
    totals = scores.ScoreTotals(4, 3, k=5)
    rows = []
    for start in range(0, 50, 16):
        block = torch.zeros(min(50, start + 16) - start, 4 * 3)
        for t, q, eta in zip(train, query, etas, strict=True):
            scores.add_sdi(block, t[start : start + 16], scores.flat_queries(q), eta)
        rows.append(totals.update(block.reshape(-1, 4, 3), start))
    torch.testing.assert_close(torch.cat(rows), sdi.sum(dim=2))
    for sign in scores.SIGNS:
        one_shot = scores.top_k(sdi.sum(dim=2), 5, sign)
        streamed = totals.tops[("overall", sign)].result()
        assert streamed.indices.tolist() == one_shot.indices.tolist()
        per_step = scores.top_k(sdi, 5, sign)
        assert totals.tops[("per_step", sign)].indices.tolist() == per_step.indices.tolist()
    torch.testing.assert_close(totals.energy, sdi.abs().sum(dim=0).double(), rtol=1e-5, atol=0)
    share = totals.signed_share()
    torch.testing.assert_close(share.abs().sum(dim=1), torch.ones(4, dtype=torch.float64))
    signed = sdi.sum(dim=0).double()  # float32 rows summed in another order: 1e-5
    torch.testing.assert_close(share, signed / signed.abs().sum(1, keepdim=True), rtol=1e-5, atol=0)


def test_top_k_orders_scores_per_query_and_step() -> None:
    values = torch.tensor([[0.1, -2.0], [3.0, 0.5], [-1.0, 1.5], [2.0, -0.1]])
    top = scores.top_k(values, 2)
    assert top.indices.tolist() == [[1, 3], [2, 1]]
    assert top.scores.tolist() == [[3.0, 2.0], [1.5, 0.5]]
    neg = scores.top_k(values, 1, sign="negative")
    assert neg.indices.tolist() == [[2], [0]]
    per_step = scores.top_k(torch.stack([values, -values], dim=2), 1)
    assert per_step.indices.shape == (2, 2, 1)
    assert per_step.indices[:, 1, 0].tolist() == [2, 0]
    with pytest.raises(ConfigError, match="sign"):
        scores.top_k(values, 1, sign="up")  # type: ignore[arg-type]


def _save(model, path, lr: float) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    torch.save(
        {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}, path
    )


def test_attribute_sums_checkpoints_with_their_learning_rates(tmp_path) -> None:
    first, second = make_model(seed=0), make_model(seed=1)
    _save(first, tmp_path / "a.pt", lr=0.5)
    _save(second, tmp_path / "b.pt", lr=0.25)
    train, query = parity_batch(6, seed=1), parity_batch(3, seed=2)
    model = make_model(seed=7)
    out = attribute(
        model,
        ["block"],
        [tmp_path / "a.pt", CheckpointSpec(tmp_path / "b.pt", eta=2.0)],
        [train],
        [query],
        parity_loss,
        spec=None,
        with_step_matrix=True,
    )
    assert out.etas == [0.5, 2.0]
    expected = 0
    for ckpt_model, eta in ((first, 0.5), (second, 2.0)):
        fz = StepFeaturizer(ckpt_model, ["block"], None)
        tr, qu = fz.featurize([train], parity_loss), fz.featurize([query], parity_loss)
        expected = expected + eta * torch.einsum("isw,jtw->ijt", tr.values, qu.values)
    torch.testing.assert_close(out.sdi, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.tracin, out.sdi.sum(2))
    assert out.step_matrix is not None
    torch.testing.assert_close(out.step_matrix.sum(2), out.sdi, rtol=1e-4, atol=1e-6)
    assert out.top_k(2, step=3).indices.shape == (3, 2)


def test_sketched_sdi_tracks_exact_sdi(tmp_path) -> None:
    model = make_model(seed=0)
    _save(model, tmp_path / "a.pt", lr=1.0)
    train, query = [parity_batch(16, seed=1)], [parity_batch(4, seed=2)]
    exact = attribute(model, ["block"], [tmp_path / "a.pt"], train, query, parity_loss, spec=None)
    sketched = attribute(
        model, ["block"], [tmp_path / "a.pt"], train, query, parity_loss, spec=SketchSpec(m=8192)
    )
    rel = (sketched.sdi - exact.sdi).norm() / exact.sdi.norm()
    assert float(rel) < 0.1, float(rel)
