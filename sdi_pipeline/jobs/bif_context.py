"""What the BIF jobs share: the SGLD settings of a config, the chains' record, units and
their freshness, and scoring a block's traces against the query traces.

A BIF run's work: the query job runs every chain once per checkpoint and records the
queries' loss traces (``query/bif-ckpt-KKK.h5``); a unit is one (checkpoint, chain) replayed
by a worker on one block of training examples, recording the block's losses at every draw
(``units/bif-...h5`` + completion marker); once a block's units are all there it is scored
(standardised traces, one GEMM per tile: :mod:`sdi_pipeline.engine.bif`) into
``scores/bif-block-BBBBB.h5``; the merge folds the shards. Chains are replayed, not stored:
a chain is a pure function of (seed, chain) and its checkpoint, and each replay's minibatch
losses are compared bit for bit with the query job's, so a replay that differs (another
device type, non-deterministic kernels, changed data) is refused, never scored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset, default_collate

from sdi_pipeline.engine.bif import chain_samples, score_block, standardize
from sdi_pipeline.engine.sgld import (
    ChainStats,
    DrawFn,
    LossRecorder,
    RecordFn,
    SGLDConfig,
    loop_step_losses,
    run_chain,
)
from sdi_pipeline.errors import DataError, RunDirError, SDIError
from sdi_pipeline.files.digests import record_digest
from sdi_pipeline.formats.traces import BIF_FORMAT_VERSION, BifFile, read_bif_meta
from sdi_pipeline.inputs import build
from sdi_pipeline.jobs.context import JobContext
from sdi_pipeline.jobs.scores import RunningTopK
from sdi_pipeline.run.freshness import explain_stale
from sdi_pipeline.run.layout import bif_unit_name
from sdi_pipeline.run.rundir import Block, RunDir

SIGNS = ("positive", "negative")


def sgld_config(cfg: DictConfig) -> SGLDConfig:
    """The sampler settings of ``cfg.bif`` (nβ null: devinterp's B / log B)."""
    b = cfg.bif
    batch = int(b.batch_size)
    n_beta = float(b.n_beta) if b.n_beta is not None else batch / math.log(max(batch, 2))
    return SGLDConfig(
        lr=float(b.lr),
        n_beta=n_beta,
        num_chains=int(b.chains),
        num_draws=int(b.draws),
        batch_size=batch,
        num_burnin_steps=int(b.burnin),
        num_steps_bw_draws=int(b.steps_bw_draws),
        localization=float(b.localization),
        noise_level=float(b.noise_level),
        llc_weight_decay=float(b.weight_decay),
        bounding_box_size=None if b.bounding_box_size is None else float(b.bounding_box_size),
        seed=int(b.seed),
        num_init_loss_batches=int(b.init_loss_batches),
    )


@dataclass(frozen=True)
class BifUnit:
    """Chain ``chain`` at checkpoint ``ckpt``, recorded on training block ``block``."""

    ckpt: int
    chain: int
    block: Block

    @property
    def name(self) -> str:
        return bif_unit_name(self.ckpt, self.chain, self.block.index)


def block_units(block: Block, n_ckpt: int, n_chains: int) -> list[BifUnit]:
    """A block's units, checkpoint-major."""
    return [BifUnit(k, c, block) for k in range(n_ckpt) for c in range(n_chains)]


class BifJob:
    """A JobContext with what the BIF jobs add: SGLD settings, chains, recorders."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        # One thread count in every job: CPU kernels sum in an order that depends on it, and
        # a worker's replay must reproduce the query job's chain to the bit.
        torch.set_num_threads(int(ctx.cfg.bif.threads))
        self.sgld = sgld_config(ctx.cfg)
        self.sgld.check()
        self.collate = ctx._collate or default_collate

    def batches(self, dataset: Any, start: int, stop: int) -> list[Any]:
        """Examples [start, stop) of ``dataset`` as data.batch_size batches (on the CPU)."""
        loader = DataLoader(
            Subset(dataset, range(start, stop)),
            batch_size=int(self.cfg.data.batch_size),
            shuffle=False,
            collate_fn=self.collate,
        )
        return list(loader)

    def loop_fn(self) -> RecordFn | None:
        """The per-loop-step losses of the queries (analysis.loop_trace), or None."""
        trace = self.ctx.loop_trace
        if trace is None:
            return None
        device = self.ctx.device
        return loop_step_losses(lambda model, batch: trace(model, build.to_device(batch, device)))

    def run_chain(self, train: Any, chain: int, on_draw: DrawFn, init_loss: float) -> ChainStats:
        """Chain ``chain`` around the loaded checkpoint, over the whole training set."""
        return run_chain(
            self.ctx.model,
            train,
            self.ctx.loss,
            self.sgld,
            chain,
            on_draw,
            init_loss=init_loss,
            collate=self.collate,
        )

    def record_chain(
        self, train: Any, chain: int, recorders: Mapping[str, LossRecorder], init_loss: float
    ) -> ChainStats:
        """Run chain ``chain``, recording with each recorder (made for one chain) at every
        draw."""

        def on_draw(draw: int, model: torch.nn.Module) -> None:
            for recorder in recorders.values():
                recorder.record(0, draw, model)

        return self.run_chain(train, chain, on_draw, init_loss)

    def chain_record(self, checkpoint_sha: str, train_sha: str) -> dict[str, Any]:
        """What a chain is a function of: its checkpoint, the training set and the sampler."""
        return {
            "checkpoint_sha256": checkpoint_sha,
            "train_sha256": train_sha,
            "sgld": asdict(self.sgld),
        }

    def settings(self) -> dict[str, Any]:
        """The scoring settings a shard records."""
        b = self.cfg.bif
        return bif_settings(
            str(b.correlation),
            str(b.chain_reduction),
            bool(b.covariance),
            bool(b.query_tokens),
            int(self.cfg.merge.topk),
        )


def unit_depends(query_meta: Mapping[str, Any], unit: BifUnit, data_sha: str) -> dict[str, Any]:
    """What a unit's traces depend on: the chain (through the query file's record of it,
    not the queries), the chain index and the block's examples."""
    chain = query_meta["depends"]["chain"]
    return {
        "format_version": BIF_FORMAT_VERSION,
        "kind": "bif-train",
        "chain_digest": record_digest(chain),
        "chain": unit.chain,
        "data_sha256": data_sha,
        "block": {"index": unit.block.index, "start": unit.block.start, "stop": unit.block.stop},
    }


def unit_problem(run: RunDir, name: str, current: Mapping[str, Any]) -> str:
    """Why unit ``name`` is not done and current ("" when it is): its marker, its file's
    size and content digest against the marker, its recorded depends against ``current``."""
    try:
        marker = run.read_marker(name)
    except RunDirError as err:
        return str(err)
    path = run.unit_path_named(name)
    if marker is None:
        return "missing"
    if not path.exists():
        return f"{path} is missing (its marker is there)"
    size = path.stat().st_size
    if marker.get("file_size") != size:
        return f"{path} has {size} bytes, its marker says {marker.get('file_size')} (truncated)"
    try:
        meta = read_bif_meta(path, "bif-train")
    except SDIError as err:
        return str(err)
    if meta.get("content_digest") != marker.get("content_digest"):
        return f"{path} is not the file its marker describes"
    recorded = meta.get("depends")
    return explain_stale(recorded if isinstance(recorded, Mapping) else {}, current)


@dataclass
class QueryTraces:
    """One checkpoint's query traces, standardised once for every block scored against them."""

    eta: float
    digest: str
    z_sequence: torch.Tensor  # (M, 1, S): the traces averaged over positions
    z_tokens: torch.Tensor | None  # (M, T, S) per query token, when kept
    z_loop: torch.Tensor | None  # (M, τ, S) per loop step, with analysis.loop_trace


def query_traces(
    loss: torch.Tensor,
    loop: torch.Tensor | None,
    eta: float,
    digest: str,
    settings: Mapping[str, Any],
) -> QueryTraces:
    """Standardise query traces (C, D, M, K) (and per loop step (C, D, M, τ)) as
    ``settings`` ask; a query file's ``digest`` names them."""
    reduce, cov = settings["chain_reduction"], settings["covariance"]
    samples = chain_samples(loss, reduce)
    z_seq = standardize(samples.mean(dim=1, keepdim=True), covariance=cov)
    pairs = settings["correlation"] == "token"
    per_token = samples.shape[1] > 1 and (settings["query_tokens"] or pairs)
    z_tokens = standardize(samples, covariance=cov) if per_token else None
    z_loop = None
    if loop is not None:
        z_loop = standardize(chain_samples(loop, reduce), covariance=cov)
    return QueryTraces(eta, digest, z_seq, z_tokens, z_loop)


def file_query_traces(file: BifFile, settings: Mapping[str, Any]) -> QueryTraces:
    """:func:`query_traces` of a ``bif-query`` file."""
    loop = file.arrays.get("traces/loop")
    return query_traces(
        torch.from_numpy(file.arrays["traces/loss"]),
        None if loop is None else torch.from_numpy(loop),
        float(file.meta["eta"]),
        str(file.meta["content_digest"]),
        settings,
    )


def bif_settings(
    correlation: str, chain_reduction: str, covariance: bool, query_tokens: bool, topk: int
) -> dict[str, Any]:
    """The scoring settings, as shards record them."""
    return {
        "correlation": correlation,
        "chain_reduction": chain_reduction,
        "covariance": covariance,
        "query_tokens": query_tokens,
        "topk": topk,
    }


def score_traces(
    train: Sequence[torch.Tensor],
    queries: Sequence[QueryTraces],
    settings: Mapping[str, Any],
    first_index: int,
) -> dict[str, np.ndarray]:
    """A block's BIF rows from its traces at each checkpoint, ``train[k]`` (C, D, n, K).

    ``bif_checkpoints`` (n, K, M) per checkpoint; ``bif`` (n, M) and the per-token,
    per-loop-step and token-pair views summed over checkpoints with η, accumulated in
    float64 in checkpoint order (elementwise, so byte-identical whatever the blocks).
    """
    reduce, cov = settings["chain_reduction"], settings["covariance"]
    pairs = settings["correlation"] == "token"
    per_ckpt = []
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, values: torch.Tensor, eta: float) -> None:
        term = values.double() * eta
        sums[name] = term if name not in sums else sums[name] + term

    for traces, q in zip(train, queries, strict=True):
        samples = chain_samples(traces, reduce)  # (n, K, S)
        z_mean = standardize(
            samples.mean(dim=1, keepdim=True), covariance=cov, first_index=first_index
        )
        seq = score_block(z_mean, q.z_sequence, first_index=first_index)[:, :, 0, 0]
        per_ckpt.append(seq)
        add("bif", seq, q.eta)
        if q.z_tokens is not None and settings["query_tokens"]:
            add(
                "bif_query_tokens",
                score_block(z_mean, q.z_tokens, first_index=first_index)[:, :, 0, :],
                q.eta,
            )
        if q.z_loop is not None:
            add(
                "bif_loop_steps",
                score_block(z_mean, q.z_loop, first_index=first_index)[:, :, 0, :],
                q.eta,
            )
        if pairs:
            if q.z_tokens is None or q.z_tokens.shape[1] != samples.shape[1]:
                raise DataError(
                    "bif.correlation=token pairs train and query tokens: the loss must be per "
                    f"token (B, T) with one T on both sides, got train traces with "
                    f"{samples.shape[1]} positions and query traces with "
                    f"{1 if q.z_tokens is None else q.z_tokens.shape[1]}"
                )
            z_full = standardize(samples, covariance=cov, first_index=first_index)
            add("bif_token_pairs", score_block(z_full, q.z_tokens, first_index=first_index), q.eta)
    rows = {name: values.float().numpy() for name, values in sums.items()}
    rows["bif_checkpoints"] = torch.stack(per_ckpt, dim=1).numpy()
    return rows


def block_topk(bif: np.ndarray, first_index: int, k: int) -> dict[str, np.ndarray]:
    """A block's top-k per query by BIF, ``topk/<sign>/{indices,scores}`` (M, k)."""
    out = {}
    for sign in SIGNS:
        top = RunningTopK((bif.shape[1],), k, sign)  # type: ignore[arg-type]
        top.update(torch.from_numpy(bif), first_index)
        result = top.result()
        out[f"topk/{sign}/indices"] = result.indices.numpy()
        out[f"topk/{sign}/scores"] = result.scores.float().numpy()
    return out
