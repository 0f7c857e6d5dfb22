"""Per-example, per-loop-step gradient features: sketched (default) or exact.

:class:`StepFeaturizer` turns batches into ``values[i, s, :]``: the gradient of example i's
loss with respect to the target parameters *as used in slot s* (prelude, loop step, readout),
either sketched into m dimensions or materialised exactly (small models; the baseline).
Summing over slots gives the ordinary per-example gradient (or its sketch).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from sdi_pipeline.engine.capture import StepCapture
from sdi_pipeline.engine.kernels import Workspace
from sdi_pipeline.engine.registry import LayerHandler, TargetParam
from sdi_pipeline.engine.slots import SlotLayout
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.engine.targets import classify, collect_target_params, resolve_target_modules
from sdi_pipeline.errors import DataError, UnsupportedModel
from sdi_pipeline.messages import shortened

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class StepFeatures:
    """Features of N examples: ``values`` (N, slots, width) float32 and ``loss`` (N,)."""

    values: torch.Tensor
    loss: torch.Tensor
    layout: SlotLayout

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def summed(self) -> torch.Tensor:
        """(N, width): the whole per-example gradient (or its sketch), all slots summed."""
        return self.values.sum(dim=1)

    @staticmethod
    def concat(parts: Sequence[StepFeatures]) -> StepFeatures:
        """Stack features of consecutive batches (all with the same layout)."""
        if not parts:
            raise DataError("no batches to featurize: the data loader is empty")
        return StepFeatures(
            torch.cat([p.values for p in parts]),
            torch.cat([p.loss for p in parts]),
            parts[0].layout,
        )


def _batch_size_hint(batch: Any) -> int | None:
    """Dim 0 of the batch's first tensor: lets calls broadcast over the batch be expanded.

    The loss's length is checked against it (a loss_fn may slice the batch otherwise)."""
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


class StepFeaturizer:
    """Per-example per-step gradient sketches (or exact gradients) of target modules.

    Args:
        model: the model; ``loss_fn(model, batch)`` must run it.
        targets: module names, glob patterns over ``named_modules()``, or modules: the looped
            block, and optionally single-use modules before/after the loop (binned into a
            prelude / readout slot).
        spec: the sketch; ``None`` materialises exact gradients (small models only).
        expected_steps: if given, the loop step count the targets must show.

    The model is put in eval mode while featurizing (dropout off) and restored after.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Sequence[str | nn.Module] | str | nn.Module,
        spec: SketchSpec | None = SketchSpec(),
        *,
        expected_steps: int | None = None,
    ) -> None:
        self.model = model
        self.spec = spec
        self.expected_steps = expected_steps
        self.target_modules = resolve_target_modules(model, targets)
        uses, owners = collect_target_params(model, self.target_modules)
        # One entry per parameter (a tied one has several uses, one per using module).
        self.params = list({p.name: p for p in reversed(uses)}.values())[::-1]
        offsets: dict[str, int] | None = None
        if spec is None:
            offsets, total = {}, 0
            for p in self.params:
                offsets[p.name] = total
                total += p.numel
            self.width = total
        else:
            self.width = spec.m
        by_module: dict[str, list[TargetParam]] = {}
        for p in uses:
            by_module.setdefault(p.module_name, []).append(p)
        workspace = Workspace()  # one scratch buffer shared by all handlers
        self.handlers: dict[str, LayerHandler] = {
            name: handler(owners[name], by_module[name], spec, offsets, workspace)
            for name, handler in classify(owners, uses).items()
        }
        self._capture = StepCapture(model, self.handlers)

    @property
    def exact(self) -> bool:
        return self.spec is None

    @property
    def assignment(self) -> str | None:
        """What the last batch showed, in words: ``4 loop steps of block.* (6 modules),
        prelude: tok_emb``; None before the first batch."""
        return self._capture.assignment

    def _batch(self, batch: Any, loss_fn: LossFn, first_index: int) -> StepFeatures:
        self._capture.reset(_batch_size_hint(batch))
        loss = loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor):
            raise DataError(f"loss_fn must return a tensor of per-example losses, got {type(loss)}")
        if loss.dim() != 1:
            raise DataError(
                f"loss_fn must return one loss per example, shape (B,); got shape "
                f"{tuple(loss.shape)}. Use reduction='none' and reduce over tokens only."
            )
        bad = torch.nonzero(~torch.isfinite(loss.detach())).flatten() + first_index
        if len(bad):
            raise DataError(
                f"non-finite loss (NaN or inf) for examples {shortened(int(i) for i in bad)}"
            )
        layout = self._capture.finish_forward(loss.shape[0], self.expected_steps)
        if not loss.requires_grad:
            raise DataError(
                "the loss does not depend on the target modules' outputs (it does not require "
                "grad): check that loss_fn uses the model's output."
            )
        # Slot-major, so each call scatters into one contiguous (B, width) block: index_add_
        # into a strided view is about twice as slow.
        by_slot = torch.zeros(
            layout.n_slots, loss.shape[0], self.width, dtype=torch.float32, device=loss.device
        )
        self._capture.backward(loss, by_slot)
        buffer = by_slot.transpose(0, 1).contiguous()
        finite = torch.isfinite(buffer).all(dim=2)
        if not bool(finite.all()):
            rows, slots = torch.nonzero(~finite, as_tuple=True)
            names = layout.slot_names()
            where = sorted({names[int(s)] for s in slots})
            listed = shortened(int(i) for i in rows.unique() + first_index)
            raise DataError(
                f"non-finite gradient sketches for examples {listed} "
                f"(at {', '.join(where)}): the model produces NaN/inf gradients for them."
            )
        return StepFeatures(buffer, loss.detach().float(), layout)

    def iter_batches(
        self,
        batches: Iterable[Any],
        loss_fn: LossFn,
        *,
        progress: bool = False,
        desc: str = "featurize",
    ) -> Generator[StepFeatures, None, None]:
        """Features of each batch in turn (hooks installed while the iterator runs).

        Every batch must show the same slot layout; the first example of the first batch is
        example 0 in error messages. Stopping early (``break``) is safe: the model's hooks,
        parameter flags and train/eval mode are restored when the iterator is closed.
        """
        was_training = self.model.training
        self.model.eval()
        layout: SlotLayout | None = None
        seen = 0
        try:
            with self._capture.hooks():
                total = len(batches) if isinstance(batches, Sized) else None
                for n, batch in enumerate(
                    tqdm(batches, desc=desc, total=total, disable=not progress, leave=False)
                ):
                    part = self._batch(batch, loss_fn, seen)
                    if layout is not None and part.layout != layout:
                        raise UnsupportedModel(
                            f"batch {n} shows {part.layout.describe()} but earlier batches "
                            f"showed {layout.describe()}: the loop count must not change "
                            "within one featurization."
                        )
                    layout = part.layout
                    seen += len(part)
                    yield part
        finally:
            self.model.train(was_training)

    def featurize(
        self,
        batches: Iterable[Any],
        loss_fn: LossFn,
        *,
        progress: bool = False,
        desc: str = "featurize",
    ) -> StepFeatures:
        """Features of every example of ``batches`` (e.g. a DataLoader), in order."""
        return StepFeatures.concat(
            list(self.iter_batches(batches, loss_fn, progress=progress, desc=desc))
        )
