"""Generic fallback for any module with parameters: per-example vjp by ``torch.func``.

For one recorded call (its args and kwargs) and the gradient of the summed loss with respect
to the call's output, example b's gradient of the module's target parameters is the vjp of
``functional_call(module, params, inputs of example b)`` with output gradient b. ``vmap``
runs it for all examples at once (a loop over examples when an operation has no batching
rule). Inputs whose first dimension is the batch are split per example; others (rotary
position embeddings of shape (1, T, d), masks shared by the batch) go to every example as
they are. On a call over token-flattened rows (B*L, d) -- a fused MoE experts module with
its routing indices and weights -- every input with B*L rows is split per example, L rows
each, together with the hidden states.

That is exact only if the module treats examples independently. On its first call the
handler recomputes every example's output alone and compares it with the recorded batched
output; a module that mixes examples (batch statistics, attention across the batch) is
refused by name. The sketch is the CountSketch of each parameter's per-example gradient.

A module returning a tuple of tensors (an MoE router's logits, weights and indices) gets
the vjp of each output whose gradient arrives, one at a time: the contributions add up.

``nn.MultiheadAttention`` is registered here with its whole subtree: its forward uses
``out_proj``'s parameters without calling ``out_proj``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from sdi_pipeline.engine.registry import Call, LayerHandler, register_fallback, register_layer
from sdi_pipeline.errors import UnsupportedModel

# Relative tolerance of the examples-are-independent check, against the output's scale.
INDEPENDENCE_RTOL = 1e-4


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _describe() -> str:
    return "any other module through the generic torch.func fallback"


@register_layer(nn.MultiheadAttention, claims_subtree=True)
@register_fallback(_has_parameters, _describe, priority=100)
class GenericHandler(LayerHandler):
    """Per-example gradients of any module's own parameters from its recorded calls."""

    flattened_rows = True
    all_outputs = True

    def __init__(self, module, params, spec, offsets, workspace=None) -> None:
        super().__init__(module, params, spec, offsets, workspace)
        self._checked = False

    def _split(
        self, call: Call, batch: int
    ) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], tuple[tuple, dict]]]:
        """The call's per-example inputs (examples on dim 0) and how to rebuild one example's
        (args, kwargs). An input with the batch on dim 0 is given back as a batch of one; on
        a token-flattened call, an input with ``batch * rows`` rows (hidden states, routing
        indices and weights alike) is given back as that example's rows."""
        leaves, spec = tree_flatten((call.args, call.kwargs))
        flat: dict[int, bool] = {}  # leaf -> whether it holds token-flattened rows
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
                continue
            if call.rows is not None and leaf.shape[0] == batch * call.rows:
                flat[i] = True
            elif leaf.shape[0] == batch:
                flat[i] = False

        def rebuild(per_example: list[torch.Tensor]) -> tuple[tuple, dict]:
            filled = list(leaves)
            for (i, rows), value in zip(flat.items(), per_example, strict=True):
                filled[i] = value if rows else value.unsqueeze(0)
            args, kwargs = tree_unflatten(filled, spec)
            return tuple(args), dict(kwargs)

        return [call.by_example(leaves[i]) for i in flat], rebuild

    @staticmethod
    def _one(call: Call, t: torch.Tensor) -> torch.Tensor:
        """One example's output (or output gradient) as the module gives it for that example
        alone: without the batch dimension, or as its rows on a token-flattened call."""
        return t if call.rows is not None else t.squeeze(0)

    @staticmethod
    def _as_batch(call: Call, t: torch.Tensor) -> torch.Tensor:
        return t if call.rows is not None else t.unsqueeze(0)

    def _params(self) -> dict[str, torch.Tensor]:
        return {p.attr: self.module.get_parameter(p.attr).detach() for p in self.params}

    def _run(
        self, params: dict[str, torch.Tensor], args: tuple, kwargs: dict, output: int = 0
    ) -> torch.Tensor:
        out = functional_call(self.module, params, args, kwargs)
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            out = out[output]  # as the capture numbers a tuple's outputs
        if not isinstance(out, torch.Tensor):
            raise UnsupportedModel(
                f"module '{self.params[0].module_name}' returned {type(out).__name__}, not a "
                "tensor: only modules with a single tensor output can be targeted"
            )
        return out

    @staticmethod
    def _per_example(fn: Callable[..., Any], *batched: Any) -> Any:
        """``fn`` of each example's slices of ``batched`` (pytrees of tensors, batch on dim
        0), stacked on dim 0."""
        try:
            # SDPA's math kernel has batching rules; the fused CPU/GPU kernels do not.
            with sdpa_kernel([SDPBackend.MATH]):
                return vmap(fn)(*batched)
        except RuntimeError:
            # No batching rule for some operation: one example at a time, same result.
            n = tree_leaves(batched)[0].shape[0]
            outs = [fn(*tree_map(lambda t, b=b: t[b], batched)) for b in range(n)]
            return tree_map(lambda *xs: torch.stack(xs), *outs)

    def on_forward(self, call: Call, output: torch.Tensor) -> None:
        if self._checked:
            return
        self._checked = True
        batch = call.examples if call.rows is not None else output.shape[0]
        inputs, rebuild = self._split(call, batch)
        if not inputs:
            raise UnsupportedModel(
                f"module '{call.module_name}' ({type(self.module).__name__}) got no input with "
                f"the batch ({batch} examples) on dim 0: its per-example gradients cannot be "
                "taken; target modules must take the batch on dim 0 (batch_first)"
            )
        params = self._params()

        def one(xs: list[torch.Tensor]) -> torch.Tensor:
            args, kwargs = rebuild(xs)
            return self._one(call, self._run(params, args, kwargs))

        with torch.no_grad():
            alone = self._per_example(one, inputs)
        recorded = call.by_example(output.detach())
        scale = float(recorded.abs().max()) if recorded.numel() else 0.0
        err = float((alone.to(recorded.dtype) - recorded).abs().max()) if recorded.numel() else 0.0
        if alone.shape != recorded.shape or err > INDEPENDENCE_RTOL * max(scale, 1e-30):
            raise UnsupportedModel(
                f"module '{call.module_name}' ({type(self.module).__name__}) does not treat "
                f"examples independently: its output for each example alone differs from the "
                f"batched output (max difference {err:.3g}, output scale {scale:.3g}). "
                "Per-example gradients of its parameters are not defined; leave it out of "
                "the targets (or put the model in a mode without batch statistics)"
            )

    def per_example(self, call, grad):
        grad = call.by_example(grad)
        inputs, rebuild = self._split(call, grad.shape[0])
        params = self._params()

        def one(xs: list[torch.Tensor], g: torch.Tensor) -> dict[str, torch.Tensor]:
            args, kwargs = rebuild(xs)
            pullback = vjp(lambda p: self._run(p, args, kwargs, call.output), params)[1]
            return pullback(self._as_batch(call, g))[0]

        grads = self._per_example(one, inputs, grad)
        return {p.name: grads[p.attr] for p in self.params}
