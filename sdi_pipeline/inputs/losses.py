"""Per-example losses for language models, in the tool's ``loss_fn(model, batch) -> (B,)`` form.

Influence is per training example, so these never reduce over the batch. With
``per_token=True`` they return per-token losses (B, L) that sum over tokens to the
per-example loss, for per-token x per-step query features (``analysis.query_tokens``).
With Hydra, a loss is configured as a partial function, e.g.
``analysis.loss: {_target_: sdi_pipeline.inputs.losses.next_token_loss, _partial_: true}``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdi_pipeline.errors import DataError


def _input_ids(batch: Any, loss_name: str) -> torch.Tensor:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        keys = f" with keys {', '.join(map(str, batch))}" if isinstance(batch, Mapping) else ""
        raise DataError(
            f"{loss_name} needs a batch dict with 'input_ids' (B, T); got "
            f"{type(batch).__name__}{keys}"
        )
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise DataError(f"{loss_name}: batch['input_ids'] must be a (B, T) tensor, got {shape}")
    return ids


def _logits(model: nn.Module, input_ids: torch.Tensor, loss_name: str) -> torch.Tensor:
    """``model(input_ids)`` as a (B, T, V) tensor; Hugging Face outputs give their ``.logits``."""
    raw = model(input_ids)
    out = raw if isinstance(raw, torch.Tensor) else getattr(raw, "logits", None)
    if not isinstance(out, torch.Tensor):
        raise DataError(
            f"{loss_name}: model(input_ids) returned {type(raw).__name__}; expected logits "
            "(B, T, vocab) or an output object with a .logits attribute"
        )
    if out.dim() != 3 or out.shape[:2] != input_ids.shape:
        raise DataError(
            f"{loss_name}: model(input_ids) returned shape {tuple(out.shape)} for input_ids of "
            f"shape {tuple(input_ids.shape)}; expected logits (B, T, vocab)"
        )
    if out.dtype in (torch.float16, torch.bfloat16):
        out = out.float()  # half-precision log-softmax loses digits that influence scores need
    return out


def _next_token_targets(
    batch: Any, ignore_index: int, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, the targets (ignored positions set to ``ignore_index``) and each example's
    count of targets; a DataError for a batch :func:`next_token_loss` cannot use."""
    input_ids = _input_ids(batch, name)
    targets = input_ids[:, 1:].clone()
    mask = batch.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise DataError(
                f"{name}: attention_mask shape {shape} differs from input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        targets[mask[:, 1:] == 0] = ignore_index
    counts = (targets != ignore_index).sum(dim=1)
    empty = int((counts == 0).sum())
    if empty:
        which = (
            "the example has" if len(counts) == 1
            else f"{empty} of {len(counts)} example(s) in the batch have"
        )  # fmt: skip
        raise DataError(
            f"{name}: {which} no target positions (each needs at least two real tokens); "
            "filter out such short sequences"
        )
    return input_ids, targets, counts


def next_token_loss(
    model: nn.Module, batch: Any, ignore_index: int = -100, per_token: bool = False
) -> torch.Tensor:
    """Per-example mean next-token cross-entropy; returns shape (B,).

    ``per_token=True`` returns (B, T-1) instead: position p holds the loss of predicting token
    p+1 divided by the example's count of targets (0 at ignored positions), so the row sums
    are the per-example losses.

    ``logits = model(batch["input_ids"])`` (B, T, V) predicts ``input_ids[:, 1:]``. Target
    positions where ``batch["attention_mask"][:, 1:] == 0`` (padding, when the mask is present)
    or whose target equals ``ignore_index`` are left out, and each example's loss is the mean
    over its own remaining positions, so padding neither adds loss nor dilutes it. With right
    padding (as :class:`sdi_pipeline.inputs.data.PadCollate` makes) a causal model's logits at real
    positions do not depend on the padding, so the model is not given the mask.

    With Hydra: ``{_target_: sdi_pipeline.inputs.losses.next_token_loss, _partial_: true}``.

    Raises:
        DataError: if the batch or logits have the wrong shape, or some example has no target
            position (fewer than two real tokens).
    """
    name = "next_token_loss"
    input_ids, targets, counts = _next_token_targets(batch, ignore_index, name)
    logits = _logits(model, input_ids, name)
    vocab = logits.shape[-1]
    token_loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).view(targets.shape)  # ignored positions come back as exactly 0
    counts = counts.to(token_loss.dtype)
    return token_loss / counts[:, None] if per_token else token_loss.sum(dim=1) / counts


def _answer_targets(batch: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and the (B,) class ids; a DataError for a batch :func:`answer_token_loss`
    cannot use."""
    input_ids = _input_ids(batch, name)
    if "target" not in batch:
        raise DataError(
            f"{name} needs batch['target'] (B,) class ids; batch keys: {', '.join(batch)}"
        )
    target = torch.as_tensor(batch["target"])
    if target.dim() == 2 and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != input_ids.shape[:1] or target.is_floating_point():
        raise DataError(
            f"{name}: batch['target'] must be (B,) integer class ids with B={input_ids.shape[0]}, "
            f"got {target.dtype} of shape {tuple(target.shape)}"
        )
    return input_ids, target


def answer_token_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy of the last position's logits against ``batch["target"]``; shape (B,).

    For classification-style tasks whose answer is predicted at the final token. When the batch
    has an ``attention_mask`` the last *real* position of each example is used, so right-padded
    batches work. With Hydra: ``{_target_: sdi_pipeline.inputs.losses.answer_token_loss,
    _partial_: true}``.
    """
    name = "answer_token_loss"
    input_ids, target = _answer_targets(batch, name)
    logits = _logits(model, input_ids, name)
    mask = batch.get("attention_mask")
    if mask is None:
        last = logits[:, -1, :]
    else:
        # Index of the last 1 in each row: works for right and left padding alike.
        positions = torch.arange(mask.shape[1], device=mask.device)
        idx = (positions * (mask != 0)).argmax(dim=1)
        last = logits[torch.arange(logits.shape[0], device=logits.device), idx]
    return F.cross_entropy(last, target.long(), reduction="none")


def input_check(loss: Any) -> Callable[[Any], None] | None:
    """For a loss of this module (a function or a partial of one, as Hydra's ``_partial_``
    builds it): a function that raises the DataError the loss would raise for a collated
    batch's inputs, without running the model. None for other losses."""
    func, keywords = loss, {}
    while isinstance(func, functools.partial):
        keywords = {**func.keywords, **keywords}
        func = func.func
    if func is next_token_loss:
        ignore_index = int(keywords.get("ignore_index", -100))

        def next_token_inputs(batch: Any) -> None:
            _next_token_targets(batch, ignore_index, "next_token_loss")

        return next_token_inputs
    if func is answer_token_loss:

        def answer_token_inputs(batch: Any) -> None:
            _answer_targets(batch, "answer_token_loss")

        return answer_token_inputs
    return None
