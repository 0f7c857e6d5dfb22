"""The merge: validate the run, then reduce the blocks' score shards into results.h5.

Validation comes first and reports every problem at once, in one line: missing or
unreadable query files, missing units (by name, and who is computing them if anyone),
stale units and query files (their recorded checkpoint sha256, examples' digest, spec,
targets or format differ from the current ones), damaged completion markers, units whose
sketch spec / parameters / checkpoint / step layout differ from the query file's, indices
covered twice or not at all. Nothing is computed until the run is complete and consistent;
the merge waits for nothing.

The workers score each block as they sketch it (:mod:`sdi_pipeline.jobs.scoring`): a block's
shard holds its rows of TracIn / SDI, its own top-k per query and its float64 sums. The merge
is a reduce: it checks every shard is current (a block without one, or with a stale one, is
scored here from its stored train sketches; without stored sketches the merge refuses),
folds the shards' top-k and sums, and writes results.h5 with the per-example datasets as HDF5
virtual datasets stitched from the shards -- never copied, never read. Its memory and the
bytes it reads per training example do not grow with N_train.

Stale or corrupt units lose their completion marker and corrupt shards are removed, so the
advice "run the same command again" recomputes exactly them. results.h5 is written under a
temporary name and renamed; it records the digests of everything it was made from.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdi_pipeline.engine.slots import SlotLayout
from sdi_pipeline.errors import MergeRefused, SDIError
from sdi_pipeline.files.atomic import clean_temp_files
from sdi_pipeline.files.digests import DigestCache, record_digest
from sdi_pipeline.formats.results import UNIT_STATS, check_free_space, write_results
from sdi_pipeline.formats.shards import ShardSummary, read_shard_summary, write_shard
from sdi_pipeline.formats.sketches import (
    FORMAT_VERSION,
    SketchFile,
    UnitReader,
    describe_mismatch,
    read_meta,
    read_sketch_file,
)
from sdi_pipeline.inputs import build
from sdi_pipeline.inputs.content import block_digest
from sdi_pipeline.jobs import scores
from sdi_pipeline.jobs.bif_merge import bif_merge
from sdi_pipeline.jobs.logs import log, setup_logging
from sdi_pipeline.jobs.scoring import (
    BlockScorer,
    QuerySet,
    Scoring,
    add_stored,
    query_set,
    scoring_plan,
    shard_problem,
)
from sdi_pipeline.messages import shortened
from sdi_pipeline.report.wandb_log import WandbLogger
from sdi_pipeline.run.config import config_hash, train_hash
from sdi_pipeline.run.freshness import (
    CORRUPT,
    DONE,
    MISSING,
    check_unit,
    explain_stale,
    record_data_files,
)
from sdi_pipeline.run.layout import block_name
from sdi_pipeline.run.leases import read_holder
from sdi_pipeline.run.rundir import Block, RunDir, Unit, run_blocks, run_units

RERUN = "run the same sdi-attribute command again (or the jobs by hand) to recompute them"
# Problems shown in the one-line refusal; all of them go to logs/merge.log.
SHOWN_PROBLEMS = 8


@dataclass
class _Plan:
    """What validation found: the query files, the checkpoints' and blocks' digests."""

    query_meta: list[dict[str, Any]]
    store_train: bool
    queries: list[SketchFile]
    checkpoint_sha: list[str]
    unit_digests: dict[str, str]
    block_digests: dict[int, str]
    train_template: dict[str, Any]  # the train depends all units share


def refuse(problems: list[str]) -> MergeRefused:
    """One line naming every problem (the first few; then all of them in the merge's log)."""
    shown = " | ".join(problems[:SHOWN_PROBLEMS])
    more = len(problems) - SHOWN_PROBLEMS
    if more > 0:
        for problem in problems:
            log.error("merge refused: %s", problem)
        shown += f" | ... and {more} more (see logs/merge.log)"
    return MergeRefused(f"the merge refuses this run: {shown}")


def _by_reason(entries: list[tuple[str, str]]) -> str:
    """``a, b (why); c (other why)``: units grouped by the reason they are listed for."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name, why in entries:
        groups[why].append(name)
    return "; ".join(f"{shortened(names, 4)} ({why})" for why, names in groups.items())


def current_depends(
    cfg: Any, kind: str, checkpoint_sha: str | None, data_sha: str
) -> dict[str, Any]:
    """The depends a file of ``kind`` would record now (all but the model's parameters,
    which the merge checks between units and query files instead)."""
    out: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "checkpoint_sha256": checkpoint_sha,
        "data_sha256": data_sha,
        "spec": {
            "m": int(cfg.sketch.m),
            "seed": int(cfg.sketch.seed),
            "kernel": str(cfg.sketch.kernel),
        },
        "targets": list(cfg.analysis.targets),
        "dtype": str(cfg.sketch.dtype),
    }
    if kind == "train":
        out |= {"train_hash": train_hash(cfg), "train_steps": str(cfg.sketch.train_steps)}
    else:
        out["config_hash"] = config_hash(cfg)
    return out


def _validate(run: RunDir, cfg: Any, train: Any, query: Any) -> _Plan:
    n_train = len(train)
    n_ckpt = len(cfg.checkpoints.paths)
    units = run_units(cfg, n_train)
    digest = config_hash(cfg)
    problems: list[str] = []
    cache = DigestCache(run.digest_cache_path)
    shas: list[str | None] = []
    for k, path in enumerate(cfg.checkpoints.paths):
        try:
            shas.append(cache.sha256(path))
        except OSError:
            shas.append(None)
            problems.append(f"checkpoint {k} ({path}) is missing or unreadable: restore it")
    log.info(
        "hashing the examples (%d training, %d queries) to check the sketches are current",
        n_train,
        len(query),
    )
    query_sha = block_digest(query, 0, len(query), "query")

    query_meta: list[dict[str, Any]] = []
    queries: list[SketchFile] = []
    for k in range(n_ckpt):
        path = run.query_path(k)
        meta: dict[str, Any] = {}
        if not path.exists():
            problems.append(f"query sketches for checkpoint {k} missing ({path}): run sdi-query")
        else:
            try:
                sketches = read_sketch_file(path)  # all of it: checksums and values verified
                meta = sketches.meta
                queries.append(sketches)
            except SDIError as err:
                path.unlink(missing_ok=True)
                problems.append(
                    f"{getattr(err, 'what', err)}: removed; run sdi-query (or the same "
                    "sdi-attribute command) again to recompute it"
                )
        if meta and meta.get("config_hash") != digest:
            problems.append(
                f"{path} was made for config {meta.get('config_hash')}, not {digest}; "
                "rerun sdi-query"
            )
        elif meta:
            recorded = meta.get("depends") if isinstance(meta.get("depends"), dict) else {}
            why = explain_stale(recorded or {}, current_depends(cfg, "query", shas[k], query_sha))
            if why:
                problems.append(
                    f"{path} is stale ({why}): run sdi-query (or the same sdi-attribute "
                    "command) again to recompute it"
                )
        query_meta.append(meta)

    store_train = bool(cfg.sketch.store_train)
    # What every unit's depends share (hashing the config once, not per unit).
    template = current_depends(cfg, "train", None, "")
    blocks: dict[int, str] = {}
    missing: list[Unit] = []
    stale: list[tuple[str, str]] = []
    corrupt: list[tuple[str, str]] = []
    unit_digests: dict[str, str] = {}
    world_sizes: set[int] = set()
    # Without stored train sketches the shards are all there is: _shards checks them.
    for unit in units if store_train else []:
        if unit.block not in blocks:
            blocks[unit.block] = block_digest(train, unit.start, unit.stop)
        current = template | {
            "checkpoint_sha256": shas[unit.ckpt],
            "data_sha256": blocks[unit.block],
        }
        current["block"] = {"index": unit.block, "start": unit.start, "stop": unit.stop}
        check = check_unit(run, unit.name, current=current)
        if check.state == DONE:
            marker = run.read_marker(unit.name) or {}
            unit_digests[unit.name] = str(marker.get("content_digest"))
            if isinstance(marker.get("world_size"), int):
                world_sizes.add(marker["world_size"])
            continue
        if check.state == MISSING:
            missing.append(unit)
            continue
        (corrupt if check.state == CORRUPT else stale).append((unit.name, check.why))
        run.marker_path(unit).unlink(missing_ok=True)
    if missing:
        leased = []
        for unit in missing:
            holder = read_holder(run.lease_path(block_name(unit.block)))
            if holder is not None and holder.gone(float(cfg.runtime.lease_timeout_s)) is None:
                leased.append(f"{unit.name} by {holder.describe()}")
        busy = f" (being computed now: {shortened(leased, 3)})" if leased else ""
        mixed = ""
        if len(world_sizes) > 1:
            mixed = (
                f"; workers ran with world sizes {', '.join(map(str, sorted(world_sizes)))}: run "
                "every rank 0..W-1 of one world size W to cover all units"
            )
        problems.append(
            f"{len(missing)} of {len(units)} units not done: "
            f"{shortened(u.name for u in missing)}{busy}; run the workers{mixed}"
        )
    if stale:
        problems.append(f"stale units, markers removed: {_by_reason(stale)}; {RERUN}")
    if corrupt:
        problems.append(f"corrupt units, markers removed: {_by_reason(corrupt)}; {RERUN}")

    expected = {u.name: u for u in units}
    # (checkpoint, start, stop) of every unit file: overlaps are indices covered twice.
    spans: list[tuple[int, int, int]] = []
    reported = {name for name, _ in stale + corrupt}
    for path in sorted(run.units_dir.glob("*.h5")) if store_train else []:
        name = path.stem
        try:
            meta = read_meta(path)
        except SDIError as err:
            if name not in reported:
                problems.append(str(err))
            continue
        block, ckpt = meta.get("block", {}), meta.get("checkpoint", {}).get("index")
        if isinstance(ckpt, int) and 0 <= ckpt < n_ckpt and block:
            spans.append((ckpt, int(block["start"]), int(block["stop"])))
        if meta.get("n") != block.get("stop", 0) - block.get("start", 0):
            problems.append(f"{path.name} holds {meta.get('n')} rows for block {block}")
        unit = expected.get(name)
        if unit is None:
            problems.append(
                f"unit file {path.name} is not a unit of this run (block_size "
                f"{cfg.data.block_size}, {n_train} examples): remove it"
            )
            continue
        if query_meta[unit.ckpt]:
            diffs = describe_mismatch(meta, query_meta[unit.ckpt])
            if diffs:
                problems.append(
                    f"{path.name} does not match query/ckpt-{unit.ckpt:03d}.h5: "
                    f"{'; '.join(diffs)}. Delete the unit and its completion marker and run "
                    "the same command again"
                )
    twice, shown = _overlaps(spans)
    if twice:
        problems.append(
            f"{twice} training indices covered by more than one unit file ({', '.join(shown)})"
        )
    if problems:
        raise refuse(problems)
    return _Plan(
        query_meta, store_train, queries, [str(s) for s in shas], unit_digests, blocks, template
    )


def _overlaps(spans: list[tuple[int, int, int]]) -> tuple[int, list[str]]:
    """How many (checkpoint, index) pairs more than one span covers, and the first few
    overlaps -- in memory per unit file, not per training example."""
    count, shown = 0, []
    reach: dict[int, int] = {}  # per checkpoint: the furthest stop so far
    for ckpt, start, stop in sorted(spans):
        end = reach.get(ckpt, 0)
        if start < end:
            count += min(stop, end) - start
            if len(shown) < 5:
                shown.append(f"ckpt {ckpt} indices {start}..{min(stop, end) - 1}")
        reach[ckpt] = max(end, stop)
    return count, shown


def _loop_dynamics(queries: list[SketchFile]) -> tuple[np.ndarray, np.ndarray] | None:
    """The queries' loop traces of every checkpoint, stacked: states (K, M, τ, d) and
    margins (K, M, τ); None when the run has no analysis.loop_trace."""
    # The query files were validated to share the run's config hash, which names the trace.
    if "loop_margins" not in queries[0].extra:
        return None
    states = np.stack([q.extra["loop_states"] for q in queries])
    return states, np.stack([q.extra["loop_margins"] for q in queries])


def _train_depends(plan: _Plan, train: Any, block: Block) -> list[dict[str, Any]]:
    """Each checkpoint's train depends for ``block`` as the merge sees them (no parameters:
    the merge builds no model)."""
    if block.index not in plan.block_digests:  # hashed in validation with stored sketches
        plan.block_digests[block.index] = block_digest(train, block.start, block.stop)
    digest = plan.block_digests[block.index]
    out = []
    for unit in block.units:
        current = plan.train_template | {
            "checkpoint_sha256": plan.checkpoint_sha[unit.ckpt],
            "data_sha256": digest,
        }
        current["block"] = {"index": block.index, "start": block.start, "stop": block.stop}
        out.append(current)
    return out


def _shards(run: RunDir, plan: _Plan, train: Any, blocks: list[Block], scoring: Scoring) -> None:
    """Make sure every block has a current shard: score those without one from their stored
    train sketches, or refuse naming them when the train sketches are not stored."""
    todo: list[tuple[Block, list[dict[str, Any]], str]] = []
    for block in blocks:
        currents = _train_depends(plan, train, block)
        units = [plan.unit_digests.get(u.name) for u in block.units] if plan.store_train else None
        why = shard_problem(run.shard_path(block.index), scoring.depends(block, currents), units)
        if why:
            todo.append((block, currents, why))
    if not todo:
        return
    if not plan.store_train:
        raise refuse(
            [
                f"{len(todo)} of {len(blocks)} blocks not scored: "
                f"{_by_reason([(b.name, why) for b, _, why in todo])}; run the workers "
                "(sketch.store_train=false keeps no train sketches to score here)"
            ]
        )
    log.info(
        "scoring %d block(s) the workers did not (the query sketches were not ready, or the "
        "shard is stale): %s",
        len(todo), _by_reason([(b.name, why) for b, _, why in todo]),
    )  # fmt: skip
    reader = UnitReader()
    corrupt: list[tuple[str, str]] = []
    for block, _currents, _why in todo:
        scorer = BlockScorer(block, scoring.queries, scoring.plan, torch.device("cpu"))
        broken = False
        for unit in block.units:
            try:
                if broken:  # only read: every corrupt unit is named at once
                    reader.read(run.unit_path(unit))
                else:
                    add_stored(scorer, run, unit, reader)
            except SDIError as err:
                broken = True
                corrupt.append((unit.name, getattr(err, "what", str(err))))
                run.marker_path(unit).unlink(missing_ok=True)
        if broken:
            continue
        # The full depends, as the workers would record them, come from the units' files.
        full = [read_meta(run.unit_path(u))["depends"] for u in block.units]
        depends = scoring.depends(block, full)
        meta = {
            "block": depends["block"],
            "depends": depends,
            "content_digest": record_digest(depends),
            "rank": None,
            "world_size": None,
        }
        write_shard(run.shard_path(block.index), scorer.finish(meta))
    if corrupt:
        raise refuse([f"corrupt units, markers removed: {_by_reason(corrupt)}; {RERUN}"])


@dataclass
class _Reduced:
    """What the reduce folds from the shards."""

    totals: scores.ScoreTotals
    tokens: scores.ScoreTotals | None
    train_norm: np.ndarray  # (K, S_tr) float64
    unit_stats: list[dict[str, Any]]
    shard_digests: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    train_layout: SlotLayout


def _tops(summary: ShardSummary, scopes: tuple[str, ...], rename: str | None = None) -> Any:
    out = {}
    for scope in scopes:
        for sign in scores.SIGNS:
            idx, values = summary.topk[f"{scope}/{sign}"]
            out[(rename or scope, sign)] = (torch.from_numpy(idx), torch.from_numpy(values))
    return out


def _reduce(
    run: RunDir, blocks: list[Block], queries: QuerySet, k_top: int, n_ckpt: int
) -> _Reduced:
    """Fold every shard's top-k and sums (reading only those); a corrupt shard is removed
    and named."""
    totals = scores.ScoreTotals(queries.n_query, queries.n_slots, k_top)
    tokens = None
    if queries.positions is not None:
        tokens = scores.ScoreTotals(
            queries.n_query, queries.n_slots * queries.n_tokens, k_top, overall=False
        )
    norms: np.ndarray | None = None  # (K, S_tr) sums; absent with summed train sketches
    layout: dict[str, Any] = {}
    stats: list[dict[str, Any]] = []
    digests: dict[str, str] = {}
    corrupt: list[tuple[str, str]] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for block in blocks:
        path = run.shard_path(block.index)
        try:
            summary = read_shard_summary(path)
        except SDIError as err:
            corrupt.append((block.name, getattr(err, "what", str(err))))
            path.unlink(missing_ok=True)
            continue
        totals.absorb(
            _tops(summary, scores.SCOPES),
            torch.from_numpy(summary.sums["energy"]),
            torch.from_numpy(summary.sums["signed"]),
        )
        if tokens is not None:
            tokens.absorb(
                _tops(summary, ("per_token",), rename="per_step"),
                torch.from_numpy(summary.sums["token_energy"]),
                torch.from_numpy(summary.sums["token_signed"]),
            )
        if "train_sketch_norm" in summary.sums:
            part = summary.sums["train_sketch_norm"]
            norms = part.copy() if norms is None else norms + part
        layout = layout or summary.meta["train_layout"]
        stats.extend(summary.meta.get("units") or [{} for _ in block.units])
        digests[block.name] = str(summary.meta.get("content_digest"))
        # Per example: the shapes past the rows (past the checkpoints for train_loss).
        rest = {name: shape[1:] for name, shape in summary.shapes.items() if name != "train_loss"}
        if summary.shapes.get("train_loss", (0, 0))[0] != n_ckpt:
            corrupt.append((block.name, f"{path} holds losses of other checkpoints"))
        elif not shapes:
            shapes = rest
        elif rest != shapes:
            corrupt.append((block.name, f"{path} holds datasets of other shapes than the others"))
    if corrupt:
        raise refuse([f"corrupt score shards, removed: {_by_reason(corrupt)}; {RERUN}"])
    train_layout = SlotLayout.from_dict(layout)
    if norms is None:
        norms = np.zeros((n_ckpt, train_layout.n_slots), dtype=np.float64)
    return _Reduced(totals, tokens, norms, stats, digests, shapes, train_layout)


def _results_bytes(
    reduced: _Reduced, queries: QuerySet, dynamics: tuple[np.ndarray, ...] | None, n_blocks: int
) -> int:
    """About how large results.h5 will be, from what it will hold: top-k, diagnostics, loop
    dynamics, the per-unit table and the record of its inputs (its per-example datasets stay
    in the shards, a mapping per block). Doubled, plus 256 KiB, for HDF5's headers, chunk
    indexes and checksums."""
    arrays = 0
    for totals in (reduced.totals, reduced.tokens):
        if totals is None:
            continue
        for top in totals.tops.values():
            arrays += top.indices.numel() * 8 + top.scores.numel() * 4
        arrays += 2 * totals.energy.numel() * 8  # energy and signed share
    for q in queries.files:
        arrays += (q.sketch.size // max(1, q.sketch.shape[-1]) + q.loss.size) * 8
    arrays += reduced.train_norm.nbytes + sum(a.nbytes for a in dynamics or ())
    # Per unit: its stats and name, its digest in inputs; per block: a mapping for each
    # stitched dataset and its shard's digest.
    arrays += len(reduced.unit_stats) * 8 * (len(UNIT_STATS) + 16)
    arrays += n_blocks * (len(reduced.shapes) + 2) * 256
    return 2 * arrays + 256 * 2**10


def run_merge(run_dir: str | Path) -> int:
    """Validate the run, score any block nobody scored, reduce the shards into results.h5."""
    run = RunDir.existing(run_dir)
    setup_logging(run, "merge")
    removed = clean_temp_files(run.folders())
    if removed:
        log.info("removed %d temporary file(s) of killed writers", len(removed))
    cfg = run.load_config()
    if cfg.method == "bif":
        return bif_merge(run)
    # Before the data is read and hashed: a file changed during the merge shows as changed.
    data_files = record_data_files(cfg.data)
    train = build.build_dataset(cfg, "train")
    n_train = len(train)
    run.check_train_size(n_train)
    plan = _validate(run, cfg, train, build.build_dataset(cfg, "query"))
    started = time.perf_counter()
    queries = query_set(plan.queries, torch.device("cpu"))
    scoring = Scoring(queries, scoring_plan(cfg, n_train, queries))
    if not scoring.plan.sdi:
        log.warning(
            "the full SDI tensor would take %.2f GiB > merge.sdi_max_gb=%s: writing TracIn, top-k "
            "and diagnostics only (raise merge.sdi_max_gb to keep it)",
            4 * n_train * queries.n_query * queries.n_slots / 2**30, cfg.merge.sdi_max_gb,
        )  # fmt: skip
    blocks = run_blocks(cfg, n_train)
    _shards(run, plan, train, blocks, scoring)
    n_ckpt = len(queries.files)
    q_layout = SlotLayout.from_dict(plan.query_meta[0]["layout"])
    k_top = scoring.plan.topk
    reduced = _reduce(run, blocks, queries, k_top, n_ckpt)
    t_layout = reduced.train_layout
    dynamics = _loop_dynamics(queries.files)
    check_free_space(run.results_path, _results_bytes(reduced, queries, dynamics, len(blocks)))
    attrs = {
        "config_hash": config_hash(cfg),
        "n_train": n_train,
        "etas": queries.etas,
        "checkpoints": list(cfg.checkpoints.paths),
        "sdi_stored": scoring.plan.sdi,
        "train_steps": str(cfg.sketch.train_steps),
        "topk": k_top,
        "assignment": str(plan.query_meta[0].get("assignment") or q_layout.describe()),
        "query_tokens": json.dumps(plan.query_meta[0].get("query_tokens")),
    }
    # Relative to results.h5: HDF5 finds them from its folder, wherever the run dir moves.
    shard_files = [run.shard_path(b.index).relative_to(run.path) for b in blocks]
    sources = [(str(f), b.start, b.stop) for f, b in zip(shard_files, blocks, strict=True)]
    with write_results(
        run.results_path,
        n_query=queries.n_query,
        query_layout=q_layout.to_dict(),
        train_layout=t_layout.to_dict(),
        slot_names=q_layout.slot_names(),
        train_slot_names=t_layout.slot_names(),
        attrs=attrs,
    ) as out:
        for name, rest in reduced.shapes.items():
            out.stitch(name, name, (n_train, *rest), 0, sources)
        out.stitch("diagnostics/train_loss", "train_loss", (n_ckpt, n_train), 1, sources)
        if queries.positions is not None:
            out.write_token_positions(queries.positions)
        if dynamics is not None:
            out.write_dynamics(*dynamics)
        for (scope, sign), top in reduced.totals.tops.items():
            out.write_topk(scope, sign, top.indices.numpy(), top.scores.float().numpy())
        if reduced.tokens is not None:
            grid = (queries.n_query, queries.n_slots, queries.n_tokens, -1)
            for (_scope, sign), top in reduced.tokens.tops.items():
                out.write_topk(
                    "per_token",
                    sign,
                    top.indices.reshape(grid).numpy(),
                    top.scores.float().reshape(grid).numpy(),
                )
            out.write_diagnostics({"token_energy": reduced.tokens.energy.reshape(grid[:3]).numpy()})
        out.write_diagnostics(
            {
                "energy": reduced.totals.energy.numpy(),
                "signed_share": reduced.totals.signed_share().numpy(),
                "train_sketch_norm": reduced.train_norm / n_train,
                "query_sketch_norm": np.stack(
                    [np.linalg.norm(q.sketch, axis=-1) for q in queries.files]
                ),
                "query_loss": np.stack([q.loss for q in queries.files]),
            }
        )
        out.write_units([u.name for b in blocks for u in b.units], reduced.unit_stats)
        out.write_inputs(
            config_hash=config_hash(cfg),
            units=plan.unit_digests,
            shards=reduced.shard_digests,
            query=queries.digests,
            checkpoints=list(cfg.checkpoints.paths),
            checkpoint_sha256=plan.checkpoint_sha,
            data_files=data_files,
        )
    log.info(
        "wrote %s: %d train x %d queries x %d slots from %d shards in %.1fs",
        run.results_path, n_train, queries.n_query, queries.n_slots, len(blocks),
        time.perf_counter() - started,
    )  # fmt: skip
    with WandbLogger(cfg, run, "merge", "merge") as wandb_log:
        wandb_log.log_merge(run.results_path)
    return 0
