"""The layer registry: lookup by type (with subclasses), a new layer type as one class, and
dedicated handlers agreeing with the generic Opacus path where both apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from sdi_pipeline.engine import registry
from sdi_pipeline.engine.featurizer import StepFeaturizer
from sdi_pipeline.engine.layers.embedding import EmbeddingHandler
from sdi_pipeline.engine.layers.generic import GenericHandler
from sdi_pipeline.engine.layers.linear import LinearHandler
from sdi_pipeline.engine.layers.opacus import OpacusHandler
from sdi_pipeline.engine.registry import (
    Call,
    LayerHandler,
    TargetParam,
    handler_for,
    register_layer,
)
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.errors import UnsupportedModel


class _PlainLinearSubclass(nn.Linear):
    """Keeps nn.Linear's forward: its gradients are nn.Linear's."""


class _ScaledLinear(nn.Linear):
    """Overrides forward: nn.Linear's gradient math no longer holds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


class _Gain(nn.Module):
    """A layer type no built-in handler knows: y = x * gain (per feature)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class _Looped(nn.Module):
    def __init__(self, core: nn.Module, dim: int = 6, steps: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.core = core
        self.out = nn.Linear(dim, 1)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for _ in range(self.steps):
            h = torch.tanh(self.core(h)) + h
        return self.out(h).squeeze(-1)


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return (model(batch) ** 2).mean(dim=1)


def test_lookup_resolves_subclasses_that_keep_the_forward() -> None:
    assert handler_for(nn.Linear(3, 2), ["weight", "bias"]) is LinearHandler
    assert handler_for(_PlainLinearSubclass(3, 2), ["weight", "bias"]) is LinearHandler
    assert handler_for(nn.Embedding(5, 2), ["weight"]) is EmbeddingHandler
    assert handler_for(nn.LayerNorm(3), ["weight", "bias"]) is OpacusHandler
    # An overridden forward is not nn.Linear's math, and Opacus keys on exact types: the
    # generic torch.func fallback takes these, as any other module with parameters.
    assert handler_for(_ScaledLinear(3, 2), ["weight", "bias"]) is GenericHandler
    assert handler_for(_Gain(3), ["gain"]) is GenericHandler
    assert handler_for(nn.MultiheadAttention(4, 2), ["in_proj_weight"]) is GenericHandler


class _Centred(nn.Module):
    """Subtracts the batch mean: examples are not independent."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(dim=0, keepdim=True)) * self.gain


def test_generic_fallback_refuses_a_module_that_mixes_examples() -> None:
    featurizer = StepFeaturizer(_Looped(_Centred(6)), ["core"], SketchSpec(m=64))
    with pytest.raises(UnsupportedModel, match=r"'core' \(_Centred\) does not treat examples"):
        featurizer.featurize([torch.randn(4, 7, 4)], _loss)


def test_a_new_layer_type_is_one_registered_class(monkeypatch) -> None:
    """Registering a handler for _Gain (exact per-example gradient only) makes the whole
    engine work on it: exact per-step gradients match torch.func, and sketches follow."""
    monkeypatch.setattr(registry, "_LAYERS", dict(registry._LAYERS))

    @register_layer(_Gain)
    class GainHandler(LayerHandler):
        def per_example(self, call, grad):
            (p,) = self.params
            x = call.input().reshape(grad.shape[0], -1, grad.shape[-1])
            return {p.name: (x * grad.reshape(x.shape)).sum(dim=1)}

    torch.manual_seed(0)
    model = _Looped(_Gain(6))
    batch = torch.randn(5, 7, 4)
    feats = StepFeaturizer(model, ["core"], None).featurize([batch], _loss)
    assert feats.layout.loop_steps == 3

    # Oracle: give each loop step its own copy of the gain and differentiate per example.
    def per_step_loss(gains: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = model.inp(x[None])
        for t in range(3):
            h = torch.tanh(h * gains[t]) + h
        return (model.out(h).squeeze(-1) ** 2).mean()

    gains = model.core.gain.detach().expand(3, -1).clone()
    expected = vmap(grad(per_step_loss), in_dims=(None, 0))(gains, batch)
    torch.testing.assert_close(feats.values, expected.detach(), rtol=1e-5, atol=1e-6)
    sketched = StepFeaturizer(model, ["core"], SketchSpec(m=256)).featurize([batch], _loss)
    assert sketched.values.shape == (5, 3, 256)


@pytest.mark.parametrize("module", [nn.Linear(5, 4), nn.Embedding(9, 4)], ids=["linear", "emb"])
def test_dedicated_handlers_agree_with_the_generic_opacus_path(module: nn.Module) -> None:
    """Exact per-example gradients of the fast handlers equal Opacus' samplers' (their
    sketches are different maps of the same gradients: TensorSketch vs CountSketch)."""
    torch.manual_seed(1)
    if isinstance(module, nn.Embedding):
        inputs = torch.randint(0, 9, (3, 6))
    else:
        inputs = torch.randn(3, 6, 5)
    out_grad = torch.randn(3, 6, 4)
    params = [
        TargetParam(f"layer.{n}", "layer", n, tuple(p.shape)) for n, p in module.named_parameters()
    ]
    dedicated = handler_for(module, [p.attr for p in params])
    assert dedicated in (LinearHandler, EmbeddingHandler)
    offsets, width = {}, 0
    for p in params:
        offsets[p.name], width = width, width + p.numel
    outs = []
    for cls in (dedicated, OpacusHandler):
        out = torch.zeros(3, width)
        cls(module, params, None, offsets).contribute(Call("layer", 0, (inputs,)), out_grad, out)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)

    # And both equal autograd's per-example gradient of <output, out_grad>.
    def contrib(p: dict[str, torch.Tensor], x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (functional_call(module, p, (x[None],)) * g[None]).sum()

    own = {n: p.detach() for n, p in module.named_parameters()}
    expected = vmap(grad(contrib), in_dims=(None, 0, 0))(own, inputs, out_grad)
    exact = dedicated(module, params, None, None).per_example(Call("layer", 0, (inputs,)), out_grad)  # type: ignore[misc]
    for p in params:
        torch.testing.assert_close(exact[p.name].reshape(3, *p.shape), expected[p.attr])


@pytest.mark.parametrize(
    ("module", "dedicated"),
    [(nn.Linear(5, 4), LinearHandler), (nn.LayerNorm(5), OpacusHandler)],
    ids=["linear", "layernorm"],
)
def test_generic_fallback_agrees_with_the_dedicated_handlers(
    module: nn.Module, dedicated: type[LayerHandler]
) -> None:
    torch.manual_seed(2)
    inputs = torch.randn(3, 6, 5)
    call = Call("layer", 0, (inputs,))
    out_grad = torch.randn_like(module(inputs))
    params = [
        TargetParam(f"layer.{n}", "layer", n, tuple(p.shape)) for n, p in module.named_parameters()
    ]
    generic = GenericHandler(module, params, None, None)
    generic.on_forward(call, module(inputs))  # the examples-independent check passes
    got = generic.per_example(call, out_grad)
    want = dedicated(module, params, None, None).per_example(call, out_grad)
    for p in params:
        torch.testing.assert_close(
            got[p.name].reshape(3, -1), want[p.name].reshape(3, -1), rtol=1e-5, atol=1e-6
        )
