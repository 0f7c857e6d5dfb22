"""Bayesian influence (BIF) from SGLD loss traces: correlations as a GEMM over blocks of rows.

The BIF of training example i on query j is the Pearson correlation (or the covariance,
ddof=1) of their loss traces over the S samples of the posterior: the C·D draws of all chains
stacked, or the D draws averaged over chains first (devinterp 2.0.1's ``compute_bif``,
``reduce_chain_dimension_method`` "stack" or "mean"). :func:`standardize` turns each trace into
z = (x − mean) / ‖x − mean‖ (correlation) or (x − mean) / √(S−1) (covariance), so that

    BIF(block, queries) = Z_block @ Z_queries.T                       (:func:`score_block`)

for any block of training rows. Rows are standardised and contracted in tiles of
:data:`TILE` rows aligned to absolute example indices (a block's first tile zero-padded), so a
row's score is computed by the same operations whatever the block split: byte-identical.

What is kept per side (``method`` in :func:`compute_bif`), traces being (C, D, N, K) with K
positions (tokens, loop steps, or 1 for per-example losses):

- "sequence": the mean over positions on both sides (devinterp's "sequence") → (N, M).
- "token": every pair of positions (devinterp's "token") → (N, M, K, K'); with
  ``average_tokenwise`` the mean over (t, u), which is ⟨mean_t z_it, mean_u z_ju⟩ → (N, M).
- "query": the training example's mean over positions against each query position →
  (N, M, K'): the query-token BIF, or the BIF per loop step of the query's readout.

By linearity, with covariance the "sequence" BIF equals the "token" BIF averaged over (t, u),
and the "query" BIF averaged over u. Correlations have no such identity.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch

from sdi_pipeline.errors import ConfigError, DataError

__all__ = [
    "TILE",
    "ChainReduction",
    "Method",
    "chain_samples",
    "compute_bif",
    "score_block",
    "standardize",
]

ChainReduction = Literal["stack", "mean"]
Method = Literal["sequence", "token", "query"]

TILE = 64
"""Rows per tile: blocks are standardised and contracted in tiles aligned to multiples of it."""


def chain_samples(traces: torch.Tensor, reduce: ChainReduction = "stack") -> torch.Tensor:
    """(C, D, N, K) traces → (N, K, S) float64 samples: S = C·D draws, chain-major
    ("stack"), or S = D draws averaged over the chains ("mean")."""
    if traces.dim() != 4:
        raise DataError(
            f"loss traces must be (chains, draws, examples, positions), got {tuple(traces.shape)}"
        )
    x = traces.double()
    if reduce == "stack":
        c, d, n, k = x.shape
        return x.permute(2, 3, 0, 1).reshape(n, k, c * d)
    if reduce == "mean":
        return x.mean(dim=0).permute(1, 2, 0)
    raise ConfigError(f"bif.reduce must be 'stack' or 'mean', got {reduce!r}")


def _tiles(n: int, first_index: int) -> Iterator[tuple[int, int, int]]:
    """(lo, hi, pad) for each tile of rows [first_index, first_index + n): block rows lo:hi
    sit at tile rows pad:pad + hi - lo."""
    lo = 0
    while lo < n:
        pad = (first_index + lo) % TILE
        hi = min(n, lo + TILE - pad)
        yield lo, hi, pad
        lo = hi


def _padded(x: torch.Tensor, lo: int, hi: int, pad: int) -> torch.Tensor:
    tile = x.new_zeros((TILE, *x.shape[1:]))
    tile[pad : pad + hi - lo] = x[lo:hi]
    return tile


def standardize(
    samples: torch.Tensor, *, covariance: bool = False, first_index: int = 0
) -> torch.Tensor:
    """(N, K, S) samples → (N, K, S) float32 z-traces whose dot products are the BIF.

    Correlation: z = (x − x̄)/‖x − x̄‖; covariance: z = (x − x̄)/√(S − 1). ``first_index`` is
    the absolute index of row 0 (for tile alignment and messages).

    Raises:
        ConfigError: fewer samples than the statistic needs (3 for a correlation: with 2 it
            is always ±1; 2 for a covariance).
        DataError: non-finite traces, or (correlation) constant ones, where it is undefined.
    """
    if samples.dim() != 3:
        raise DataError(f"samples must be (examples, positions, S), got {tuple(samples.shape)}")
    n, k, s = samples.shape
    need = 2 if covariance else 3
    if s < need:
        what = "covariance" if covariance else "correlation"
        raise ConfigError(
            f"BIF as a {what} needs at least {need} samples per trace, got {s}: raise "
            "sgld.num_draws (or sgld.num_chains with reduce='stack')"
        )
    x = samples.double()
    bad = ~torch.isfinite(x).all(dim=2)
    if bad.any():
        rows = sorted({int(i) + first_index for i in bad.nonzero()[:, 0]})
        raise DataError(
            f"non-finite loss traces for examples {_listed(rows)}: the chain diverged; "
            "lower sgld.lr"
        )
    if not covariance:
        flat = (x.amax(dim=2) == x.amin(dim=2)).nonzero()
        if len(flat):
            rows = sorted({int(i) + first_index for i in flat[:, 0]})
            where = "" if k == 1 else f" (at {len(flat)} example-position pairs)"
            raise DataError(
                f"the loss traces of examples {_listed(rows)} are constant over the {s} "
                f"samples{where}, so their BIF correlation is undefined: leave out positions "
                "that never change (padding), use bif.covariance=true, or check that the "
                "sampler moves (sgld.lr, sgld.noise_level)"
            )
    out = torch.empty((n, k, s), dtype=torch.float32)
    for lo, hi, pad in _tiles(n, first_index):
        tile = _padded(x, lo, hi, pad)
        centred = tile - tile.mean(dim=2, keepdim=True)
        if covariance:
            z = centred / (s - 1) ** 0.5
        else:
            norm = torch.linalg.vector_norm(centred, dim=2, keepdim=True)
            # Padded rows have norm 0; real ones were checked non-constant above.
            z = centred / torch.where(norm > 0, norm, torch.ones_like(norm))
        out[lo:hi] = z[pad : pad + hi - lo].float()
    return out


def _listed(rows: list[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, rows[:limit]))
    return shown + (f", ... ({len(rows)} in all)" if len(rows) > limit else "")


def score_block(
    z_train: torch.Tensor, z_query: torch.Tensor, *, first_index: int = 0
) -> torch.Tensor:
    """BIF of a block of training rows on every query: (n, M, K, K') from z-traces
    z_train (n, K, S) and z_query (M, K', S), as one GEMM per tile of :data:`TILE` rows.

    ``first_index`` is the absolute index of the block's row 0: tiles are aligned to it, so
    a row's scores are byte-identical whatever the block boundaries.
    """
    if z_train.dim() != 3 or z_query.dim() != 3 or z_train.shape[2] != z_query.shape[2]:
        raise DataError(
            f"z-traces must be (rows, positions, S) with one S, got {tuple(z_train.shape)} "
            f"and {tuple(z_query.shape)}"
        )
    n, k, s = z_train.shape
    m, kq, _ = z_query.shape
    queries = z_query.reshape(m * kq, s).T.contiguous()
    out = torch.empty((n, m, k, kq), dtype=z_train.dtype, device=z_train.device)
    for lo, hi, pad in _tiles(n, first_index):
        tile = _padded(z_train, lo, hi, pad).reshape(TILE * k, s)
        scores = (tile @ queries).reshape(TILE, k, m, kq).permute(0, 2, 1, 3)
        out[lo:hi] = scores[pad : pad + hi - lo]
    return out


def _positions(samples: torch.Tensor, keep: bool) -> torch.Tensor:
    return samples if keep else samples.mean(dim=1, keepdim=True)


def compute_bif(
    train_traces: torch.Tensor,
    query_traces: torch.Tensor,
    *,
    method: Method = "sequence",
    reduce: ChainReduction = "stack",
    average_tokenwise: bool = False,
    covariance: bool = False,
) -> torch.Tensor:
    """BIF of N training examples on M queries from traces (C, D, N, K) and (C, D, M, K'),
    all in memory (the pipeline scores blocks with :func:`score_block` instead).

    Returns (N, M) for "sequence" and averaged "token", (N, M, K, K') for "token", and
    (N, M, K') for "query" (see the module docstring), float32.
    """
    if train_traces.shape[:2] != query_traces.shape[:2]:
        raise DataError(
            f"train traces cover (chains, draws) = {tuple(train_traces.shape[:2])}, query "
            f"traces {tuple(query_traces.shape[:2])}: record both at the same draws"
        )
    if method not in ("sequence", "token", "query"):
        raise ConfigError(f"bif.method must be 'sequence', 'token' or 'query', got {method!r}")
    train = _positions(chain_samples(train_traces, reduce), method == "token")
    query = _positions(chain_samples(query_traces, reduce), method != "sequence")
    if method == "token" and train.shape[1] != query.shape[1]:
        raise DataError(
            f"token BIF pairs positions: train traces have {train.shape[1]}, query traces "
            f"{query.shape[1]}; pad both to one length"
        )
    z_train = standardize(train, covariance=covariance)
    z_query = standardize(query, covariance=covariance)
    if method == "token" and average_tokenwise:
        # The mean of the (t, u) correlations is the dot product of the mean z-traces.
        z_train = z_train.mean(dim=1, keepdim=True)
        z_query = z_query.mean(dim=1, keepdim=True)
    scores = score_block(z_train, z_query)
    if method == "token" and not average_tokenwise:
        return scores
    if method == "query":
        return scores[:, :, 0, :]
    return scores[:, :, 0, 0]
