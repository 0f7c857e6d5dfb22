"""In-memory SDI / TracIn across checkpoints, in one process.

The distributed pipeline computes the same quantities from sketches stored on disk; this is
the single-process path for small data, notebooks, and the reference the pipeline's results
are checked against.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdi_pipeline import contract
from sdi_pipeline.checkpoints import CheckpointSpec, load_checkpoint, load_into, resolve_eta
from sdi_pipeline.errors import SDIError
from sdi_pipeline.featurize import LossFn, StepFeaturizer
from sdi_pipeline.layout import SlotLayout
from sdi_pipeline.sketch.spec import SketchSpec


@dataclass
class Attribution:
    """Influence of N training examples on M queries, summed over checkpoints with eta."""

    sdi: torch.Tensor  # (N, M, S_query)
    tracin: torch.Tensor  # (N, M)
    step_matrix: torch.Tensor | None  # (N, M, S_train, S_query) when asked for
    etas: list[float]
    train_layout: SlotLayout
    query_layout: SlotLayout

    def top_k(self, k: int, step: int | None = None, sign: contract.Sign = "positive"):
        """Top-k train examples per query: by TracIn, or by SDI at query slot ``step``."""
        scores = self.tracin if step is None else self.sdi[:, :, step]
        return contract.top_k(scores, k, sign)


def _as_spec(c: CheckpointSpec | str | Path) -> CheckpointSpec:
    return c if isinstance(c, CheckpointSpec) else CheckpointSpec(c)


def attribute(
    model: nn.Module,
    targets: Sequence[str | nn.Module] | str | nn.Module,
    checkpoints: Sequence[CheckpointSpec | str | Path],
    train: Iterable[Any],
    query: Iterable[Any],
    loss_fn: LossFn,
    *,
    spec: SketchSpec | None = SketchSpec(),
    with_step_matrix: bool = False,
    expected_steps: int | None = None,
    trust_checkpoints: bool = False,
    progress: bool = False,
) -> Attribution:
    """SDI, TracIn (and optionally the step matrix) of ``train`` on ``query`` batches.

    ``spec=None`` uses exact per-step gradients (small models). Each checkpoint is loaded into
    ``model`` in turn (``weights_only`` unless ``trust_checkpoints``); eta comes from the spec
    or the checkpoint's learning rate.
    """
    specs = [_as_spec(c) for c in checkpoints]
    if not specs:
        raise SDIError("no checkpoints given")
    featurizer = StepFeaturizer(model, targets, spec, expected_steps=expected_steps)
    sdi = matrix = None
    etas: list[float] = []
    layouts: tuple[SlotLayout, SlotLayout] | None = None
    for k, ck in enumerate(specs):
        data = load_checkpoint(ck.path, trust=trust_checkpoints)
        load_into(model, data, ck.path)
        eta = resolve_eta(ck, data)
        etas.append(eta)
        tag = f"ckpt {k + 1}/{len(specs)}"
        tr = featurizer.featurize(train, loss_fn, progress=progress, desc=f"{tag} train")
        qu = featurizer.featurize(query, loss_fn, progress=progress, desc=f"{tag} query")
        if layouts is None:
            layouts = (tr.layout, qu.layout)
        part_sdi = contract.query_step_sdi(tr.values, qu.values) * eta
        sdi = part_sdi if sdi is None else sdi + part_sdi
        if with_step_matrix:
            part = contract.step_matrix(tr.values, qu.values) * eta
            matrix = part if matrix is None else matrix + part
    assert sdi is not None and layouts is not None
    tracin = sdi.sum(dim=2)
    return Attribution(sdi, tracin, matrix, etas, layouts[0], layouts[1])
