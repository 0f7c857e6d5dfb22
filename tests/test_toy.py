"""Tests for the toy looped GPT, the parity task and the toy trainer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdi_pipeline.toy.model import LoopedGPT, LoopedGPTConfig
from sdi_pipeline.toy.parity import (
    MARKER,
    make_parity_dataset,
    parity_accuracy,
    parity_loss,
)
from sdi_pipeline.toy.train import checkpoint_steps, load_toy_model, train_toy

SMALL = LoopedGPTConfig(d_model=16, n_heads=2, d_mlp=32, n_loops=3, max_len=16)


def _model(config: LoopedGPTConfig = SMALL, seed: int = 0) -> LoopedGPT:
    torch.manual_seed(seed)
    return LoopedGPT(config)


def _tokens(b: int = 5, t: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (b, t), generator=g)


def test_config_roundtrip() -> None:
    d = SMALL.to_dict()
    assert all(type(v) is int for v in d.values())
    assert LoopedGPTConfig.from_dict(d) == SMALL
    with pytest.raises(ValueError):
        LoopedGPTConfig.from_dict({**d, "bogus": 1})


def test_output_shape() -> None:
    model = _model()
    logits = model(_tokens(5, 7))
    assert logits.shape == (5, 7, SMALL.vocab_size)
    assert model(_tokens(2, SMALL.max_len)).shape == (2, SMALL.max_len, SMALL.vocab_size)


def test_block_parameters_are_shared() -> None:
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    block_names = [n for n in names if n.startswith("block.")]
    # One copy of the block's parameters, whatever the loop count.
    assert len(block_names) == len(list(model.block.parameters()))
    assert len(names) == len(set(names))
    expected = {
        "block.ln1.weight",
        "block.attn.q.weight",
        "block.attn.k.bias",
        "block.attn.v.weight",
        "block.attn.o.bias",
        "block.ln2.bias",
        "block.mlp.fc_in.weight",
        "block.mlp.fc_out.bias",
    }
    assert expected <= set(names)


@pytest.mark.parametrize("n_loops", [None, 0, 1, 6])
def test_n_loops_override_counts_block_calls(n_loops: int | None) -> None:
    model = _model()
    calls: list[tuple[int, ...]] = []

    def hook(_m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        calls.append(tuple(out.shape))

    handle = model.block.register_forward_hook(hook)
    try:
        model(_tokens(4, 6), n_loops=n_loops)
    finally:
        handle.remove()
    expected = SMALL.n_loops if n_loops is None else n_loops
    assert len(calls) == expected
    assert all(shape == (4, 6, SMALL.d_model) for shape in calls)


def test_n_loops_changes_output() -> None:
    model = _model()
    x = _tokens()
    assert not torch.allclose(model(x, n_loops=1), model(x, n_loops=2))


def test_manual_unroll_matches_forward() -> None:
    model = _model()
    x = _tokens()
    h = model.embed(x)
    for _ in range(SMALL.n_loops):
        h = model.block(h)
    torch.testing.assert_close(model.readout(h), model(x))


def test_every_module_sees_batch_dim() -> None:
    # Per-example gradients rely on dim 0 of each module's input/output being the batch.
    model = _model()
    b = 3
    shapes: list[tuple[str, torch.Size, torch.Size]] = []

    def make_hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            shapes.append((name, inp[0].shape, out.shape))

        return hook

    handles = [
        m.register_forward_hook(make_hook(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm))
    ]
    try:
        model(_tokens(b, 5))
    finally:
        for handle in handles:
            handle.remove()
    assert shapes
    for name, in_shape, out_shape in shapes:
        assert in_shape[0] == b and out_shape[0] == b, name


def test_dataset_determinism_and_targets() -> None:
    a = make_parity_dataset(64, n_bits=8, seed=3)
    b = make_parity_dataset(64, n_bits=8, seed=3)
    c = make_parity_dataset(64, n_bits=8, seed=4)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.tokens, c.tokens)
    assert a.tokens.shape == (64, 9) and a.tokens.dtype == torch.int64
    assert a.targets.shape == (64,) and a.targets.dtype == torch.int64
    assert torch.all(a.tokens[:, -1] == MARKER)
    bits = a.tokens[:, :-1]
    assert set(bits.unique().tolist()) <= {0, 1}
    xor = bits[:, 0].clone()
    for j in range(1, bits.shape[1]):
        xor = xor ^ bits[:, j]
    assert torch.equal(a.targets, xor)


def test_dataset_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_parity_dataset(16, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_dataset_works_with_dataloader() -> None:
    data = make_parity_dataset(10, n_bits=4, seed=0)
    assert len(data) == 10
    item = data[2]
    assert torch.equal(item["tokens"], data.tokens[2])
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert batch["tokens"].shape == (4, 5) and batch["target"].shape == (4,)


def test_parity_loss_per_example() -> None:
    model = _model()
    data = make_parity_dataset(6, n_bits=4, seed=1)
    batch = {"tokens": data.tokens, "target": data.targets}
    losses = parity_loss(model, batch)
    assert losses.shape == (6,)
    logits = model(data.tokens)[:, -1, :]
    log_probs = torch.log_softmax(logits, dim=-1)
    by_hand = -log_probs[torch.arange(6), data.targets]
    torch.testing.assert_close(losses, by_hand)
    torch.testing.assert_close(losses[2], F.cross_entropy(logits[2:3], data.targets[2:3]))


def test_parity_accuracy_range() -> None:
    acc = parity_accuracy(_model(), make_parity_dataset(40, n_bits=4), batch_size=16)
    assert 0.0 <= acc <= 1.0


def test_checkpoint_steps() -> None:
    assert checkpoint_steps(30, 3) == [10, 20, 30]
    assert checkpoint_steps(10, 1) == [10]
    assert checkpoint_steps(2, 5) == [1, 2]


def test_train_toy_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(999)
    rng_before = torch.get_rng_state()
    paths = train_toy(
        tmp_path / "ckpts",
        config=SMALL,
        n_train=32,
        n_bits=4,
        steps=6,
        lr=1e-3,
        batch_size=8,
        n_checkpoints=3,
        seed=5,
        progress=False,
    )
    # The caller's global RNG is not disturbed.
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert [p.name for p in paths] == ["ckpt-000002.pt", "ckpt-000004.pt", "ckpt-000006.pt"]
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == [p.name for p in paths]

    for path, step in zip(paths, [2, 4, 6], strict=True):
        ckpt = torch.load(path, weights_only=True)
        assert set(ckpt) == {
            "model_state_dict",
            "optimizer_state_dict",
            "step",
            "lr",
            "model_config",
            "task",
        }
        assert ckpt["step"] == step
        assert isinstance(ckpt["lr"], float)
        assert ckpt["lr"] == ckpt["optimizer_state_dict"]["param_groups"][0]["lr"] == 1e-3
        assert ckpt["model_config"] == SMALL.to_dict()
        assert ckpt["task"] == {"name": "parity", "n_bits": 4, "seed": 5, "n_train": 32}

        model = load_toy_model(path)
        reference = LoopedGPT(SMALL)
        reference.load_state_dict(ckpt["model_state_dict"])
        x = make_parity_dataset(4, n_bits=4, seed=0).tokens
        torch.testing.assert_close(model(x), reference(x))

    # Checkpoints differ as training progresses.
    first = torch.load(paths[0], weights_only=True)["model_state_dict"]
    last = torch.load(paths[-1], weights_only=True)["model_state_dict"]
    assert not torch.equal(first["head.weight"], last["head.weight"])


def test_train_toy_is_deterministic(tmp_path: Path) -> None:
    def run(out: Path) -> Path:
        (path,) = train_toy(
            out,
            config=SMALL,
            n_train=16,
            n_bits=3,
            steps=3,
            batch_size=4,
            n_checkpoints=1,
            progress=False,
        )
        return path

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    sa = torch.load(a, weights_only=True)["model_state_dict"]
    sb = torch.load(b, weights_only=True)["model_state_dict"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
