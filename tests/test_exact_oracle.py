"""Exact mode agrees with an independent torch.func oracle of per-step gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, parity_batch
from oracle import oracle_step_gradients
from torch.func import functional_call, grad, vmap

from sdi_pipeline.engine.featurizer import StepFeaturizer
from sdi_pipeline.engine.slots import SlotLayout
from sdi_pipeline.toy.parity import parity_loss

EDGES = ["tok_emb", "pos_emb", "block", "ln_f", "head"]


@pytest.mark.parametrize("n_loops", [4, 6])
@pytest.mark.parametrize("with_edges", [False, True])
def test_exact_mode_matches_unrolled_oracle(
    n_loops: int, with_edges: bool, device: torch.device
) -> None:
    model = make_model(n_loops=n_loops)
    batch = parity_batch(5)
    targets = EDGES if with_edges else ["block"]
    # The features on ``device``, the oracle on the CPU: CUDA is checked against it.
    feats = StepFeaturizer(make_model(n_loops=n_loops).to(device), targets, None).featurize(
        [{k: v.to(device) for k, v in batch.items()}], parity_loss
    )
    assert feats.values.device.type == device.type
    values = feats.values.cpu()
    expected, names = oracle_step_gradients(
        model, batch["tokens"], batch["target"], n_loops=n_loops, with_edges=with_edges
    )
    assert feats.layout == SlotLayout(n_loops, prelude=with_edges, readout=with_edges)
    assert names == [p.name for p in StepFeaturizer(model, targets, None).params]
    assert values.shape == expected.shape
    scale = expected.abs().max()
    torch.testing.assert_close(values, expected, rtol=1e-4, atol=1e-5 * float(scale))
    # Every loop step carries gradient (the test would be vacuous otherwise).
    loop = values[:, int(with_edges) : int(with_edges) + n_loops]
    assert bool((loop.norm(dim=2) > 1e-3 * float(scale)).all())


def test_slots_sum_to_the_ordinary_per_example_gradient(model, batch) -> None:
    feats = StepFeaturizer(model, EDGES, None).featurize([batch], parity_loss)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p, tok, tgt):
        out = functional_call(model, p, (tok[None],))
        return torch.nn.functional.cross_entropy(out[:, -1], tgt[None])

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, batch["tokens"], batch["target"])
    order = sorted(grads)
    full = torch.cat([grads[n].reshape(len(batch["tokens"]), -1) for n in order], dim=1)
    torch.testing.assert_close(feats.summed(), full, rtol=1e-4, atol=1e-6)


def test_featurizing_leaves_the_model_as_it_was(model, batch) -> None:
    model.train()
    model.block.mlp.fc_in.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    StepFeaturizer(model, ["block.attn"], None).featurize([batch], parity_loss)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert not model._forward_hooks and not model.block.attn.q._forward_hooks
