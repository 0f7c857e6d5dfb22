"""Loop dynamics of the queries: the answer token's state and logit margin after each step.

A run whose config names ``analysis.loop_trace`` (a callable ``trace(model, batch) ->
LoopTrace``) records, at every checkpoint, each query's answer-token hidden state and logit
margin after every loop step; the merge keeps them in results.h5 (``dynamics/``) and the
summary and W&B draw them beside SDI at the answer token (:func:`plots.plot_loop_dynamics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sdi_pipeline.errors import DataError

__all__ = ["LoopTrace", "TraceFn", "trace_batches"]


@dataclass
class LoopTrace:
    """What a query's answer token does across the loop, for B examples and τ loop steps.

    Attributes:
        states: (B, τ, d) the answer token's hidden state after each loop step.
        margins: (B, τ) the readout applied to that state: the correct class's logit minus
            the other's (or the best other class's), so positive means right.
    """

    states: torch.Tensor
    margins: torch.Tensor

    def check(self, loop_steps: int, n_examples: int | None = None) -> None:
        """Refuse a trace whose shapes do not fit the run's loop steps (and ``n_examples``,
        by default as many as ``states`` holds)."""
        if not (isinstance(self.states, torch.Tensor) and isinstance(self.margins, torch.Tensor)):
            raise DataError(
                "analysis.loop_trace must return LoopTrace(states, margins) of torch tensors, "
                f"got {type(self.states).__name__} and {type(self.margins).__name__}"
            )
        if self.states.dim() != 3 or self.margins.dim() != 2:
            raise DataError(
                f"analysis.loop_trace returned states {tuple(self.states.shape)} and margins "
                f"{tuple(self.margins.shape)}; expected (B, loop steps, d) and (B, loop steps)"
            )
        n = self.states.shape[0] if n_examples is None else n_examples
        want = (n, loop_steps)
        if tuple(self.states.shape[:2]) != want or tuple(self.margins.shape) != want:
            raise DataError(
                f"analysis.loop_trace returned {tuple(self.margins.shape)} (examples, steps) "
                f"for {n} examples, but the targets show {loop_steps} loop steps: return one "
                "state and margin per example and loop step"
            )


TraceFn = Callable[[nn.Module, Any], LoopTrace]


def trace_batches(
    fn: TraceFn, model: nn.Module, batches: Iterable[Any], loop_steps: int
) -> LoopTrace:
    """The loop traces of every example of ``batches``, in order, without gradients.

    The model is in eval mode meanwhile (dropout off, as when it is sketched).
    """
    was_training = model.training
    model.eval()
    parts: list[LoopTrace] = []
    try:
        with torch.no_grad():
            for batch in batches:
                trace = fn(model, batch)
                if not isinstance(trace, LoopTrace):
                    raise DataError(
                        "analysis.loop_trace must return "
                        "sdi_pipeline.inputs.dynamics.LoopTrace(states, "
                        f"margins), got {type(trace).__name__}"
                    )
                trace.check(loop_steps)
                parts.append(trace)
    finally:
        model.train(was_training)
    if not parts:
        raise DataError("no batches to trace: the query set is empty")
    return LoopTrace(
        torch.cat([p.states.float().cpu() for p in parts]),
        torch.cat([p.margins.float().cpu() for p in parts]),
    )
