"""Sketch properties: kernel equivalence, unbiasedness, 1/sqrt(m) error, determinism."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from collections import OrderedDict

import pytest
import torch
from conftest import make_model, parity_batch
from torch import nn

from sdi_pipeline.engine.featurizer import StepFeaturizer
from sdi_pipeline.engine.hashing import induced_buckets, induced_signs, make_count_sketch_hash
from sdi_pipeline.engine.kernels import (
    Workspace,
    choose_linear_kernel,
    embedding_weight,
    linear_weight_dense,
    linear_weight_fft,
)
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.toy.parity import parity_loss

EDGES = ["tok_emb", "pos_emb", "block", "ln_f", "head"]


def induced_count_sketch(matrices: torch.Tensor, row, col) -> torch.Tensor:
    """CountSketch of (B, rows, cols) matrices under the induced hash, one entry at a time."""
    buckets, signs = induced_buckets(row, col), induced_signs(row, col)
    flat = matrices.reshape(matrices.shape[0], -1)
    out = torch.zeros(flat.shape[0], row.m)
    for k in range(flat.shape[1]):
        out[:, buckets[k]] += signs[k] * flat[:, k]
    return out


@pytest.mark.parametrize(("b", "t", "d_out", "d_in", "m"), [(3, 5, 7, 11, 16), (2, 9, 64, 32, 512)])
def test_fft_tensorsketch_equals_dense_under_induced_hash(b, t, d_out, d_in, m, device) -> None:
    gen = torch.Generator().manual_seed(1)
    delta, x = torch.randn(b, t, d_out, generator=gen), torch.randn(b, t, d_in, generator=gen)
    h_out = make_count_sketch_hash(3, "w", "row", d_out, m)
    h_in = make_count_sketch_hash(3, "w", "col", d_in, m)
    # Both kernels on ``device``; the CountSketch by hand on the CPU.
    d_delta, d_x, d_out_h, d_in_h = (
        delta.to(device),
        x.to(device),
        h_out.to(device),
        h_in.to(device),
    )
    fft = linear_weight_fft(d_delta, d_x, d_out_h, d_in_h).cpu()
    dense = torch.zeros(b, m, device=device)
    buckets = induced_buckets(d_out_h, d_in_h)
    linear_weight_dense(d_delta, d_x, d_out_h, d_in_h, buckets, dense, Workspace())
    dense = dense.cpu()
    # The dense path is a plain CountSketch of the materialised gradient, computed by hand.
    by_hand = induced_count_sketch(torch.einsum("bto,bti->boi", delta, x), h_out, h_in)
    torch.testing.assert_close(dense, by_hand, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fft, dense, rtol=1e-4, atol=1e-4)


def test_embedding_sketch_is_the_induced_countsketch_of_its_gradient() -> None:
    gen = torch.Generator().manual_seed(2)
    vocab, dim, m = 10, 6, 32
    ids = torch.randint(0, vocab, (3, 7), generator=gen)
    ids[0, 0] = 4  # the padding row
    delta = torch.randn(3, 7, dim, generator=gen)
    h_row = make_count_sketch_hash(0, "e", "row", vocab, m)
    h_col = make_count_sketch_hash(0, "e", "col", dim, m)
    full = torch.zeros(3, vocab, dim)
    for b in range(3):
        for t in range(7):
            if ids[b, t] != 4:
                full[b, ids[b, t]] += delta[b, t]
    expected = induced_count_sketch(full, h_row, h_col)
    got = torch.zeros(3, m)
    embedding_weight(ids, delta, h_row, h_col, 4, got)
    torch.testing.assert_close(got, expected)
    strided = torch.zeros(m, 3).T  # a non-contiguous output takes the same values
    embedding_weight(ids, delta, h_row, h_col, 4, strided)
    torch.testing.assert_close(strided, expected)


def test_model_sketch_is_the_same_with_either_linear_kernel(model, batch) -> None:
    out = {}
    for kernel in ("dense", "fft"):
        spec = SketchSpec(m=256, seed=5, kernel=kernel)
        out[kernel] = StepFeaturizer(model, EDGES, spec).featurize([batch], parity_loss).values
    scale = out["dense"].abs().max()
    torch.testing.assert_close(out["fft"], out["dense"], rtol=1e-4, atol=1e-5 * float(scale))


def test_features_carry_the_norms_of_their_slots(model) -> None:
    """The finite check's norms are the per-slot L2 norms scoring would compute itself;
    features whose squares overflow float32 but are finite are still accepted."""
    featurizer = StepFeaturizer(model, EDGES, SketchSpec(m=256, seed=5))
    feats = featurizer.featurize([parity_batch(5, seed=1), parity_batch(3, seed=2)], parity_loss)
    assert feats.norms is not None and feats.norms.shape == feats.values.shape[:2]
    assert torch.equal(feats.norms, torch.linalg.vector_norm(feats.values, dim=2))

    def huge(m, b):  # gradients of ~1e22: finite, their squares are not
        return parity_loss(m, b) * 1e22

    big = featurizer.featurize([parity_batch(4)], huge)
    assert bool(torch.isfinite(big.values).all()) and big.values.abs().max() > 1e20
    assert big.norms is not None and not bool(torch.isfinite(big.norms).all())


def test_cost_model_prefers_fft_only_for_large_layers() -> None:
    assert choose_linear_kernel(tokens=16, d_out=64, d_in=64, m=1024) == "dense"
    assert choose_linear_kernel(tokens=1, d_out=4096, d_in=4096, m=1024) == "fft"


def _sketch_ips(model, batch, m: int, seeds: range) -> torch.Tensor:
    """Per seed: the sketched per-step inner products <T[0, s], Q[j, t]> for j = 1..B-1."""
    rows = []
    for seed in seeds:
        v = (
            StepFeaturizer(model, EDGES, SketchSpec(m=m, seed=seed))
            .featurize([batch], parity_loss)
            .values
        )
        rows.append(torch.einsum("sw,jtw->jst", v[0], v[1:]).reshape(-1).cpu())
    return torch.stack(rows)


@pytest.mark.slow
def test_sketched_inner_products_are_unbiased_and_error_shrinks_as_one_over_sqrt_m(
    device,
) -> None:
    model = make_model(n_loops=4, d_model=16)
    batch = parity_batch(4)
    # The truth from exact gradients on the CPU; the sketches on ``device``.
    exact = StepFeaturizer(model, EDGES, None).featurize([batch], parity_loss).values
    truth = torch.einsum("sw,jtw->jst", exact[0], exact[1:]).reshape(-1).double()
    model, batch = model.to(device), {k: v.to(device) for k, v in batch.items()}

    n_seeds = 200
    est = _sketch_ips(model, batch, 64, range(n_seeds)).double()
    mean, std = est.mean(0), est.std(0)
    z = (mean - truth) / (std / n_seeds**0.5)
    # Entries are not independent, so allow a Bonferroni-style bound over all of them.
    assert float(z.abs().max()) < 4.5, z
    assert float(std.min()) > 0  # the sketch is random: a zero spread would make z meaningless

    small = _sketch_ips(model, batch, 64, range(30)).double()
    large = _sketch_ips(model, batch, 1024, range(30)).double()
    rmse_small = ((small - truth) ** 2).mean().sqrt()
    rmse_large = ((large - truth) ** 2).mean().sqrt()
    ratio = float(rmse_small / rmse_large)  # sqrt(1024 / 64) = 4 in expectation
    assert 2.5 < ratio < 6.5, ratio


_SCRIPT = textwrap.dedent(
    """
    import hashlib, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import make_model, parity_batch
    from sdi_pipeline.engine.featurizer import StepFeaturizer
    from sdi_pipeline.engine.spec import SketchSpec
    from sdi_pipeline.toy.parity import parity_loss
    torch.set_num_threads(1)
    model, batch = make_model(), parity_batch(6)
    spec = SketchSpec(m=512, seed=11)
    v = StepFeaturizer(model, {targets!r}, spec).featurize([batch], parity_loss)
    print(hashlib.sha256(v.values.numpy().tobytes()).hexdigest())
    """
)


def _digest(values: torch.Tensor) -> str:
    return hashlib.sha256(values.numpy().tobytes()).hexdigest()


def test_sketches_are_bit_identical_across_processes(tmp_path) -> None:
    import pathlib

    script = _SCRIPT.format(tests=str(pathlib.Path(__file__).parent), targets=EDGES)
    runs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    assert runs[0].stdout.strip() == runs[1].stdout.strip() != ""
    model, batch = make_model(), parity_batch(6)
    here = StepFeaturizer(model, EDGES, SketchSpec(m=512, seed=11)).featurize([batch], parity_loss)
    assert _digest(here.values) == runs[0].stdout.strip()


def _reverse_registration(module: nn.Module) -> None:
    for child in module.children():
        _reverse_registration(child)
    module._modules = OrderedDict(reversed(list(module._modules.items())))
    module._parameters = OrderedDict(reversed(list(module._parameters.items())))


def test_sketches_do_not_depend_on_module_registration_order(model, batch) -> None:
    spec = SketchSpec(m=512, seed=11)
    before = StepFeaturizer(model, EDGES, spec).featurize([batch], parity_loss).values
    _reverse_registration(model)
    assert next(iter(model._modules)) == "head"
    after = StepFeaturizer(model, EDGES, spec).featurize([batch], parity_loss).values
    assert _digest(before) == _digest(after)
    other_seed = StepFeaturizer(model, EDGES, SketchSpec(m=512, seed=12)).featurize(
        [batch], parity_loss
    )
    assert _digest(other_seed.values) != _digest(after)


def _sketch_all(kind: str, seed: int, a, b):
    """Sketch two inputs with the same random map (one hash seed) for one kernel."""
    from sdi_pipeline.engine.kernels import count_sketch

    m = 16
    if kind == "count":
        h = make_count_sketch_hash(seed, "p", "vec", a.shape[1], m)
        return count_sketch(a, h), count_sketch(b, h)
    rows, cols = (5, 4)
    h_row = make_count_sketch_hash(seed, "w", "row", rows, m)
    h_col = make_count_sketch_hash(seed, "w", "col", cols, m)
    if kind == "embedding":
        sketches = []
        for ids, d in (a, b):
            sketches.append(torch.zeros(ids.shape[0], m))
            embedding_weight(ids, d, h_row, h_col, None, sketches[-1])
        return tuple(sketches)
    outs = []
    for delta, x in (a, b):
        out = torch.zeros(1, m)
        linear_weight_dense(delta, x, h_row, h_col, induced_buckets(h_row, h_col), out, Workspace())
        outs.append(out)
    return tuple(outs)


@pytest.mark.parametrize("kind", ["count", "linear", "embedding"])
def test_sketch_maps_are_unbiased_for_non_centred_inputs(kind: str) -> None:
    # All-positive inputs: a map without zero-mean random signs would be biased by about
    # (sum g)(sum g') / m, far outside the tolerance.
    gen = torch.Generator().manual_seed(0)
    if kind == "count":
        a, b = torch.rand(1, 40, generator=gen) + 0.5, torch.rand(1, 40, generator=gen) + 0.5
        truth = float(a @ b.T)
    elif kind == "linear":
        a = (torch.rand(1, 3, 5, generator=gen) + 0.5, torch.rand(1, 3, 4, generator=gen) + 0.5)
        b = (torch.rand(1, 3, 5, generator=gen) + 0.5, torch.rand(1, 3, 4, generator=gen) + 0.5)
        ga, gb = (torch.einsum("bto,bti->oi", d, x) for d, x in (a, b))
        truth = float((ga * gb).sum())
    else:
        a = (torch.tensor([[0, 2, 2]]), torch.rand(1, 3, 4, generator=gen) + 0.5)
        b = (torch.tensor([[2, 1, 3]]), torch.rand(1, 3, 4, generator=gen) + 0.5)
        ga, gb = torch.zeros(5, 4), torch.zeros(5, 4)
        for g, (ids, d) in ((ga, a), (gb, b)):
            g.index_add_(0, ids[0], d[0])
        truth = float((ga * gb).sum())
    n = 400
    est = torch.tensor(
        [float((lambda s: (s[0] * s[1]).sum())(_sketch_all(kind, seed, a, b))) for seed in range(n)]
    )
    z = (float(est.mean()) - truth) / (float(est.std()) / n**0.5)
    assert abs(z) < 4.5, (kind, truth, float(est.mean()), z)
