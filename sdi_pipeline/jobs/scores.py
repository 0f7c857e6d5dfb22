"""Scoring: contract train and query features into SDI, the step matrix and TracIn; top-k
and per-step totals. The in-process :func:`~sdi_pipeline.attribute.attribute` and the
pipeline's merge both score through this module.

With train features ``T[i, s, :]`` and query features ``Q[j, t, :]`` of one checkpoint:

- SDI[i, j, t]       = <sum_s T[i, s], Q[j, t]>        (query-step decomposition)
- M[i, j, s, t]      = <T[i, s], Q[j, t]>               (step x step matrix)
- TracIn[i, j]       = sum_t SDI[i, j, t] = <sum_s T[i, s], sum_t Q[j, t]>

Across checkpoints each is summed with weights eta_k. Rows of training examples can be
scored block by block: :func:`add_sdi` / :func:`add_step_matrix` accumulate one checkpoint's
contribution into a block's rows, and :class:`ScoreTotals` folds finished blocks into top-k
per query (overall and per step) and per-step energy and signed sums, so memory stays one
block whatever N_train is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sdi_pipeline.errors import ConfigError

Sign = Literal["positive", "negative"]
SIGNS: tuple[Sign, ...] = ("positive", "negative")
# Top-k scopes: by TracIn ("overall") and by SDI at each query slot ("per_step").
SCOPES = ("overall", "per_step")


def flat_queries(query: torch.Tensor) -> torch.Tensor:
    """Query features (M, S_q, W) as one (W, M*S_q) float32 matrix for the contractions."""
    m_q, s_q, width = query.shape
    return query.reshape(m_q * s_q, width).T.float().contiguous()


def add_sdi(out: torch.Tensor, train: torch.Tensor, query_flat: torch.Tensor, eta: float) -> None:
    """``out`` (n, M*S_q) += eta * (train summed over slots) @ ``query_flat``: one matmul.

    ``train`` is (n, S_tr, W) per-slot features or (n, W) features already summed.
    """
    summed = train.sum(dim=1) if train.dim() == 3 else train
    out.addmm_(summed.float(), query_flat, alpha=eta)


def add_step_matrix(
    out: torch.Tensor, train: torch.Tensor, query_flat: torch.Tensor, eta: float
) -> None:
    """``out`` (n, S_tr, M*S_q) += eta * the per-slot products of train (n, S_tr, W)."""
    per_slot = train.reshape(-1, train.shape[-1]).float() @ query_flat
    out.add_(per_slot.reshape(out.shape), alpha=eta)


def query_step_sdi(train: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """SDI (N, M, S_q) from train (N, S_tr, W) or pre-summed (N, W) and query (M, S_q, W)."""
    m_q, s_q, _ = query.shape
    out = torch.zeros(train.shape[0], m_q * s_q, dtype=torch.float32, device=train.device)
    add_sdi(out, train, flat_queries(query), 1.0)
    return out.reshape(-1, m_q, s_q)


def step_matrix(train: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Step x step matrix (N, M, S_tr, S_q) from train (N, S_tr, W) and query (M, S_q, W)."""
    n, s_tr, _ = train.shape
    m_q, s_q, _ = query.shape
    out = torch.zeros(n, s_tr, m_q * s_q, dtype=torch.float32, device=train.device)
    add_step_matrix(out, train, flat_queries(query), 1.0)
    return step_matrix_layout(out, m_q, s_q)


def step_matrix_layout(rows: torch.Tensor, n_query: int, s_q: int) -> torch.Tensor:
    """(n, S_tr, M*S_q) accumulator rows as the step matrix's (n, M, S_tr, S_q) layout."""
    return rows.reshape(rows.shape[0], rows.shape[1], n_query, s_q).permute(0, 2, 1, 3)


def tracin(train: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """TracIn (N, M) from train and query features, each (N, S, W) or pre-summed (N, W)."""

    def summed(t: torch.Tensor) -> torch.Tensor:
        return t.sum(dim=1) if t.dim() == 3 else t

    return summed(train).float() @ summed(query).float().T


@dataclass(frozen=True)
class TopK:
    """The k most positive (or negative) training examples per query (and step)."""

    indices: torch.Tensor  # (M, k) or (M, S, k) int64 train indices
    scores: torch.Tensor  # same shape, the scores at those indices


def _check_sign(sign: str) -> None:
    if sign not in SIGNS:
        raise ConfigError(f"sign must be 'positive' or 'negative', got {sign!r}")


def top_k(scores: torch.Tensor, k: int, sign: Sign = "positive") -> TopK:
    """Top-k training examples per query of ``scores`` (N, M) or per (query, step) of (N, M, S).

    ``sign="negative"`` returns the most negative scores first.
    """
    _check_sign(sign)
    moved = torch.movedim(scores, 0, -1)  # (M, [S,] N)
    idx = torch.arange(scores.shape[0]).expand_as(moved)
    indices, values = _ranked(idx, moved, k, sign == "positive")
    return TopK(indices, values)


def _ranked(
    indices: torch.Tensor, scores: torch.Tensor, k: int, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row of candidates, ties broken by the smaller train index: the
    same top-k whatever the blocks, their order or the world size."""
    k = min(k, scores.shape[-1])
    by_index = torch.argsort(indices, dim=-1, stable=True)
    indices, scores = indices.gather(-1, by_index), scores.gather(-1, by_index)
    order = torch.argsort(scores, dim=-1, descending=largest, stable=True)[..., :k]
    return indices.gather(-1, order), scores.gather(-1, order)


class RunningTopK:
    """Top-k over streamed rows of scores (n, *rest), kept per entry of ``rest``."""

    def __init__(self, rest: tuple[int, ...], k: int, sign: Sign) -> None:
        _check_sign(sign)
        self.k, self.largest = k, sign == "positive"
        fill = -torch.inf if self.largest else torch.inf
        self.scores = torch.full((*rest, 0), fill)
        self.indices = torch.zeros((*rest, 0), dtype=torch.int64)

    def update(self, scores: torch.Tensor, first_index: int) -> None:
        """Fold rows ``first_index ..`` of the scores in."""
        moved = torch.movedim(scores, 0, -1)
        idx = torch.arange(first_index, first_index + scores.shape[0]).expand_as(moved)
        self.fold(idx, moved)

    def fold(self, indices: torch.Tensor, scores: torch.Tensor) -> None:
        """Fold candidates in: ``indices`` and ``scores`` (*rest, c), e.g. another block's
        top-k. Exact when the candidates hold that block's k best of every entry."""
        all_scores = torch.cat([self.scores, scores.to(self.scores.dtype)], dim=-1)
        all_idx = torch.cat([self.indices, indices.to(torch.int64)], dim=-1)
        self.indices, self.scores = _ranked(all_idx, all_scores, self.k, self.largest)

    def result(self) -> TopK:
        return TopK(self.indices, self.scores)


def signed_share(signed: torch.Tensor) -> torch.Tensor:
    """Signed share of each slot in a query's total influence, from ``signed`` (M, S).

    ``signed[j, t] = sum_i SDI[i, j, t]``; share = signed / sum_t' |signed[j, t']|: its
    absolute values sum to 1 over slots, and the sign says whether the training set as a
    whole pushes the query's loss up or down through that step.
    """
    return signed / signed.abs().sum(dim=1, keepdim=True).clamp_min(1e-300)


class ScoreTotals:
    """What is kept of all SDI rows: top-k per query overall and per step, per-step totals.

    Feed it blocks of SDI rows in any order (:meth:`update`); ``energy`` (M, S) is
    sum_i |SDI[i, j, t]| and ``signed`` (M, S) is sum_i SDI[i, j, t], in float64.
    """

    def __init__(self, n_query: int, n_slots: int, k: int, overall: bool = True) -> None:
        scopes: list[tuple[str, tuple[int, ...]]] = [("per_step", (n_query, n_slots))]
        if overall:  # by TracIn; per-token rows do not sum to it
            scopes.insert(0, ("overall", (n_query,)))
        self.tops = {
            (scope, sign): RunningTopK(shape, k, sign) for scope, shape in scopes for sign in SIGNS
        }
        self.energy = torch.zeros(n_query, n_slots, dtype=torch.float64)
        self.signed = torch.zeros(n_query, n_slots, dtype=torch.float64)

    def update(self, sdi: torch.Tensor, first_index: int) -> torch.Tensor:
        """Fold SDI rows (n, M, S) of train examples ``first_index ..`` in; returns TracIn."""
        tracin_rows = sdi.sum(dim=2)
        for (scope, _sign), top in self.tops.items():
            top.update(tracin_rows if scope == "overall" else sdi, first_index)
        self.energy += sdi.abs().sum(dim=0).double()
        self.signed += sdi.sum(dim=0).double()
        return tracin_rows

    def absorb(
        self,
        tops: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]],
        energy: torch.Tensor,
        signed: torch.Tensor,
    ) -> None:
        """Fold in another set of rows' totals (a block's top-k candidates per (scope, sign),
        energy and signed sums): the same as having fed those rows to :meth:`update`."""
        for key, top in self.tops.items():
            top.fold(*tops[key])
        self.energy += energy
        self.signed += signed

    def signed_share(self) -> torch.Tensor:
        return signed_share(self.signed)
