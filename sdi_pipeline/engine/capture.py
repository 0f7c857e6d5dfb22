"""Hooks that see every call of the target modules and route its gradient to a step slot.

During a capture, a forward hook on each module owning target parameters records the call
(its inputs, detached) and hooks the call's output tensor. When backward reaches that
output, the hook receives d(sum of losses)/d(output of *this call*) -- the unrolled graph's
gradient for this use of the shared weights -- and the module's handler adds the per-example
contribution into the slot of the call's loop step.

All model parameters are frozen for the capture (restored afterwards), so backward computes
activation gradients only and no weight gradient is ever formed or accumulated. A call whose
output does not require grad (frozen weights, inputs that need no gradient) gets a fresh leaf
as output so the gradient still reaches it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from sdi_pipeline.engine.registry import LayerHandler
from sdi_pipeline.engine.slots import SlotLayout, infer_layout
from sdi_pipeline.errors import UnsupportedModel


@dataclass
class _Call:
    module_name: str
    use: int
    activations: list[torch.Tensor] = field(default_factory=list)


class StepCapture:
    """Records target-module calls of one forward pass and dispatches their gradients."""

    def __init__(self, model: nn.Module, handlers: dict[str, LayerHandler]) -> None:
        self.model = model
        self.handlers = handlers
        self._calls: list[_Call] = []
        self._uses: dict[str, int] = {}
        self._phase = "idle"
        self._slots: dict[str, list[int]] = {}
        self._buffer: torch.Tensor | None = None

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """Install the forward hooks and freeze all parameters for the duration."""
        params = list(self.model.parameters())
        flags = [p.requires_grad for p in params]
        handles = [
            h.module.register_forward_hook(functools.partial(self._on_forward, name))
            for name, h in self.handlers.items()
        ]
        try:
            for p in params:
                p.requires_grad_(False)
            yield
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
            self.reset()

    def reset(self) -> None:
        """Forget the current forward pass (its calls, buffer and layout)."""
        self._calls = []
        self._uses = {}
        self._slots = {}
        self._buffer = None
        self._phase = "forward"

    def _on_forward(
        self, name: str, module: nn.Module, inputs: tuple[object, ...], output: object
    ) -> torch.Tensor | None:
        if self._phase == "backward":
            raise UnsupportedModel(
                f"target module '{name}' ran again during backward: activation checkpointing "
                "(recomputation) inside the targets is not supported; disable it for attribution."
            )
        if not torch.is_grad_enabled():
            raise UnsupportedModel(
                f"target module '{name}' ran with gradients disabled (torch.no_grad() or "
                "torch.inference_mode()): the loss function must run the forward pass with "
                "autograd on so per-step gradients can be taken."
            )
        if not isinstance(output, torch.Tensor):
            raise UnsupportedModel(
                f"target module '{name}' returned {type(output).__name__}, not a tensor; "
                "only modules with a single tensor output can be targeted."
            )
        use = self._uses.get(name, 0)
        self._uses[name] = use + 1
        call = _Call(name, use, [t.detach() for t in inputs if isinstance(t, torch.Tensor)])
        self._calls.append(call)
        out = output if output.requires_grad else output.detach().requires_grad_()
        out.register_hook(functools.partial(self._on_grad, call))
        return out if out is not output else None

    def _on_grad(self, call: _Call, grad: torch.Tensor) -> None:
        assert self._buffer is not None, "gradient arrived outside capture.backward"
        slot = self._slots[call.module_name][call.use]
        with torch.no_grad():
            self.handlers[call.module_name].contribute(
                call.activations, grad.detach(), self._buffer[slot]
            )
        call.activations = []  # free the inputs as soon as this call is done

    def finish_forward(self, batch_size: int, expected_steps: int | None) -> SlotLayout:
        """Validate the recorded calls and fix the slot of each; returns the layout."""
        never = sorted(n for n in self.handlers if all(c.module_name != n for c in self._calls))
        if never and len(never) == len(self.handlers):
            raise UnsupportedModel(
                "none of the target modules ran in the forward pass of loss_fn: check that "
                "loss_fn calls the model the featurizer was built with."
            )
        if never:
            raise UnsupportedModel(
                f"target modules never ran in the forward pass: {', '.join(never)}. Their "
                "parameters get no gradient; leave them out of the targets."
            )
        for call in self._calls:
            for act in call.activations:
                if act.dim() > 0 and act.shape[0] != batch_size:
                    raise UnsupportedModel(
                        f"target module '{call.module_name}' (call {call.use + 1}) got an input "
                        f"of shape {tuple(act.shape)} but the loss has {batch_size} examples: "
                        "target modules must take the batch on dim 0 (batch_first)."
                    )
        calls: dict[str, list[int]] = {}
        for i, call in enumerate(self._calls):
            calls.setdefault(call.module_name, []).append(i)
        layout, self._slots = infer_layout(calls, expected_steps)
        return layout

    def backward(self, loss: torch.Tensor, buffer: torch.Tensor) -> None:
        """Backpropagate ``loss.sum()``; each call's contribution lands in ``buffer`` (S, B, W)."""
        self._buffer = buffer
        self._phase = "backward"
        try:
            loss.sum().backward()
        finally:
            self._phase = "forward"
            self._buffer = None
        self._calls = []
        self._uses = {}
