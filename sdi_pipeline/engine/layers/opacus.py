"""Fallback for any module type with an Opacus grad sampler (LayerNorm, RMSNorm, ...).

The sampler gives each target parameter's exact per-example gradient; the sketch is its
CountSketch (the handler's default).
"""

from __future__ import annotations

from typing import Any

import torch

from sdi_pipeline.engine.registry import LayerHandler, register_fallback


def _samplers() -> dict[type, Any]:
    # Opacus is slow to import; only models with such modules in their targets pay for it.
    from opacus.grad_sample import GradSampleModule

    return dict(GradSampleModule.GRAD_SAMPLERS)


def _describe() -> str:
    names = ", ".join(sorted(t.__name__ for t in _samplers()))
    return f"module types with an Opacus grad sampler ({names})"


@register_fallback(lambda module: type(module) in _samplers(), _describe)
class OpacusHandler(LayerHandler):
    """Per-example gradients from the module type's Opacus grad sampler."""

    def __init__(self, module, params, spec, offsets, workspace=None) -> None:
        super().__init__(module, params, spec, offsets, workspace)
        self._sampler: Any = _samplers()[type(module)]
        own = dict(module.named_parameters(recurse=False))
        self._own = [(own[p.attr], p) for p in self.params]

    def per_example(self, call, grad):
        # Target parameters require grad, which Opacus samplers look for.
        inputs = [a for a in call.args if isinstance(a, torch.Tensor)]
        samples = self._sampler(self.module, inputs, grad)
        return {tp.name: samples[p] for p, tp in self._own}
