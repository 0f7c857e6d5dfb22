"""Contractions of train and query features into SDI, the step matrix and TracIn; top-k.

With train features ``T[i, s, :]`` and query features ``Q[j, t, :]`` of one checkpoint:

- SDI[i, j, t]       = <sum_s T[i, s], Q[j, t]>        (query-step decomposition)
- M[i, j, s, t]      = <T[i, s], Q[j, t]>               (step x step matrix)
- TracIn[i, j]       = sum_t SDI[i, j, t] = <sum_s T[i, s], sum_t Q[j, t]>

Across checkpoints each is summed with weights eta_k. Work is done in row chunks of the
train side so intermediates stay bounded; only the result itself scales with N_train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Sign = Literal["positive", "negative"]

# Train rows per chunk are chosen so one chunk's result has at most this many elements.
CHUNK_ELEMENTS = 1 << 24


def _rows_per_chunk(per_row: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, per_row))


def _summed(train: torch.Tensor) -> torch.Tensor:
    """Train features summed over slots: (N, S, W) -> (N, W); (N, W) is taken as summed."""
    return train.sum(dim=1) if train.dim() == 3 else train


def query_step_sdi(train: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """SDI (N, M, S_q) from train (N, S_tr, W) or pre-summed (N, W) and query (M, S_q, W)."""
    summed = _summed(train)
    n = summed.shape[0]
    m_q, s_q, width = query.shape
    flat = query.reshape(m_q * s_q, width).T
    out = torch.empty(n, m_q * s_q, dtype=torch.float32, device=summed.device)
    step = _rows_per_chunk(m_q * s_q)
    for start in range(0, n, step):
        stop = min(n, start + step)
        torch.mm(summed[start:stop].float(), flat.float(), out=out[start:stop])
    return out.reshape(n, m_q, s_q)


def step_matrix(train: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Step x step matrix (N, M, S_tr, S_q) from train (N, S_tr, W) and query (M, S_q, W)."""
    n, s_tr, width = train.shape
    m_q, s_q, _ = query.shape
    flat_q = query.reshape(m_q * s_q, width).T.float()
    out = torch.empty(n, s_tr, m_q * s_q, dtype=torch.float32, device=train.device)
    step = _rows_per_chunk(s_tr * m_q * s_q)
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows = train[start:stop].reshape(-1, width).float()
        out[start:stop] = (rows @ flat_q).reshape(stop - start, s_tr, m_q * s_q)
    return out.reshape(n, s_tr, m_q, s_q).permute(0, 2, 1, 3)


def tracin(train: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """TracIn (N, M) from train and query features, each (N, S, W) or pre-summed (N, W)."""
    return _summed(train).float() @ _summed(query).float().T


@dataclass(frozen=True)
class TopK:
    """The k most positive (or negative) training examples per query (and step)."""

    indices: torch.Tensor  # (M, k) or (M, S, k) int64 train indices
    scores: torch.Tensor  # same shape, the scores at those indices


def top_k(scores: torch.Tensor, k: int, sign: Sign = "positive") -> TopK:
    """Top-k training examples per query of ``scores`` (N, M) or per (query, step) of (N, M, S).

    ``sign="negative"`` returns the most negative scores first.
    """
    if sign not in ("positive", "negative"):
        raise ValueError(f"sign must be 'positive' or 'negative', got {sign!r}")
    k = min(k, scores.shape[0])
    moved = torch.movedim(scores, 0, -1)  # (M, [S,] N)
    values, idx = torch.topk(moved, k, dim=-1, largest=sign == "positive", sorted=True)
    return TopK(idx, values)
