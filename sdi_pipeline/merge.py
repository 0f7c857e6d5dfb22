"""The merge: validate all sketch files, then stream them into results.h5.

Validation comes first and reports every problem at once, in one line: missing or
unreadable query files, missing units (by name, and who is computing them if anyone),
stale units and query files (their recorded checkpoint sha256, examples' digest, spec,
targets or format differ from the current ones), damaged completion markers, units whose
sketch spec / parameters / checkpoint / step layout differ from the query file's, indices
covered twice or not at all. Nothing is computed until the run is complete and consistent;
the merge waits for nothing.

The contraction streams blocks of training examples: for block b it sums, over checkpoints
k, eta_k * (train sketch of unit (k, b) summed over slots) @ (query sketches of k flattened
over (query, slot)) -- one matmul per unit -- writes the block's rows of TracIn / SDI, and
folds them into running top-k and per-step diagnostics. Memory is one block plus per-query
accumulators, whatever N_train is. Every value read is verified (HDF5 Fletcher-32 checksums,
finite values): a corrupt unit is named and the merge refuses.

Stale or corrupt units lose their completion marker (a corrupt query file is removed), so the
advice "run the same command again" recomputes exactly them. results.h5 is written under a
temporary name and renamed; it records the digests of everything it was made from.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdi_pipeline import build, scores
from sdi_pipeline.atomic import clean_temp_files
from sdi_pipeline.config import config_hash, train_hash
from sdi_pipeline.content import block_digest
from sdi_pipeline.digests import DigestCache
from sdi_pipeline.engine.slots import SlotLayout
from sdi_pipeline.errors import MergeRefused, SDIError
from sdi_pipeline.freshness import CORRUPT, DONE, MISSING, check_unit, explain_stale
from sdi_pipeline.leases import read_holder
from sdi_pipeline.logs import log, setup_logging
from sdi_pipeline.messages import shortened
from sdi_pipeline.results import check_free_space, estimated_size, write_results
from sdi_pipeline.rundir import RunDir, Unit, run_units
from sdi_pipeline.store import (
    FORMAT_VERSION,
    SketchFile,
    UnitReader,
    describe_mismatch,
    read_meta,
    read_sketch_file,
)
from sdi_pipeline.wandb_log import WandbLogger

RERUN = "run the same sdi-attribute command again (or the jobs by hand) to recompute them"
# Problems shown in the one-line refusal; all of them go to logs/merge.log.
SHOWN_PROBLEMS = 8


@dataclass
class _Plan:
    n_train: int
    units: list[Unit]
    query_meta: list[dict[str, Any]]
    unit_meta: dict[str, dict[str, Any]]
    queries: list[SketchFile] = field(default_factory=list)
    checkpoint_sha: list[str] = field(default_factory=list)
    unit_digests: dict[str, str] = field(default_factory=dict)


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

    blocks: dict[int, str] = {}
    missing: list[Unit] = []
    stale: list[tuple[str, str]] = []
    corrupt: list[tuple[str, str]] = []
    unit_digests: dict[str, str] = {}
    world_sizes: set[int] = set()
    for unit in units:
        if unit.block not in blocks:
            blocks[unit.block] = block_digest(train, unit.start, unit.stop)
        current = current_depends(cfg, "train", shas[unit.ckpt], blocks[unit.block])
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
            holder = read_holder(run.lease_path(unit.name))
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
    coverage = np.zeros((n_ckpt, n_train), dtype=np.int32)
    unit_meta: dict[str, dict[str, Any]] = {}
    reported = {name for name, _ in stale + corrupt}
    for path in sorted(run.units_dir.glob("*.h5")):
        name = path.stem
        try:
            meta = read_meta(path)
        except SDIError as err:
            if name not in reported:
                problems.append(str(err))
            continue
        block, ckpt = meta.get("block", {}), meta.get("checkpoint", {}).get("index")
        if isinstance(ckpt, int) and 0 <= ckpt < n_ckpt and block:
            coverage[ckpt, block["start"] : block["stop"]] += 1
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
        unit_meta[name] = meta
    dup = np.argwhere(coverage > 1)
    if len(dup):
        shown = ", ".join(f"ckpt {k} index {i}" for k, i in dup[:5])
        problems.append(f"{len(dup)} training indices covered by more than one unit file ({shown})")
    if problems:
        raise refuse(problems)
    return _Plan(
        n_train,
        units,
        query_meta,
        unit_meta,
        queries,
        [str(s) for s in shas],
        unit_digests,
    )


@dataclass
class _TokenQueries:
    """The per-token query sketches of a run and what the merge accumulates from them."""

    flat: list[torch.Tensor]  # per checkpoint (m, M*S_q*P)
    positions: np.ndarray  # (M, P)
    n_tokens: int
    width: int  # M*S_q*P
    stored: bool  # sdi_tokens kept (below merge.sdi_max_gb)
    totals: scores.ScoreTotals


def _token_queries(queries: list[Any], n_train: int, max_gb: float, k: int) -> _TokenQueries | None:
    """Per-token query sketches, if the query job made them (analysis.query_tokens)."""
    if "token_sketch" not in queries[0].extra:
        return None
    positions = queries[0].extra["token_positions"]
    for k_ckpt, q in enumerate(queries):
        if "token_sketch" not in q.extra or not np.array_equal(
            q.extra["token_positions"], positions
        ):
            raise MergeRefused(
                f"query/ckpt-{k_ckpt:03d}.h5 has other per-token query sketches than "
                "query/ckpt-000.h5 (query_tokens='last' follows nonzero per-token losses, which "
                "changed between checkpoints): choose token positions, and rerun sdi-query"
            )
    n_query, s_q, n_tokens, _ = queries[0].extra["token_sketch"].shape
    width = n_query * s_q * n_tokens
    stored = 4 * n_train * width <= max_gb * 2**30
    if not stored:
        log.warning(
            "SDI per token would take %.2f GiB > merge.sdi_max_gb: writing its top-k and "
            "energy maps only", 4 * n_train * width / 2**30,
        )  # fmt: skip
    flat = [
        scores.flat_queries(torch.from_numpy(q.extra["token_sketch"]).flatten(1, 2))
        for q in queries
    ]
    totals = scores.ScoreTotals(n_query, s_q * n_tokens, k, overall=False)
    return _TokenQueries(flat, positions, n_tokens, width, stored, totals)


def _loop_dynamics(queries: list[Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """The queries' loop traces of every checkpoint, stacked: states (K, M, τ, d) and
    margins (K, M, τ); None when the run has no analysis.loop_trace."""
    # The query files were validated to share the run's config hash, which names the trace.
    if "loop_margins" not in queries[0].extra:
        return None
    states = np.stack([q.extra["loop_states"] for q in queries])
    return states, np.stack([q.extra["loop_margins"] for q in queries])


def contract_unit(
    reader: UnitReader,
    path: Path,
    query_flat: torch.Tensor,
    eta: float,
    sdi: torch.Tensor,
    matrix: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read one (validated) unit and add eta * its contraction with the queries, in place.

    ``query_flat`` is (m, M*S_q) (:func:`scores.flat_queries`); ``sdi`` (n, M*S_q) and
    ``matrix`` (n, S_tr, M*S_q), if given, accumulate as in :func:`scores.add_sdi` and
    :func:`scores.add_step_matrix`. Returns the unit's sketch (valid until the reader's next
    read) and losses. A corrupt unit (checksum, NaN/inf) raises RunDirError naming it.
    """
    sketch, loss = reader.read(path)
    values = torch.from_numpy(sketch)
    scores.add_sdi(sdi, values, query_flat, eta)
    if matrix is not None:
        scores.add_step_matrix(matrix, values, query_flat, eta)
    return sketch, loss


def run_merge(run_dir: str | Path) -> int:
    """Validate the run and write results.h5."""
    run = RunDir.existing(run_dir)
    setup_logging(run, "merge")
    removed = clean_temp_files(run.folders())
    if removed:
        log.info("removed %d temporary file(s) of killed writers", len(removed))
    cfg = run.load_config()
    train = build.build_dataset(cfg, "train")
    n_train = len(train)
    run.check_train_size(n_train)
    plan = _validate(run, cfg, train, build.build_dataset(cfg, "query"))
    started = time.perf_counter()
    queries = plan.queries
    etas = [float(m["checkpoint"]["eta"]) for m in plan.query_meta]
    q_layout = SlotLayout.from_dict(plan.query_meta[0]["layout"])
    t_layout = SlotLayout.from_dict(plan.unit_meta[plan.units[0].name]["layout"])
    n_query, s_q = queries[0].sketch.shape[0], q_layout.n_slots
    s_tr = t_layout.n_slots
    q_flat = [scores.flat_queries(torch.from_numpy(q.sketch)) for q in queries]

    sdi_bytes = 4 * n_train * n_query * s_q
    store_sdi = sdi_bytes <= float(cfg.merge.sdi_max_gb) * 2**30
    if not store_sdi:
        log.warning(
            "the full SDI tensor would take %.2f GiB > merge.sdi_max_gb=%s: writing TracIn, top-k "
            "and diagnostics only (raise merge.sdi_max_gb to keep it)",
            sdi_bytes / 2**30, cfg.merge.sdi_max_gb,
        )  # fmt: skip
    k_top = int(cfg.merge.topk)
    totals = scores.ScoreTotals(n_query, s_q, k_top)
    tokens = _token_queries(queries, n_train, float(cfg.merge.sdi_max_gb), k_top)
    needed = estimated_size(
        n_train, n_query, s_q, s_tr, sdi=store_sdi, step_matrix=bool(cfg.merge.step_matrix)
    )
    if tokens is not None and tokens.stored:
        needed += 4 * n_train * tokens.width
    check_free_space(run.results_path, needed)
    train_norm = torch.zeros(len(etas), s_tr, dtype=torch.float64)
    train_loss = np.zeros((len(etas), n_train), dtype=np.float32)

    reader = UnitReader()
    attrs = {
        "config_hash": config_hash(cfg),
        "n_train": n_train,
        "etas": etas,
        "checkpoints": list(cfg.checkpoints.paths),
        "sdi_stored": bool(store_sdi),
        "train_steps": str(cfg.sketch.train_steps),
        "topk": k_top,
        "assignment": str(plan.query_meta[0].get("assignment") or q_layout.describe()),
        "query_tokens": json.dumps(plan.query_meta[0].get("query_tokens")),
    }
    corrupt: list[tuple[str, str]] = []
    with write_results(
        run.results_path,
        n_query=n_query,
        query_layout=q_layout.to_dict(),
        train_layout=t_layout.to_dict(),
        slot_names=q_layout.slot_names(),
        train_slot_names=t_layout.slot_names(),
        attrs=attrs,
    ) as out:
        out.create(n_train, sdi=store_sdi, step_matrix=bool(cfg.merge.step_matrix))
        if tokens is not None:
            out.create_tokens(n_train, tokens.positions, sdi_tokens=tokens.stored)
        dynamics = _loop_dynamics(queries)
        if dynamics is not None:
            out.write_dynamics(*dynamics)
        by_block: dict[int, list[Unit]] = defaultdict(list)
        for unit in plan.units:
            by_block[unit.block].append(unit)
        for block in sorted(by_block):
            units = by_block[block]
            start, stop = units[0].start, units[0].stop
            sdi = torch.zeros(stop - start, n_query * s_q)
            matrix = (
                torch.zeros(stop - start, s_tr, n_query * s_q) if cfg.merge.step_matrix else None
            )
            by_token = None if tokens is None else torch.zeros(stop - start, tokens.width)
            for unit in units:
                try:
                    sketch, loss = contract_unit(
                        reader, run.unit_path(unit), q_flat[unit.ckpt], etas[unit.ckpt], sdi, matrix
                    )
                except SDIError as err:
                    # Keep reading: every corrupt unit is named at once.
                    corrupt.append((unit.name, getattr(err, "what", str(err))))
                    run.marker_path(unit).unlink(missing_ok=True)
                    continue
                if tokens is not None and by_token is not None:
                    scores.add_sdi(
                        by_token, torch.from_numpy(sketch), tokens.flat[unit.ckpt], etas[unit.ckpt]
                    )
                train_loss[unit.ckpt, start:stop] = loss
                if sketch.ndim == 3:
                    norms = np.linalg.norm(sketch, axis=2).sum(axis=0)
                    train_norm[unit.ckpt] += torch.from_numpy(norms).double()
            if corrupt:
                continue  # nothing of this merge will be kept
            sdi3 = sdi.reshape(-1, n_query, s_q)
            tracin = totals.update(sdi3, start)
            token_rows = None
            if tokens is not None and by_token is not None:
                token_rows = by_token.reshape(-1, n_query, s_q, tokens.n_tokens)
                tokens.totals.update(token_rows.flatten(2), start)
            out.write_rows(
                start,
                tracin.numpy(),
                sdi3.numpy() if store_sdi else None,
                None if matrix is None else scores.step_matrix_layout(matrix, n_query, s_q).numpy(),
                None if token_rows is None else token_rows.numpy(),
            )
            log.info("merged block %d (%d..%d)", block, start, stop)
        if corrupt:
            # Raised inside the writer: its temporary file is removed, nothing is renamed.
            raise refuse([f"corrupt units, markers removed: {_by_reason(corrupt)}; {RERUN}"])
        for (scope, sign), top in totals.tops.items():
            out.write_topk(scope, sign, top.indices.numpy(), top.scores.float().numpy())
        if tokens is not None:
            grid = (n_query, s_q, tokens.n_tokens, -1)
            for (_scope, sign), top in tokens.totals.tops.items():
                out.write_topk(
                    "per_token",
                    sign,
                    top.indices.reshape(grid).numpy(),
                    top.scores.float().reshape(grid).numpy(),
                )
            out.write_diagnostics({"token_energy": tokens.totals.energy.reshape(grid[:3]).numpy()})
        out.write_diagnostics(
            {
                "energy": totals.energy.numpy(),
                "signed_share": totals.signed_share().numpy(),
                "train_sketch_norm": (train_norm / n_train).numpy(),
                "query_sketch_norm": np.stack([np.linalg.norm(q.sketch, axis=-1) for q in queries]),
                "train_loss": train_loss,
                "query_loss": np.stack([q.loss for q in queries]),
            }
        )
        out.write_units(
            [u.name for u in plan.units],
            [json.loads(run.marker_path(u).read_text()) for u in plan.units],
        )
        out.write_inputs(
            config_hash=config_hash(cfg),
            units=plan.unit_digests,
            query=[str(m["content_digest"]) for m in plan.query_meta],
            checkpoints=list(cfg.checkpoints.paths),
            checkpoint_sha256=plan.checkpoint_sha,
        )
    log.info(
        "wrote %s: %d train x %d queries x %d slots in %.1fs",
        run.results_path, n_train, n_query, s_q, time.perf_counter() - started,
    )  # fmt: skip
    with WandbLogger(cfg, run, "merge", "merge") as wandb_log:
        wandb_log.log_merge(run.results_path)
    return 0
