"""Scoring one block against the query set: from train sketches to a score shard.

The workers call this as they sketch (when the query sketches exist), ``sdi-score`` on
stored train sketches, and the merge for blocks nobody scored. A :class:`BlockScorer`
takes the block's train sketches checkpoint by checkpoint, contracts each with that
checkpoint's query sketches on the job's device (``sum_k eta_k T_k Q_k``, in checkpoint
order, the values as stored in ``sketch.dtype``, so a block scored from memory and one
scored from its unit files are the same numbers), and :meth:`BlockScorer.finish` gives the
shard's contents (:mod:`sdi_pipeline.formats.shards`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdi_pipeline.errors import ConfigError, DataError, RunDirError
from sdi_pipeline.files.digests import record_digest
from sdi_pipeline.formats.shards import SHARD_FORMAT_VERSION, BlockScores, read_shard_meta
from sdi_pipeline.formats.sketches import (
    SketchFile,
    UnitReader,
    describe_mismatch,
)
from sdi_pipeline.jobs import scores
from sdi_pipeline.run.freshness import MISSING, explain_stale
from sdi_pipeline.run.rundir import Block, Unit


@dataclass(frozen=True)
class ScoringPlan:
    """What every shard of a run keeps, decided once from the config and the sizes."""

    topk: int
    sdi: bool  # the SDI rows (below merge.sdi_max_gb for the whole run)
    step_matrix: bool
    sdi_tokens: bool  # the per-token SDI rows (queries with per-token sketches only)

    def to_dict(self) -> dict[str, Any]:
        return {
            "topk": self.topk,
            "sdi": self.sdi,
            "step_matrix": self.step_matrix,
            "sdi_tokens": self.sdi_tokens,
        }


@dataclass
class QuerySet:
    """The query files of every checkpoint, read and verified, ready to contract."""

    files: list[SketchFile]
    flat: list[torch.Tensor]  # per checkpoint (m, M*S_q) on the job's device
    token_flat: list[torch.Tensor] | None  # per checkpoint (m, M*S_q*P)
    positions: np.ndarray | None  # (M, P) per-token loss positions

    @property
    def metas(self) -> list[dict[str, Any]]:
        return [q.meta for q in self.files]

    @property
    def digests(self) -> list[str]:
        """The query files' content digests: the identity of the query set."""
        return [str(q.meta.get("content_digest")) for q in self.files]

    @property
    def etas(self) -> list[float]:
        return [float(q.meta["checkpoint"]["eta"]) for q in self.files]

    @property
    def n_query(self) -> int:
        return int(self.files[0].sketch.shape[0])

    @property
    def n_slots(self) -> int:
        return int(self.files[0].sketch.shape[1])

    @property
    def n_tokens(self) -> int:
        return 0 if self.positions is None else int(self.positions.shape[1])


def query_set(files: list[SketchFile], device: torch.device) -> QuerySet:
    """The query files of every checkpoint (already read and verified), ready to contract."""
    flat = [scores.flat_queries(torch.from_numpy(q.sketch)).to(device) for q in files]
    if "token_sketch" not in files[0].extra:
        return QuerySet(files, flat, None, None)
    positions = files[0].extra["token_positions"]
    for k, q in enumerate(files):
        if "token_sketch" not in q.extra or not np.array_equal(
            q.extra["token_positions"], positions
        ):
            raise ConfigError(
                f"query/ckpt-{k:03d}.h5 has other per-token query sketches than "
                "query/ckpt-000.h5 (query_tokens='last' follows nonzero per-token losses, which "
                "changed between checkpoints): choose token positions, and rerun sdi-query"
            )
    token_flat = [
        scores.flat_queries(torch.from_numpy(q.extra["token_sketch"]).flatten(1, 2)).to(device)
        for q in files
    ]
    return QuerySet(files, flat, token_flat, positions)


def scoring_plan(cfg: Any, n_train: int, queries: QuerySet) -> ScoringPlan:
    """What the shards keep: full SDI (and per-token SDI) only below ``merge.sdi_max_gb``."""
    limit = float(cfg.merge.sdi_max_gb) * 2**30
    sdi_bytes = 4 * n_train * queries.n_query * queries.n_slots
    return ScoringPlan(
        topk=int(cfg.merge.topk),
        sdi=sdi_bytes <= limit,
        step_matrix=bool(cfg.merge.step_matrix),
        sdi_tokens=queries.positions is not None and sdi_bytes * queries.n_tokens <= limit,
    )


def shard_depends(
    block: Block, train: list[dict[str, Any]], queries: QuerySet, plan: ScoringPlan
) -> dict[str, Any]:
    """Everything a block's shard depends on: the depends record of each checkpoint's train
    unit (as a unit file would record it), the query files' digests, what is kept."""
    return {
        "format_version": SHARD_FORMAT_VERSION,
        "kind": "scores",
        "block": {"index": block.index, "start": block.start, "stop": block.stop},
        "train": train,
        "query": queries.digests,
        "scoring": plan.to_dict(),
    }


@dataclass
class Scoring:
    """A job's query set and what its shards keep."""

    queries: QuerySet
    plan: ScoringPlan

    def depends(self, block: Block, train: list[dict[str, Any]]) -> dict[str, Any]:
        return shard_depends(block, train, self.queries, self.plan)


def explain_shard(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """Why a shard's recorded depends differ from ``current`` (empty: they agree). Each
    checkpoint's train record is compared on the keys ``current`` has."""
    reasons = []
    if recorded.get("format_version") != current["format_version"]:
        reasons.append(
            f"it has score format {recorded.get('format_version')}, this sdi-pipeline writes "
            f"{current['format_version']}"
        )
    if recorded.get("block") != current["block"]:
        reasons.append(f"it holds block {recorded.get('block')}, not {current['block']}")
    then = recorded.get("train")
    then = then if isinstance(then, list) else []
    if len(then) != len(current["train"]):
        reasons.append(f"it was scored over {len(then)} checkpoints, not {len(current['train'])}")
    else:
        for k, (old, now) in enumerate(zip(then, current["train"], strict=True)):
            why = explain_stale(old if isinstance(old, Mapping) else {}, now)
            if why:
                reasons.append(f"checkpoint {k}: {why}")
    if recorded.get("query") != current["query"]:
        reasons.append("the query sketches changed since it was scored")
    if recorded.get("scoring") != current["scoring"]:
        reasons.append(f"what it keeps changed ({recorded.get('scoring')} → {current['scoring']})")
    return "; ".join(reasons)


def shard_problem(
    path: Path, depends: Mapping[str, Any], units: list[str | None] | None = None
) -> str:
    """Why the shard at ``path`` cannot be used for ``depends``: ``"missing"``, stale or
    damaged (its header is read); empty when it is current. With ``units`` (the stored
    units' content digests, by checkpoint) it must also have been scored from them."""
    if not path.exists():
        return MISSING
    try:
        meta = read_shard_meta(path)
    except RunDirError as err:
        return getattr(err, "what", str(err))
    recorded = meta.get("depends")
    if not isinstance(recorded, Mapping):
        return f"{path} records no dependencies"
    why = explain_shard(recorded, depends)
    if not why and meta.get("content_digest") != record_digest(recorded):
        why = f"{path} is not the file its record describes (its content digest differs)"
    if not why and units is not None and [record_digest(r) for r in recorded["train"]] != units:
        why = "its train sketches were recomputed since it was scored"
    return why


def as_stored(values: torch.Tensor, dtype: str) -> torch.Tensor:
    """``values`` rounded to the stored ``sketch.dtype`` and back to float32: what a unit
    file would give, so scoring from memory equals scoring from the file."""
    stored = getattr(torch, dtype)
    return values if stored == torch.float32 else values.to(stored).float()


def add_stored(scorer: BlockScorer, run: Any, unit: Unit, reader: UnitReader) -> None:
    """Read unit ``unit``'s stored train sketches (checksums, finite values) into ``scorer``.
    A damaged file raises :class:`~sdi_pipeline.formats.sketches.CorruptFile` naming it."""
    values, loss, attrs = reader.read(run.unit_path(unit))
    scorer.add(unit, torch.from_numpy(values), loss, attrs, run.read_marker(unit.name) or {})


class BlockScorer:
    """Accumulates one block's contractions over checkpoints; :meth:`finish` scores it."""

    def __init__(
        self, block: Block, queries: QuerySet, plan: ScoringPlan, device: torch.device
    ) -> None:
        self.block, self.queries, self.plan, self.device = block, queries, plan, device
        n = block.stop - block.start
        width = queries.n_query * queries.n_slots
        self.sdi = torch.zeros(n, width, device=device)
        self.matrix: torch.Tensor | None = None  # (n, S_tr, M*S_q), once S_tr is known
        self.tokens = (
            None
            if queries.token_flat is None
            else torch.zeros(n, width * queries.n_tokens, device=device)
        )
        n_ckpt = len(queries.files)
        self.loss = np.zeros((n_ckpt, n), dtype=np.float32)
        self.norms: torch.Tensor | None = None  # (K, S_tr) float64, per-step sketches only
        self.added: list[int] = []
        self.train_layout: dict[str, Any] | None = None
        self.unit_stats: list[dict[str, Any]] = []

    def add(
        self,
        unit: Unit,
        values: torch.Tensor,
        loss: np.ndarray,
        unit_meta: dict[str, Any],
        stats: dict[str, Any],
        norms: torch.Tensor | None = None,
    ) -> None:
        """Contract unit ``unit``'s train sketches (n, S_tr, m) or (n, m), as stored (float32),
        with its checkpoint's queries. Checkpoints must come in order 0, 1, ..., K-1.

        ``norms`` (n, S_tr): ``torch.linalg.vector_norm(values, dim=2)`` if already at hand
        (the featurizer's finite check computes it), sparing a pass over the sketches."""
        k = unit.ckpt
        if k != len(self.added):
            raise RuntimeError(f"checkpoint {k} of block {self.block.index} came out of order")
        query_meta = self.queries.metas[k]
        diffs = describe_mismatch(unit_meta, query_meta)
        if diffs:
            raise RunDirError(
                f"the train sketches of {unit.name} do not match query/ckpt-{k:03d}.h5: "
                f"{'; '.join(diffs)}. Run the same command again (sdi-query recomputes a stale "
                "query file; delete the unit and its completion marker if it persists)"
            )
        eta = self.queries.etas[k]
        v = values.to(self.device, torch.float32)
        scores.add_sdi(self.sdi, v, self.queries.flat[k], eta)
        if self.plan.step_matrix:  # the config refuses it with summed train sketches
            if self.matrix is None:
                shape = (v.shape[0], v.shape[1], self.sdi.shape[1])
                self.matrix = torch.zeros(shape, device=v.device)
            scores.add_step_matrix(self.matrix, v, self.queries.flat[k], eta)
        if self.tokens is not None and self.queries.token_flat is not None:
            scores.add_sdi(self.tokens, v, self.queries.token_flat[k], eta)
        if v.dim() == 3:
            if self.norms is None:
                self.norms = torch.zeros(len(self.queries.files), v.shape[1], dtype=torch.float64)
            per_example = torch.linalg.vector_norm(v, dim=2) if norms is None else norms
            if per_example.shape != v.shape[:2]:
                raise RuntimeError(
                    f"norms {tuple(per_example.shape)} for sketches {tuple(v.shape)}"
                )
            self.norms[k] = per_example.sum(dim=0).double().cpu()
        self.loss[k] = np.asarray(loss, dtype=np.float32)
        self.train_layout = unit_meta.get("layout")
        self.added.append(k)
        self.unit_stats.append(stats)

    def finish(self, meta: dict[str, Any]) -> BlockScores:
        """The shard's contents: rows, the block's top-k, its sums; ``meta`` its attributes."""
        if len(self.added) != len(self.queries.files):
            raise RuntimeError(f"block {self.block.index} has {len(self.added)} checkpoints")
        q = self.queries
        start = self.block.start
        sdi3 = self.sdi.reshape(-1, q.n_query, q.n_slots).cpu()
        if not torch.isfinite(sdi3).all():
            raise DataError(
                f"training examples {start}..{self.block.stop - 1} score NaN or inf against the "
                "queries (their sketches overflow float32): check the losses and checkpoints"
            )
        totals = scores.ScoreTotals(q.n_query, q.n_slots, self.plan.topk)
        tracin = totals.update(sdi3, start)
        rows: dict[str, np.ndarray] = {"tracin": tracin.numpy()}
        if self.plan.sdi:
            rows["sdi"] = sdi3.numpy()
        if self.matrix is not None:
            rows["sdi_matrix"] = (
                scores.step_matrix_layout(self.matrix.cpu(), q.n_query, q.n_slots)
                .contiguous()
                .numpy()
            )
        topk = {
            f"{scope}/{sign}": (top.indices.numpy(), top.scores.float().numpy())
            for (scope, sign), top in totals.tops.items()
        }
        sums = {"energy": totals.energy.numpy(), "signed": totals.signed.numpy()}
        if self.norms is not None:
            sums["train_sketch_norm"] = self.norms.numpy()
        if self.tokens is not None:
            per_token = self.tokens.cpu().reshape(-1, q.n_query, q.n_slots * q.n_tokens)
            token_totals = scores.ScoreTotals(
                q.n_query, q.n_slots * q.n_tokens, self.plan.topk, overall=False
            )
            token_totals.update(per_token, start)
            for (_scope, sign), top in token_totals.tops.items():
                topk[f"per_token/{sign}"] = (top.indices.numpy(), top.scores.float().numpy())
            sums["token_energy"] = token_totals.energy.numpy()
            sums["token_signed"] = token_totals.signed.numpy()
            if self.plan.sdi_tokens:
                rows["sdi_tokens"] = per_token.reshape(-1, q.n_query, q.n_slots, q.n_tokens).numpy()
        meta = meta | {"units": self.unit_stats, "train_layout": self.train_layout}
        return BlockScores(rows, self.loss, topk, sums, meta)
