"""In-memory SDI / TracIn across checkpoints, in one process.

The distributed pipeline computes the same quantities from sketches stored on disk; this is
the single-process path for small data, notebooks, and the reference the pipeline's results
are checked against.
"""

from __future__ import annotations

import itertools
import sys
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdi_pipeline.engine.checks import check_forward
from sdi_pipeline.engine.featurizer import LossFn, StepFeaturizer, TokenChoice
from sdi_pipeline.engine.slots import SlotLayout
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.errors import CheckpointError, ConfigError, DataError
from sdi_pipeline.inputs.checkpoints import CheckpointSpec, load_checkpoint, load_into, resolve_eta
from sdi_pipeline.jobs import scores


@dataclass
class Attribution:
    """Influence of N training examples on M queries, summed over checkpoints with eta."""

    sdi: torch.Tensor  # (N, M, S_query)
    tracin: torch.Tensor  # (N, M)
    step_matrix: torch.Tensor | None  # (N, M, S_train, S_query) when asked for
    etas: list[float]
    train_layout: SlotLayout
    query_layout: SlotLayout
    # With query_tokens: (N, M, S_query, P) SDI at each chosen query token, and the tokens'
    # positions (M, P) in the per-token loss.
    sdi_tokens: torch.Tensor | None = None
    token_positions: torch.Tensor | None = None

    def token_map(self, query: int, train: int | None = None) -> torch.Tensor:
        """(S_query, P) for one query: SDI of training example ``train`` at each (step,
        token), or with ``train=None`` the energy sum_i |SDI_tok[i, query, t, p]|."""
        if self.sdi_tokens is None:
            raise ConfigError("no per-token SDI: call attribute() with query_tokens=...")
        if train is None:
            return self.sdi_tokens[:, query].abs().sum(dim=0)
        return self.sdi_tokens[train, query]

    def top_k(self, k: int, step: int | None = None, sign: scores.Sign = "positive"):
        """Top-k train examples per query: by TracIn, or by SDI at query slot ``step``."""
        return scores.top_k(self.tracin if step is None else self.sdi[:, :, step], k, sign)

    def energy(self) -> torch.Tensor:
        """(M, S_query): sum over training examples of |SDI|, in float64."""
        return self._totals().energy

    def signed_share(self) -> torch.Tensor:
        """(M, S_query): each slot's signed share of the query's total influence."""
        return self._totals().signed_share()

    def _totals(self) -> scores.ScoreTotals:
        totals = scores.ScoreTotals(self.sdi.shape[1], self.sdi.shape[2], k=1)
        totals.update(self.sdi.cpu(), 0)
        return totals


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
    query_tokens: TokenChoice | None = None,
    loop_entry: str | None = None,
    allow_coupled_batch: bool = False,
) -> Attribution:
    """SDI, TracIn (and optionally the step matrix) of ``train`` on ``query`` batches.

    ``spec=None`` uses exact per-step gradients (small models). Each checkpoint is loaded into
    ``model`` in turn (``weights_only`` unless ``trust_checkpoints``); eta comes from the spec
    or the checkpoint's learning rate. ``query_tokens`` ("all", "last" or positions; needs a
    ``loss_fn`` returning per-token losses (B, L)) adds SDI per query token:
    ``sdi_tokens[i, j, t, p] = sum_k eta_k <train_i, step-t gradient of query j's loss at
    token p>``; over all tokens it sums to ``sdi``. ``loop_entry`` names the module whose
    calls open the loop passes where the order of calls cannot tell them. Before any
    featurizing, the first training batch is checked (:mod:`sdi_pipeline.engine.checks`):
    a forward pass that is not deterministic is refused, and so is one where an example's
    loss depends on its batch-mates unless ``allow_coupled_batch``.
    """
    specs = [_as_spec(c) for c in checkpoints]
    if not specs:
        raise CheckpointError("no checkpoints given")
    featurizer = StepFeaturizer(
        model, targets, spec, expected_steps=expected_steps, loop_entry=loop_entry
    )
    if iter(train) is train:  # a one-shot iterator: peek at its first batch and put it back
        train_iter = iter(train)
        first = next(train_iter, None)
        train = train_iter if first is None else itertools.chain([first], train_iter)
    else:
        first = next(iter(train), None)
    # (N, M*S_q), (N, S_tr, M*S_q) and (N, M*S_q*P) accumulators, made at checkpoint 1
    sdi = matrix = by_token = positions = None
    etas: list[float] = []
    layouts: tuple[SlotLayout, SlotLayout] | None = None
    for k, ck in enumerate(specs):
        data = load_checkpoint(ck.path, trust=trust_checkpoints)
        load_into(model, data, ck.path, trust=trust_checkpoints)
        eta = resolve_eta(ck, data)
        etas.append(eta)
        if k == 0 and first is not None:
            check_forward(model, loss_fn, first, allow_coupled=allow_coupled_batch)
        tag = f"ckpt {k + 1}/{len(specs)}"
        tr = featurizer.featurize(train, loss_fn, progress=progress, desc=f"{tag} train")
        qu = featurizer.featurize(
            query, loss_fn, progress=progress, desc=f"{tag} query", tokens=query_tokens
        )
        if layouts is None:
            layouts = (tr.layout, qu.layout)
            n, s_tr, n_q = len(tr), tr.layout.n_slots, len(qu) * qu.layout.n_slots
            device = tr.values.device
            sdi = torch.zeros(n, n_q, device=device)
            matrix = torch.zeros(n, s_tr, n_q, device=device) if with_step_matrix else None
            if qu.tokens is not None:
                by_token = torch.zeros(n, qu.tokens[..., 0].numel(), device=device)
                positions = qu.positions
        assert sdi is not None
        query_flat = scores.flat_queries(qu.values)
        scores.add_sdi(sdi, tr.values, query_flat, eta)
        if matrix is not None:
            scores.add_step_matrix(matrix, tr.values, query_flat, eta)
        if by_token is not None and qu.tokens is not None:
            if (
                positions is not None
                and qu.positions is not None
                and not torch.equal(positions, qu.positions)
            ):
                raise DataError(
                    f"checkpoint {ck.path} picks other query tokens than the first checkpoint "
                    "(query_tokens='last' follows nonzero per-token losses): choose positions"
                )
            scores.add_sdi(by_token, tr.values, scores.flat_queries(qu.tokens.flatten(1, 2)), eta)
    assert sdi is not None and layouts is not None
    s_q = layouts[1].n_slots
    n_query = sdi.shape[1] // s_q
    sdi3 = sdi.reshape(-1, n_query, s_q)
    full = None if matrix is None else scores.step_matrix_layout(matrix, n_query, s_q)
    result = Attribution(sdi3, sdi3.sum(dim=2), full, etas, layouts[0], layouts[1])
    if by_token is not None:
        result.sdi_tokens = by_token.reshape(sdi3.shape[0], n_query, s_q, -1)
        result.token_positions = positions
    return result


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`attribute`.

    ``from sdi_pipeline import attribute`` gives the function, but once this module is
    imported the package attribute of the same name is the module: calling it still runs
    the attribution.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Attribution:
        return attribute(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
