"""Checks of the inputs to the math, run once per job on the first batch before any unit.

Per-step gradients are only meaningful if the loss is a deterministic function of the
weights and of the example alone. :func:`check_deterministic` runs the first batch's loss
twice and refuses a forward pass that changes between runs (a random initial state, dropout
left on); :func:`check_batch_independent` compares one example's loss alone with its loss
inside the batch and refuses coupling between examples (batch norm in training mode, MoE
capacity limits) unless accepted knowingly. Both run the model as the featurizer does: in
eval mode, gradients enabled; the model's mode is restored after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from sdi_pipeline.engine.featurizer import LossFn
from sdi_pipeline.errors import DataError, UnsupportedModel

# Relative tolerance of both checks, against the losses' scale: far above float rounding and
# reduction-order noise, far below what a random state or a batch-mate changes.
RTOL = 1e-4


@contextmanager
def _as_featurized(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)


def _losses(model: nn.Module, loss_fn: LossFn, batch: Any) -> torch.Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.dim() not in (1, 2):
        raise DataError(
            "loss_fn must return one loss per example (B,) or per-token losses (B, L); got "
            f"{type(loss).__name__} {tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
        )
    return (loss.sum(dim=1) if loss.dim() == 2 else loss).detach().double().cpu()


def _gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Largest difference of two loss vectors and their scale."""
    return float((a - b).abs().max()), max(float(a.abs().max()), float(b.abs().max()), 1e-30)


def check_deterministic(model: nn.Module, loss_fn: LossFn, batch: Any) -> None:
    """Refuse a forward pass whose losses differ between two runs on the same batch."""
    with _as_featurized(model):
        first = _losses(model, loss_fn, batch)
        second = _losses(model, loss_fn, batch)
    if first.shape != second.shape:
        raise UnsupportedModel(
            f"loss_fn returned {tuple(first.shape)} then {tuple(second.shape)} losses for the "
            "same batch: the forward pass must be deterministic."
        )
    gap, scale = _gap(first, second)
    if gap > RTOL * scale:
        raise UnsupportedModel(
            f"the forward pass is not deterministic: the first batch's losses differ between "
            f"two runs (max difference {gap:.3g}, loss scale {scale:.3g}), so per-step "
            "gradients would be noise; likely a random initial state (torch.randn in forward) "
            "or dropout that stays on in eval mode: draw the state from a fixed seed or pass "
            "it in, and turn dropout off (model.eval(), p=0)."
        )


def _first_example(batch: Any, size: int) -> Any:
    return tree_map(
        lambda t: (
            t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == size else t
        ),
        batch,
    )


def check_batch_independent(
    model: nn.Module, loss_fn: LossFn, batch: Any, *, allow_coupled: bool = False
) -> str | None:
    """Refuse a model whose first example's loss alone differs from its loss in the batch.

    With ``allow_coupled`` the coupling is accepted and described instead (the returned
    line, for the log); None when the losses agree or the batch has one example.
    """
    sizes = [t.shape[0] for t in tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim()]
    if not sizes or sizes[0] < 2:
        return None
    with _as_featurized(model):
        together = _losses(model, loss_fn, batch)[:1]
        alone = _losses(model, loss_fn, _first_example(batch, sizes[0]))
    gap, scale = _gap(together, alone[:1])
    if gap <= RTOL * scale:
        return None
    what = (
        f"example 0's loss alone ({float(alone[0]):.6g}) differs from its loss in the batch "
        f"({float(together[0]):.6g})"
    )
    if allow_coupled:
        return f"{what}: examples are coupled within a batch; accepted (allow_coupled_batch)"
    raise UnsupportedModel(
        f"{what}: the model couples the examples of a batch (batch norm in training mode, MoE "
        "expert capacity limits, padding-dependent computation), so per-example gradients "
        "depend on the batch; remove the coupling (model.eval(), no token dropping) or accept "
        "it knowingly with analysis.allow_coupled_batch=true (allow_coupled_batch=True)."
    )


def check_forward(
    model: nn.Module, loss_fn: LossFn, batch: Any, *, allow_coupled: bool = False
) -> str | None:
    """Both checks on one batch, determinism first; returns the accepted-coupling line."""
    check_deterministic(model, loss_fn, batch)
    return check_batch_independent(model, loss_fn, batch, allow_coupled=allow_coupled)
