"""Hooks that see every call of the target modules and route its gradient to a step slot.

During a capture, a forward hook on each module using target parameters records the call
(its args and kwargs, detached) and hooks the call's output tensor. When backward reaches
that output, the hook receives d(sum of losses)/d(output of *this call*) -- the unrolled
graph's gradient for this use of the shared weights -- and the module's handler adds the
per-example contribution into the slot of the call's loop step.

Backward asks autograd for the gradients of the recorded call outputs only
(``torch.autograd.grad``), so activation gradients are computed and no weight gradient is
ever formed or accumulated; the parameters keep ``requires_grad`` as the user set it, so
modules that branch on it (the fused inference fast path of ``nn.TransformerEncoderLayer``
and ``nn.MultiheadAttention``) run as in training. A call whose output does not require grad
gets a fresh leaf as output so the gradient still reaches it.

A call made for the whole batch at once -- inputs and output with a first dimension of 1
that the model broadcasts over the batch, such as position embeddings of ``(1, T)`` ids --
has its output and inputs expanded to the batch, so its gradient arrives per example (the
model computes the same values).

A call whose output has ``B*L`` rows (a multiple of the batch, each example's rows
contiguous: MoE routers and fused experts take token-flattened rows) is marked with its rows
per example, and the handler maps the rows to examples.

Each call's start is numbered by a forward pre-hook, as are the calls of the declared loop
entry modules; the slot of each call is the loop pass it starts in (:mod:`.slots`).

While a handler recomputes its module (the generic fallback does), the hooks stand aside:
nested calls of other target modules inside that recomputation are not calls of the model.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from sdi_pipeline.engine.registry import Call, LayerHandler
from sdi_pipeline.engine.slots import SlotLayout, describe_assignment, infer_layout
from sdi_pipeline.errors import UnsupportedModel


class StepCapture:
    """Records target-module calls of one forward pass and dispatches their gradients."""

    def __init__(
        self,
        model: nn.Module,
        handlers: dict[str, LayerHandler],
        entry: tuple[str, list[str]] | None = None,
    ) -> None:
        """``entry``: the declared loop entry (as given) and the modules it names, each of
        whose calls opens a loop pass; None: inferred from the calls."""
        self.model = model
        self.handlers = handlers
        self.entry = entry
        self._started = 0  # calls started so far in this forward pass
        self._open: dict[str, list[int]] = {}  # start of each unfinished call, per module
        self._entry_starts: list[int] = []
        self._ancestor_starts: dict[str, list[int]] = {}
        self._no_grad: set[str] = set()  # modules called with gradients disabled
        self._with_grad: set[str] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] | None = None
        self._calls: list[Call] = []
        self._outputs: list[torch.Tensor] = []  # the hooked output of each call
        self._uses: dict[str, int] = {}
        self._phase = "idle"
        self._suspended = False
        self._keep = False  # the current backward is followed by another of the same forward
        self._batch_size: int | None = None
        self._slots: dict[str, list[int]] = {}
        self._buffer: torch.Tensor | None = None
        #: Which modules went to which slots in the last forward pass, in words.
        self.assignment: str | None = None

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """Install the forward hooks for the duration."""
        self._install()
        try:
            yield
        finally:
            self._remove()
            self.reset()

    def _install(self) -> None:
        handles = []
        if self.entry is not None:
            for name in self.entry[1]:  # registered first: the entry opens before its call
                module = self.model.get_submodule(name)
                handles.append(module.register_forward_pre_hook(self._on_entry))
        # The modules above the targets (a decoder layer holding its gates) may open the passes.
        above = {
            ".".join(n.split(".")[:k]) for n in self.handlers for k in range(1, n.count(".") + 1)
        }
        for name in sorted(above - set(self.handlers)):
            module = self.model.get_submodule(name)
            handles.append(
                module.register_forward_pre_hook(functools.partial(self._on_above, name))
            )
        for name, h in self.handlers.items():
            handles.append(
                h.module.register_forward_pre_hook(functools.partial(self._on_start, name))
            )
            handles.append(
                h.module.register_forward_hook(
                    functools.partial(self._on_forward, name), with_kwargs=True
                )
            )
        self._handles = handles

    def _remove(self) -> None:
        for handle in self._handles or []:
            handle.remove()
        self._handles = None

    def set_handlers(self, handlers: dict[str, LayerHandler]) -> None:
        """Use these handlers from the next forward pass on (hooks moved if installed)."""
        installed = self._handles is not None
        self._remove()
        self.handlers = handlers
        if installed:
            self._install()

    def reset(self, batch_size: int | None = None) -> None:
        """Forget the current forward pass; ``batch_size``: the next one's, if known."""
        self._calls = []
        self._outputs = []
        self._uses = {}
        self._slots = {}
        self._buffer = None
        self._batch_size = batch_size
        self._phase = "forward"
        self._started = 0
        self._open = {}
        self._entry_starts = []
        self._ancestor_starts = {}
        self._no_grad: set[str] = set()  # modules called with gradients disabled
        self._with_grad: set[str] = set()

    @contextmanager
    def _handler_running(self) -> Iterator[None]:
        self._suspended = True
        try:
            yield
        finally:
            self._suspended = False

    def _recording(self) -> bool:
        return not self._suspended and self._phase == "forward"

    def _on_entry(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._recording():
            self._entry_starts.append(self._started)
            self._started += 1

    def _on_above(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._recording():
            self._ancestor_starts.setdefault(name, []).append(self._started)
            self._started += 1

    def _on_start(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._recording():
            self._open.setdefault(name, []).append(self._started)
            self._started += 1

    def _on_forward(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: object,
    ) -> Any:
        if self._suspended:
            return None
        if self._phase == "backward":
            raise UnsupportedModel(
                f"target module '{name}' ran again during backward: activation checkpointing "
                "(recomputation) inside the targets is not supported; disable it for attribution."
            )
        if not torch.is_grad_enabled():
            # A call outside the graph (a model's truncated backprop through early loop
            # iterations): it gets no gradient, but its time still marks the passes.
            self._no_grad.add(name)
            use = self._uses.get(name, 0)
            self._uses[name] = use + 1
            call = Call(name, use, (), {})
            call.start = self._open[name].pop()
            self._calls.append(call)
            return None
        # A tuple output (nn.MultiheadAttention's (output, weights)): its first tensor is the
        # call's output; the others must not carry gradient (checked in backward).
        rest: tuple[Any, ...] = ()
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            output, rest = output[0], tuple(output[1:])
        if not isinstance(output, torch.Tensor):
            raise UnsupportedModel(
                f"target module '{name}' returned {type(output).__name__}, not a tensor (or a "
                "tuple starting with one); it cannot be targeted."
            )
        batch = self._batch_size
        broadcast = batch is not None and batch > 1 and output.dim() > 0 and output.shape[0] == 1

        def detach(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            value = value.detach()
            if broadcast and value.dim() > 0 and value.shape[0] == 1:
                value = value.expand(batch, *value.shape[1:])
            return value

        original = output
        if broadcast:
            assert batch is not None
            output = output.expand(batch, *output.shape[1:])
        if self.handlers[name].all_outputs and any(_needs_grad(e) for e in rest):
            # Each output its own node: its hook then gets the gradient of its own consumers
            # only, not the part that reaches it through another output computed from it
            # inside the module (router weights from logits), which that output's vjp counts.
            output = output.view_as(output)
            rest = tuple(e.view_as(e) if _needs_grad(e) else e for e in rest)
        self._with_grad.add(name)
        use = self._uses.get(name, 0)
        self._uses[name] = use + 1
        call = Call(name, use, tree_map(detach, args), tree_map(detach, kwargs))
        call.start = self._open[name].pop()
        rows = output.shape[0] if output.dim() > 0 else 0
        if batch is not None and batch > 0 and rows != batch and rows % batch == 0:
            call.rows, call.examples = rows // batch, batch
        self._calls.append(call)
        with self._handler_running():
            self.handlers[name].on_forward(call, output)
        out = output if output.requires_grad else output.detach().requires_grad_()
        out.register_hook(functools.partial(self._on_grad, call))
        self._outputs.append(out)
        for k, extra in enumerate(rest, start=1):
            if isinstance(extra, torch.Tensor) and extra.requires_grad:
                if self.handlers[name].all_outputs:  # contributions of each output add up
                    extra.register_hook(functools.partial(self._on_grad, replace(call, output=k)))
                else:
                    extra.register_hook(functools.partial(_refuse_extra_gradient, name, k))
                self._outputs.append(extra)
        if out is original:
            return None
        return type(rest)((out, *rest)) if rest else out  # type: ignore[return-value]

    def _on_grad(self, call: Call, grad: torch.Tensor) -> None:
        assert self._buffer is not None, "gradient arrived outside capture.backward"
        slot = self._slots[call.module_name][call.use]
        with torch.no_grad(), self._handler_running():
            self.handlers[call.module_name].contribute(call, grad.detach(), self._buffer[:, slot])
        if not self._keep:
            call.free()  # free the inputs as soon as this call is done

    def modules_called(self) -> set[str]:
        """The target modules called so far in this forward pass."""
        return {call.module_name for call in self._calls}

    def finish_forward(
        self, batch_size: int, expected_steps: int | None, lengths: set[int] | None = None
    ) -> SlotLayout:
        """Validate the recorded calls and fix the slot of each; returns the layout.

        ``lengths``: the batch's sequence lengths. Token-flattened rows are taken as the
        examples' rows only where their count per example is one of them: rows gathered per
        expert whose count happens to be a multiple of the batch are refused, not misread."""
        only = sorted(self._no_grad - self._with_grad)
        if only:
            raise UnsupportedModel(
                f"target module '{only[0]}' ran with gradients disabled (torch.no_grad() or "
                "torch.inference_mode()) in every call: the loss function must run the forward "
                "pass with autograd on so per-step gradients can be taken."
            )
        never = sorted(n for n in self.handlers if all(c.module_name != n for c in self._calls))
        if never and len(never) == len(self.handlers):
            raise UnsupportedModel(
                "none of the target modules ran in the forward pass of loss_fn: check that "
                "loss_fn calls the model the featurizer was built with."
            )
        if never:
            raise UnsupportedModel(
                f"target modules never ran in the forward pass: {', '.join(never)}. Their "
                "parameters get no gradient through a call, and no module above them ran "
                "either; leave them out of the targets."
            )
        for call in self._calls:
            rows = _rows(call)
            flattened = call.rows is not None and call.examples == batch_size
            if rows is not None and rows != batch_size:
                if (
                    flattened
                    and rows == batch_size * (call.rows or 0)
                    and (not lengths or call.rows in lengths)
                ):
                    continue
                raise UnsupportedModel(
                    f"target module '{call.module_name}' (call {call.use + 1}) got an input "
                    f"with {rows} rows on dim 0 but the loss has {batch_size} examples: target "
                    "modules must take the batch on dim 0 (batch_first) or all B*L token rows "
                    "(each example's rows contiguous); rows gathered per expert cannot be "
                    "mapped to examples: target the module that takes all rows."
                )
        calls: dict[str, list[int]] = {}
        for call in self._calls:
            calls.setdefault(call.module_name, []).append(call.start)
        entry = None if self.entry is None else (self.entry[0], self._entry_starts)
        layout, self._slots = infer_layout(calls, expected_steps, entry, self._ancestor_starts)
        self.assignment = describe_assignment(
            self._slots, layout, None if self.entry is None else self.entry[0]
        )
        return layout

    def backward(self, loss: torch.Tensor, buffer: torch.Tensor, keep: bool = False) -> None:
        """Backpropagate ``loss.sum()`` to the calls' outputs; each call's contribution lands
        in its slot's column of ``buffer`` (B, S, W). ``keep``: another backward of the same
        forward follows."""
        self._buffer = buffer
        self._phase = "backward"
        self._keep = keep
        try:
            # Outputs the loss does not depend on get no gradient: their contribution is 0.
            torch.autograd.grad(loss.sum(), self._outputs, allow_unused=True, retain_graph=keep)
        finally:
            self._phase = "forward"
            self._buffer = None
        if not keep:
            self._calls = []
            self._outputs = []
            self._uses = {}


def _needs_grad(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


def _refuse_extra_gradient(name: str, k: int, grad: torch.Tensor) -> None:
    if bool(grad.ne(0).any()):
        raise UnsupportedModel(
            f"the loss depends on output {k} of target module '{name}' (a tuple), but only a "
            "target module's first output is attributed by its handler: target its submodules "
            "instead."
        )


def _rows(call: Call) -> int | None:
    """Dim 0 of the call's main input, or None if it has no tensor input of rank >= 1."""
    for value in (*call.args, *call.kwargs.values()):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0]) if value.dim() > 0 else None
    return None
