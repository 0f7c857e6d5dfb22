"""BIF math core against devinterp 2.0.1: the SGLD update, the traces, the correlations."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from sdi_pipeline.engine.bif import TILE, chain_samples, compute_bif, score_block, standardize
from sdi_pipeline.engine.sgld import (
    LossRecorder,
    SGLDConfig,
    batch_order,
    chain_seed,
    initial_loss,
    loop_step_losses,
    run_chain,
    sample,
    sgld_step,
)
from sdi_pipeline.errors import ConfigError, DataError

devinterp = pytest.importorskip("devinterp", reason="pip install -e .[dev] installs devinterp")
xr = pytest.importorskip("xarray")
datasets = pytest.importorskip("datasets")

from devinterp.optim import SGMCMC  # noqa: E402
from devinterp.slt.bif import compute_bif as devinterp_compute_bif  # noqa: E402
from devinterp.slt.llc import compute_llc  # noqa: E402
from devinterp.slt.lm_loss import compute_per_token_loss  # noqa: E402
from devinterp.slt.sampling import sample as devinterp_sample  # noqa: E402

VOCAB, LENGTH = 11, 7


def tiny_lm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, VOCAB))


def token_dataset(n: int, seed: int = 1):
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return compute_per_token_loss(model, batch["input_ids"])


def devinterp_tree(traces: dict[str, torch.Tensor]):
    """A DataTree in the layout devinterp's sample() writes: loss_<name> (chain, draw,
    batch_<name>, token_pos) and input_ids_<name> (batch_<name>, token)."""
    data = {}
    for name, t in traces.items():
        n, k = t.shape[2:]
        data[f"loss_{name}"] = (("chain", "draw", f"batch_{name}", "token_pos"), t.numpy())
        data[f"input_ids_{name}"] = ((f"batch_{name}", "token"), torch.zeros(n, k + 1).numpy())
    return xr.DataTree(dataset=xr.Dataset(data))


def random_traces(c: int, d: int, n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(c, d, 1, 1, generator=g)  # a common factor so correlations are sizeable
    return (2.0 + shared + torch.randn(c, d, n, k, generator=g)).float()


@pytest.mark.parametrize("reduce", ["stack", "mean"])
@pytest.mark.parametrize("covariance", [False, True])
@pytest.mark.parametrize(
    ("method", "average"), [("sequence", False), ("token", False), ("token", True)]
)
def test_bif_equals_devinterp_compute_bif(method, average, covariance, reduce):
    train, query = random_traces(3, 6, 5, 4, seed=1), random_traces(3, 6, 3, 4, seed=2)
    ours = compute_bif(
        train,
        query,
        method=method,
        reduce=reduce,
        average_tokenwise=average,
        covariance=covariance,
    )
    # devinterp concatenates observables in sorted key order: "query" rows come first.
    theirs = devinterp_compute_bif(
        devinterp_tree({"train": train, "query": query}),
        correlation_method=method,
        reduce_chain_dimension_method=reduce,
        batch_index_range_1=range(3, 8),
        batch_index_range_2=range(3),
        average_tokenwise_bif=average,
        compute_covariance=covariance,
        device="cpu",
    )["influences"].values
    expected = torch.as_tensor(theirs, dtype=torch.float32)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=2e-5, atol=2e-6)


def test_sgld_update_is_the_formula_and_devinterps_step():
    config = SGLDConfig(
        lr=0.03,
        n_beta=7.0,
        localization=2.0,
        llc_weight_decay=0.5,
        noise_level=0.8,
        bounding_box_size=0.05,
    )
    g = torch.Generator().manual_seed(5)
    anchor = torch.randn(4, 3, generator=g)
    theta = anchor + 0.04 * torch.randn(4, 3, generator=g)
    grad = torch.randn(4, 3, generator=g)
    ours, theirs = theta.clone(), theta.clone()
    ours.grad = grad.clone()
    theirs.grad = grad.clone()

    sgld_step([ours], [anchor], config, torch.Generator().manual_seed(9))
    noise = torch.normal(0.0, 0.8, size=(4, 3), generator=torch.Generator().manual_seed(9))
    d = 7.0 * grad + 0.5 * theta + 2.0 * (theta - anchor)
    expected = theta - 0.015 * d + 0.03**0.5 * noise
    expected = torch.minimum(torch.maximum(expected, anchor - 0.05), anchor + 0.05)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert (ours != theta).any() and (ours == anchor + 0.05).any()  # the box clamped some

    # devinterp's optimizer stores θ₀ when it is built: build it at the anchor.
    theirs.data.copy_(anchor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = SGMCMC.sgld(
            [theirs],
            lr=0.03,
            nbeta=7.0,
            localization=2.0,
            weight_decay=0.5,
            noise_level=0.8,
            bounding_box_size=0.05,
        )
    theirs.data.copy_(theta)
    opt.step(noise_generator=torch.Generator().manual_seed(9))
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(("burnin", "between"), [(2, 1), (1, 3)])
def test_devinterp_seeding_reproduces_devinterps_traces(tmp_path: Path, burnin, between):
    model, data = tiny_lm(), token_dataset(24)
    config = SGLDConfig(
        lr=0.01,
        n_beta=20.0,
        num_chains=2,
        num_draws=4,
        batch_size=4,
        num_burnin_steps=burnin,
        num_steps_bw_draws=between,
        localization=1.0,
        num_init_loss_batches=3,
        seed=7,
        devinterp_seeding=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = devinterp_sample(
            model,
            data,
            {"obs": (data, 2)},
            lr=0.01,
            n_beta=20.0,
            num_chains=2,
            num_draws=4,
            batch_size=4,
            num_burnin_steps=burnin,
            num_steps_bw_draws=between,
            num_init_loss_batches=3,
            init_seed=7,
            localization=1.0,
            device="cpu",
            output_path=tmp_path / "samples.zarr",
        )
    ds = tree.dataset
    obs_ids = torch.as_tensor(ds["input_ids_obs"].values)
    batches = [{"input_ids": obs_ids[i : i + 4]} for i in range(0, len(obs_ids), 4)]
    recorder = LossRecorder(batches, lm_loss, num_chains=2, num_draws=4)
    result = sample(model, data, lm_loss, config, {"obs": recorder})

    assert torch.equal(result.traces["obs"], torch.as_tensor(ds["loss_obs"].values))
    if between == 1:  # then both run the same steps, and the LLC is over the same losses
        llc = compute_llc(tree)
        assert result.llc_mean == pytest.approx(float(llc["llc_mean"]), rel=1e-5)
        torch.testing.assert_close(
            result.step_losses.float(), torch.as_tensor(llc["loss_trace"].values)
        )


def test_chain_replays_from_seed_and_chain_index():
    model, data = tiny_lm(), token_dataset(16)
    config = SGLDConfig(lr=0.01, n_beta=10.0, num_chains=2, num_draws=3, batch_size=4)
    init = initial_loss(model, data, lm_loss, config)
    batches = [{"input_ids": data[0:3]["input_ids"]}]

    def traces_of(chain: int) -> torch.Tensor:
        rec = LossRecorder(batches, lm_loss, num_chains=2, num_draws=3)
        run_chain(
            model,
            data,
            lm_loss,
            config,
            chain,
            lambda d, m: rec.record(chain, d, m),
            init_loss=init,
        )
        assert rec.traces is not None
        return rec.traces[chain]

    assert torch.equal(traces_of(1), traces_of(1))
    assert not torch.equal(traces_of(0), traces_of(1))
    # Stable across processes and machines: a hash, not Python's hash().
    assert chain_seed(100, 1) == chain_seed(100, 1) != chain_seed(101, 0)
    assert chain_seed(100, 1, devinterp=True) == chain_seed(101, 0, devinterp=True) == 101
    assert torch.equal(batch_order(16, 4, 9, seed=3)[:4], batch_order(16, 4, 9, seed=3)[4:8])


def test_a_diverging_chain_is_stopped_with_the_fix():
    model, data = tiny_lm(), token_dataset(16)
    config = SGLDConfig(lr=50.0, n_beta=100.0, num_chains=1, num_draws=20, batch_size=4)
    with pytest.raises(ConfigError, match=r"diverged.*lr=50 with n_beta=100.*try lr=5\b"):
        sample(model, data, lm_loss, config, {})


def test_too_few_draws_and_constant_traces_are_refused():
    traces = random_traces(1, 2, 4, 1, seed=0)
    with pytest.raises(ConfigError, match=r"at least 3 samples.*got 2"):
        compute_bif(traces, traces)
    assert compute_bif(traces, traces, covariance=True).shape == (4, 4)  # 2 are enough

    flat = random_traces(2, 5, 4, 3, seed=0)
    flat[:, :, 2, 1] = 1.5
    with pytest.raises(DataError, match=r"examples 2 are constant.*undefined"):
        compute_bif(flat, flat, method="token")
    nan = flat.clone()
    nan[1, 3, 0, 0] = float("nan")
    with pytest.raises(DataError, match="non-finite loss traces for examples 0"):
        compute_bif(nan, nan, covariance=True)


def test_block_scores_are_byte_identical_whatever_the_split():
    n = 3 * TILE + 11
    train = chain_samples(random_traces(3, 9, n, 2, seed=3))
    z_query = standardize(chain_samples(random_traces(3, 9, 5, 2, seed=4)))
    whole = score_block(standardize(train), z_query)
    for cuts in ([0, 37, 150, n], [0, 1, TILE, TILE + 1, n], [0, n - 1, n]):
        parts = [
            score_block(standardize(train[a:b], first_index=a), z_query, first_index=a)
            for a, b in itertools.pairwise(cuts)
        ]
        assert torch.equal(torch.cat(parts), whole)


def test_covariance_token_and_query_bif_average_to_the_sequence_bif():
    train, query = random_traces(2, 8, 6, 5, seed=5), random_traces(2, 8, 4, 5, seed=6)
    seq = compute_bif(train, query, method="sequence", covariance=True)
    token_avg = compute_bif(train, query, method="token", average_tokenwise=True, covariance=True)
    per_query_token = compute_bif(train, query, method="query", covariance=True)
    assert per_query_token.shape == (6, 4, 5)
    torch.testing.assert_close(token_avg, seq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_query_token.mean(dim=2), seq, rtol=1e-5, atol=1e-6)
    # For correlations the identity does not hold: the check is not vacuous.
    corr_avg = compute_bif(train, query, method="token", average_tokenwise=True)
    assert not torch.allclose(corr_avg, compute_bif(train, query), atol=1e-3)


@dataclass
class _Trace:
    margins: torch.Tensor


def test_loop_step_bif_records_the_readout_loss_after_each_step():
    model, data = tiny_lm(), token_dataset(16)
    steps = 3

    def trace(m: nn.Module, batch: dict[str, torch.Tensor]) -> _Trace:
        logits = m(batch["input_ids"])  # (B, T, V): read "step t" off position t
        margins = logits[:, :steps, 1] - logits[:, :steps, 2]
        return _Trace(margins)

    config = SGLDConfig(lr=0.01, n_beta=10.0, num_chains=2, num_draws=4, batch_size=4)
    queries = LossRecorder(
        [{"input_ids": data[0:2]["input_ids"]}], loop_step_losses(trace), num_chains=2, num_draws=4
    )
    train = LossRecorder(
        [{"input_ids": data[2:7]["input_ids"]}], lm_loss, num_chains=2, num_draws=4
    )
    result = sample(model, data, lm_loss, config, {"train": train, "query": queries})
    q = result.traces["query"]
    with torch.no_grad():
        at_zero = torch.nn.functional.softplus(
            -trace(model, {"input_ids": data[0:2]["input_ids"]}).margins
        )
    assert q.shape == (2, 4, 2, steps) and not torch.equal(q[0, 0], at_zero)
    assert compute_bif(result.traces["train"], q, method="query").shape == (5, 2, steps)
