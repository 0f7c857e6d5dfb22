"""In-memory BIF across checkpoints, in one process: the reference the pipeline's
``method=bif`` results are checked against, and the form for notebooks and small data.

It runs the same chains (:func:`sdi_pipeline.engine.sgld.run_chain`), records the training
examples in the same blocks and batches, and scores with the same functions as the
workers, so its numbers equal the pipeline's bit for bit on one device type.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, default_collate

from sdi_pipeline.engine.sgld import (
    LossFn,
    LossRecorder,
    SGLDConfig,
    initial_loss,
    loop_step_losses,
    run_chain,
)
from sdi_pipeline.errors import CheckpointError, ConfigError
from sdi_pipeline.inputs.checkpoints import CheckpointSpec, load_checkpoint, load_into, resolve_eta
from sdi_pipeline.jobs.bif_context import bif_settings, query_traces, score_traces


@dataclass
class BifAttribution:
    """BIF of N training examples on M queries (see README, "BIF").

    ``bif`` (N, M) is Σ_k η_k·BIF_k; ``bif_checkpoints`` (N, K, M) each checkpoint's BIF;
    ``bif_query_tokens`` (N, M, T), ``bif_loop_steps`` (N, M, τ) and ``bif_token_pairs``
    (N, M, T, T) where asked for (η-weighted sums too). ``llc`` (K, C) is the LLC estimate
    of every chain at every checkpoint, ``step_losses`` (K, C, steps) what it is from.
    """

    bif: np.ndarray
    bif_checkpoints: np.ndarray
    etas: list[float]
    llc: np.ndarray
    init_loss: np.ndarray
    step_losses: np.ndarray
    views: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def bif_query_tokens(self) -> np.ndarray | None:
        return self.views.get("bif_query_tokens")

    @property
    def bif_loop_steps(self) -> np.ndarray | None:
        return self.views.get("bif_loop_steps")

    @property
    def bif_token_pairs(self) -> np.ndarray | None:
        return self.views.get("bif_token_pairs")


def _batches(dataset: Any, start: int, stop: int, batch_size: int, collate: Any) -> list[Any]:
    loader = DataLoader(
        Subset(dataset, range(start, stop)), batch_size=batch_size, collate_fn=collate
    )
    return list(loader)


def attribute_bif(
    model: nn.Module,
    checkpoints: Sequence[CheckpointSpec | str | Path],
    train: Any,
    query: Any,
    loss_fn: LossFn,
    sgld: SGLDConfig,
    *,
    collate: Callable[[list[Any]], Any] | None = None,
    batch_size: int = 32,
    block_size: int = 256,
    loop_trace: Callable[[nn.Module, Any], Any] | None = None,
    correlation: str = "sequence",
    chain_reduction: str = "stack",
    covariance: bool = False,
    query_tokens: bool = True,
    trust_checkpoints: bool = False,
    threads: int | None = 1,
) -> BifAttribution:
    """BIF of the examples of ``train`` on those of ``query`` (map-style datasets).

    At each checkpoint (loaded into ``model``; η from the spec or the checkpoint) the
    ``sgld.num_chains`` chains sample over ``train`` (minibatches of ``sgld.batch_size``;
    ``loss_fn(model, batch)`` (B,) or (B, T), whose mean is the SGLD objective), and every
    draw records the losses of all training examples and queries. ``batch_size`` and
    ``block_size`` are the pipeline's ``data.batch_size`` and ``data.block_size``: the
    recording batches, kept the same so that the numbers are the pipeline's exactly.
    ``loop_trace`` (``analysis.loop_trace``) adds the BIF per loop step of the queries'
    readout; ``correlation="token"`` the token pairs; the rest as the ``bif`` config keys.
    ``threads`` (torch threads while it runs; None: as set) is ``bif.threads``: CPU results
    depend on the thread count, so the pipeline's numbers are reproduced at its count.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _attribute_bif(
            model, checkpoints, train, query, loss_fn, sgld, collate, batch_size, block_size,
            loop_trace, correlation, chain_reduction, covariance, query_tokens, trust_checkpoints,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous)


def _attribute_bif(
    model: nn.Module,
    checkpoints: Sequence[CheckpointSpec | str | Path],
    train: Any,
    query: Any,
    loss_fn: LossFn,
    sgld: SGLDConfig,
    collate: Callable[[list[Any]], Any] | None,
    batch_size: int,
    block_size: int,
    loop_trace: Callable[[nn.Module, Any], Any] | None,
    correlation: str,
    chain_reduction: str,
    covariance: bool,
    query_tokens: bool,
    trust_checkpoints: bool,
) -> BifAttribution:
    if correlation not in ("sequence", "token") or chain_reduction not in ("stack", "mean"):
        raise ConfigError(
            f"correlation must be sequence or token and chain_reduction stack or mean, got "
            f"{correlation!r} and {chain_reduction!r}"
        )
    specs = [c if isinstance(c, CheckpointSpec) else CheckpointSpec(c) for c in checkpoints]
    if not specs:
        raise CheckpointError("no checkpoints given")
    sgld.check()
    collate_fn = collate or default_collate
    settings = bif_settings(correlation, chain_reduction, covariance, query_tokens, 1)
    n = len(train)
    blocks = [(s, min(n, s + block_size)) for s in range(0, n, block_size)]
    query_batches = _batches(query, 0, len(query), batch_size, collate_fn)
    loop_fn = None if loop_trace is None else loop_step_losses(loop_trace)
    etas, llcs, inits, losses = [], [], [], []
    train_traces, queries = [], []
    for ck in specs:
        data = load_checkpoint(ck.path, trust=trust_checkpoints)
        load_into(model, data, ck.path, trust=trust_checkpoints)
        eta = resolve_eta(ck, data)
        etas.append(eta)
        init = initial_loss(model, train, loss_fn, sgld, collate_fn)
        c, d = sgld.num_chains, sgld.num_draws
        block_rec = [
            LossRecorder(_batches(train, s, e, batch_size, collate_fn), loss_fn, c, d)
            for s, e in blocks
        ]
        query_rec = {"loss": LossRecorder(query_batches, loss_fn, c, d)}
        if loop_fn is not None:
            query_rec["loop"] = LossRecorder(query_batches, loop_fn, c, d)
        step_losses = []
        recorders = [*block_rec, *query_rec.values()]
        for chain in range(c):

            def on_draw(
                draw: int, sampled: nn.Module, chain: int = chain, recorders: Any = recorders
            ) -> None:
                for recorder in recorders:
                    recorder.record(chain, draw, sampled)

            stats = run_chain(
                model, train, loss_fn, sgld, chain, on_draw, init_loss=init, collate=collate_fn
            )
            step_losses.append(stats.step_losses)
        chain_losses = torch.stack(step_losses)
        llcs.append((sgld.n_beta * (chain_losses.mean(dim=1) - init)).numpy())
        inits.append(init)
        losses.append(chain_losses.numpy())
        train_traces.append([r.traces for r in block_rec])
        loop = query_rec["loop"].traces if "loop" in query_rec else None
        assert query_rec["loss"].traces is not None
        queries.append(query_traces(query_rec["loss"].traces, loop, eta, "", settings))
    rows: dict[str, list[np.ndarray]] = {}
    for b, (start, _stop) in enumerate(blocks):
        per_ckpt = [traces[b] for traces in train_traces]
        for name, values in score_traces(per_ckpt, queries, settings, start).items():
            rows.setdefault(name, []).append(values)
    out = {name: np.concatenate(parts) for name, parts in rows.items()}
    views = {k: v for k, v in out.items() if k not in ("bif", "bif_checkpoints")}
    return BifAttribution(
        out["bif"],
        out["bif_checkpoints"],
        etas,
        np.stack(llcs),
        np.array(inits),
        np.stack(losses),
        views,
    )


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`attribute_bif` (as :mod:`sdi_pipeline.attribute` is:
    once imported, the package attribute of that name is the module)."""

    def __call__(self, *args: Any, **kwargs: Any) -> BifAttribution:
        return attribute_bif(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
