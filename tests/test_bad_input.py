"""Each user mistake gets one clear SDIError naming the module, parameter or example."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from torch import nn

from sdi_pipeline.engine import registry
from sdi_pipeline.engine.featurizer import StepFeaturizer
from sdi_pipeline.engine.layers.generic import GenericHandler
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.errors import CheckpointError, SDIError
from sdi_pipeline.inputs.checkpoints import load_checkpoint, load_into


class Scale(nn.Module):
    """A module type with no Opacus grad sampler."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class Looped(nn.Module):
    """A small looped model whose quirks are switched on per test."""

    def __init__(self, quirk: str = "") -> None:
        super().__init__()
        self.quirk = quirk
        self.emb = nn.Embedding(5, 8)
        self.body = nn.Linear(8, 8)
        self.body_b = nn.Linear(8, 8)
        self.scale = Scale(8)
        self.unused = nn.Linear(8, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x.T if self.quirk == "seq_first" else x)
        for t in range(3):
            h = torch.tanh(self.body(h)) + self.body_b(h)
            if self.quirk == "twice":
                h = torch.tanh(self.body(h))
            if self.quirk == "scale":
                h = self.scale(h)
            if self.quirk == "mid" and t == 1:
                h = self.mid(h)
        if self.quirk == "seq_first":
            return self.head(h).transpose(0, 1)
        return self.head(h)


def loss_last(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x)[:, -1], y, reduction="none")


BATCH = (torch.randint(0, 5, (4, 6), generator=torch.Generator().manual_seed(0)), torch.arange(4))


def run(model: nn.Module, targets, loss_fn=loss_last, spec: SketchSpec | None = SketchSpec(m=64)):
    return StepFeaturizer(model, targets, spec).featurize([BATCH], loss_fn)


def test_unsupported_parameter_type_names_module_and_parameter(monkeypatch) -> None:
    # Without the generic torch.func fallback, a type with no handler is refused by name.
    import sdi_pipeline.engine.layers  # noqa: F401  (registers the built-in handlers)

    kept = [f for f in registry._FALLBACKS if f.handler is not GenericHandler]
    monkeypatch.setattr(registry, "_FALLBACKS", kept)
    with pytest.raises(SDIError, match=r"'scale\.gain'.*module 'scale' of type Scale"):
        run(Looped("scale"), ["body", "scale"])


def test_parameters_never_used_are_named() -> None:
    with pytest.raises(SDIError, match="never ran in the forward pass: unused"):
        run(Looped(), ["body", "unused"])


def test_passes_that_cannot_be_told_from_the_call_order_are_refused_not_guessed() -> None:
    # body runs before and after body_b in each pass: neither opens every pass.
    with pytest.raises(SDIError, match=r"cannot tell the loop's passes .*'body' ran 6x"):
        run(Looped("twice"), ["body", "body_b"])
    # Alone, the doubled module looks like a 6-step loop; expected_steps catches that.
    with pytest.raises(SDIError, match=r"ran 6 passes .* but expected_steps=3"):
        StepFeaturizer(Looped("twice"), ["body"], expected_steps=3).featurize([BATCH], loss_last)


def test_mixed_counts_that_cannot_be_binned() -> None:
    model = Looped()
    model.forward = lambda x: model.head(  # type: ignore[method-assign]
        model.mid(model.mid(model.body(model.body(model.body(model.emb(x))))))
    )
    # mid runs twice after the last pass: not a readout, and not in a regular pattern.
    with pytest.raises(SDIError, match=r"cannot tell the loop's passes .*'mid' ran 2x"):
        run(model, ["body", "mid", "head"])


def test_single_use_module_inside_the_loop_belongs_to_its_pass() -> None:
    featurizer = StepFeaturizer(Looped("mid"), ["body", "mid"], None)
    feats = featurizer.featurize([BATCH], loss_last)
    assert featurizer.assignment == "3 loop steps of body, mid, in step 2 only: mid"
    mid = slice(72, 144)  # body.bias, body.weight, then mid.bias, mid.weight
    assert bool((feats.values[:, 1, mid] != 0).any())
    assert not bool(feats.values[:, [0, 2], mid].any())


def test_forward_under_no_grad_is_refused() -> None:
    def no_grad_loss(model, batch):
        with torch.no_grad():
            return loss_last(model, batch)

    with pytest.raises(SDIError, match=r"'body' ran with gradients disabled \(torch.no_grad"):
        run(Looped(), ["body"], no_grad_loss)


def test_loss_that_is_not_per_example_is_refused() -> None:
    with pytest.raises(
        SDIError, match=r"one loss per example, shape \(B,\), or per-token .* got shape \(\)"
    ):
        run(Looped(), ["body"], lambda m, b: loss_last(m, b).mean())


def test_nan_losses_name_the_examples() -> None:
    def nan_loss(model, batch):
        loss = loss_last(model, batch)
        return loss + torch.tensor([0.0, float("nan"), 0.0, float("inf")])

    with pytest.raises(SDIError, match=r"non-finite loss \(NaN or inf\) for examples 1, 3"):
        run(Looped(), ["body"], nan_loss)


def test_nan_sketches_name_the_examples() -> None:
    def inf_grad_loss(model, batch):
        logits = model(batch[0])[:, -1, 0]
        zero = logits - logits.detach()  # value 0, gradient 1
        offset = (torch.arange(4) != 2).float()  # sqrt is differentiable at 1, not at 0
        return loss_last(model, batch) + torch.sqrt(zero.abs() + offset)

    with pytest.raises(SDIError, match=r"non-finite gradient sketches for examples 2 \(at step"):
        run(Looped(), ["body"], inf_grad_loss)


def test_batch_not_on_dim_zero_is_refused() -> None:
    with pytest.raises(SDIError, match="batch on dim 0"):
        run(Looped("seq_first"), ["body"])


def test_unknown_target_pattern_lists_near_matches() -> None:
    with pytest.raises(SDIError, match=r"'blok' matches no module.*Nearest module names: block"):
        StepFeaturizer(make_model(), ["blok"])


def test_bad_sketch_size_is_refused() -> None:
    with pytest.raises(SDIError, match="m must be a positive integer"):
        SketchSpec(m=0)


def test_checkpoint_that_does_not_fit_the_model(tmp_path) -> None:
    torch.save({"model_state_dict": {"body.weight": torch.zeros(3, 3)}}, tmp_path / "c.pt")
    with pytest.raises(
        CheckpointError, match=r"does not fit the model: missing keys .*shape mismatches"
    ):
        load_into(Looped(), load_checkpoint(tmp_path / "c.pt"), tmp_path / "c.pt")


def test_checkpoint_with_pickled_objects_needs_trust(tmp_path) -> None:
    torch.save({"model_state_dict": {}, "extra": Scale(2)}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="weights_only loading refuses") as err:
        load_checkpoint(tmp_path / "c.pt")
    # The config key and the attribute() argument that allow it.
    assert "checkpoints.trust=true" in str(err.value)
    assert "trust_checkpoints=True" in str(err.value)
    assert "extra" in load_checkpoint(tmp_path / "c.pt", trust=True)
