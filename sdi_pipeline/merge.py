"""The merge: validate all sketch files, then stream them into results.h5.

Validation comes first and reports every problem at once: missing or unreadable query files,
missing units (by name), units whose sketch spec / parameters / checkpoint / step layout
differ from the query file's, indices covered twice or not at all. Nothing is computed
until the run is complete and consistent.

The contraction streams blocks of training examples: for block b it sums, over checkpoints
k, eta_k * (train sketch of unit (k, b) summed over slots) @ (query sketches of k flattened
over (query, slot)) -- one matmul per unit -- writes the block's rows of TracIn / SDI, and
folds them into running top-k and per-step diagnostics. Memory is one block plus per-query
accumulators, whatever N_train is. results.h5 is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from sdi_pipeline import build
from sdi_pipeline.config import config_hash
from sdi_pipeline.errors import SDIError
from sdi_pipeline.jobs import log, setup_logging
from sdi_pipeline.layout import SlotLayout
from sdi_pipeline.messages import shortened
from sdi_pipeline.rundir import RunDir, Unit, run_units
from sdi_pipeline.store import UnitReader, describe_mismatch, read_meta, read_sketch_file
from sdi_pipeline.wandb_log import WandbLogger

RESULTS_FORMAT = "sdi-pipeline/results"
RESULTS_VERSION = 1


class RunningTopK:
    """Top-k over streamed rows of scores (n, *rest), kept per entry of ``rest``."""

    def __init__(self, rest: tuple[int, ...], k: int, largest: bool) -> None:
        self.k, self.largest = k, largest
        fill = -torch.inf if largest else torch.inf
        self.scores = torch.full((*rest, 0), fill)
        self.indices = torch.zeros((*rest, 0), dtype=torch.int64)

    def update(self, scores: torch.Tensor, first_index: int) -> None:
        moved = torch.movedim(scores, 0, -1)
        idx = torch.arange(first_index, first_index + scores.shape[0]).expand_as(moved)
        all_scores = torch.cat([self.scores, moved], dim=-1)
        all_idx = torch.cat([self.indices, idx], dim=-1)
        k = min(self.k, all_scores.shape[-1])
        self.scores, pos = torch.topk(all_scores, k, dim=-1, largest=self.largest, sorted=True)
        self.indices = torch.gather(all_idx, -1, pos)


@dataclass
class _Plan:
    n_train: int
    units: list[Unit]
    query_meta: list[dict[str, Any]]
    unit_meta: dict[str, dict[str, Any]]


def _validate(run: RunDir, cfg: Any, n_train: int) -> _Plan:
    n_ckpt = len(cfg.checkpoints.paths)
    units = run_units(cfg, n_train)
    digest = config_hash(cfg)
    problems: list[str] = []
    query_meta: list[dict[str, Any]] = []
    for k in range(n_ckpt):
        path = run.query_path(k)
        if not path.exists():
            problems.append(f"query sketches for checkpoint {k} missing ({path}): run sdi-query")
            query_meta.append({})
            continue
        try:
            meta = read_meta(path)
        except SDIError as err:
            problems.append(str(err))
            query_meta.append({})
            continue
        if meta.get("config_hash") != digest:
            problems.append(
                f"{path} was made for config {meta.get('config_hash')}, not {digest}; "
                "rerun sdi-query"
            )
        query_meta.append(meta)
    missing = [u.name for u in units if not run.is_done(u)]
    if missing:
        problems.append(
            f"{len(missing)} of {len(units)} units not done: {shortened(missing)}; run the workers"
        )
    expected = {u.name: u for u in units}
    coverage = np.zeros((n_ckpt, n_train), dtype=np.int32)
    unit_meta: dict[str, dict[str, Any]] = {}
    for path in sorted(run.units_dir.glob("*.h5")):
        name = path.stem
        try:
            meta = read_meta(path)
        except SDIError as err:
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
                    f"{'; '.join(diffs)}. Delete the unit and its completion marker and rerun "
                    "its worker."
                )
        unit_meta[name] = meta
    dup = np.argwhere(coverage > 1)
    if len(dup):
        shown = ", ".join(f"ckpt {k} index {i}" for k, i in dup[:5])
        problems.append(f"{len(dup)} training indices covered by more than one unit file ({shown})")
    if problems:
        raise SDIError("the merge refuses this run:\n- " + "\n- ".join(problems))
    return _Plan(n_train, units, query_meta, unit_meta)


def contract_unit(
    reader: UnitReader,
    path: Path,
    query_flat: torch.Tensor,
    eta: float,
    sdi: torch.Tensor,
    matrix: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read one (validated) unit and add eta * its contraction with the queries, in place.

    ``query_flat`` is (m, M*S_q). ``sdi`` (n, M*S_q) gets the train sketch summed over slots
    times ``query_flat`` -- one matmul; ``matrix`` (n, S_tr, M*S_q), if given, the per-slot
    products. Returns the unit's sketch (valid until the reader's next read) and losses.
    """
    sketch, loss = reader.read(path)
    values = torch.from_numpy(sketch)
    summed = values if values.dim() == 2 else values.sum(dim=1)
    sdi.addmm_(summed, query_flat, alpha=eta)
    if matrix is not None:
        per_slot = values.reshape(-1, values.shape[-1]) @ query_flat
        matrix.add_(per_slot.reshape(matrix.shape), alpha=eta)
    return sketch, loss


def run_merge(run_dir: str | Path) -> int:
    """Validate the run and write results.h5."""
    run = RunDir(run_dir)
    setup_logging(run, "merge")
    cfg = run.load_config()
    n_train = len(build.build_dataset(cfg, "train"))
    run.check_train_size(n_train)
    plan = _validate(run, cfg, n_train)
    started = time.perf_counter()
    queries = []
    for k in range(len(cfg.checkpoints.paths)):
        q = read_sketch_file(run.query_path(k))
        queries.append(q)
    etas = [float(m["checkpoint"]["eta"]) for m in plan.query_meta]
    q_layout = SlotLayout.from_dict(plan.query_meta[0]["layout"])
    t_layout = SlotLayout.from_dict(plan.unit_meta[plan.units[0].name]["layout"])
    n_query, s_q = queries[0].sketch.shape[0], q_layout.n_slots
    s_tr = t_layout.n_slots
    q_tensors = [torch.from_numpy(q.sketch) for q in queries]
    q_flat = [q.reshape(n_query * s_q, -1).T.contiguous() for q in q_tensors]

    sdi_bytes = 4 * n_train * n_query * s_q
    store_sdi = sdi_bytes <= float(cfg.merge.sdi_max_gb) * 2**30
    if not store_sdi:
        log.warning(
            "the full SDI tensor would take %.2f GiB > merge.sdi_max_gb=%s: writing TracIn, top-k "
            "and diagnostics only (raise merge.sdi_max_gb to keep it)",
            sdi_bytes / 2**30, cfg.merge.sdi_max_gb,
        )  # fmt: skip
    k_top = int(cfg.merge.topk)
    tops = {
        (scope, sign): RunningTopK(shape, k_top, sign == "positive")
        for scope, shape in (("overall", (n_query,)), ("per_step", (n_query, s_q)))
        for sign in ("positive", "negative")
    }
    energy = torch.zeros(n_query, s_q, dtype=torch.float64)
    signed = torch.zeros(n_query, s_q, dtype=torch.float64)
    train_norm = torch.zeros(len(etas), s_tr, dtype=torch.float64)
    train_loss = np.zeros((len(etas), n_train), dtype=np.float32)

    reader = UnitReader()
    tmp = run.results_path.with_name(f".results.h5.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as out:
            d_tracin = out.create_dataset("tracin", (n_train, n_query), "f4", chunks=True)
            d_sdi = (
                out.create_dataset("sdi", (n_train, n_query, s_q), "f4", chunks=True)
                if store_sdi
                else None
            )
            d_matrix = (
                out.create_dataset("sdi_matrix", (n_train, n_query, s_tr, s_q), "f4", chunks=True)
                if cfg.merge.step_matrix
                else None
            )
            by_block: dict[int, list[Unit]] = defaultdict(list)
            for unit in plan.units:
                by_block[unit.block].append(unit)
            for block in sorted(by_block):
                units = by_block[block]
                start, stop = units[0].start, units[0].stop
                sdi = torch.zeros(stop - start, n_query * s_q)
                matrix = torch.zeros(stop - start, s_tr, n_query * s_q) if d_matrix else None
                for unit in units:
                    sketch, loss = contract_unit(
                        reader, run.unit_path(unit), q_flat[unit.ckpt], etas[unit.ckpt], sdi, matrix
                    )
                    train_loss[unit.ckpt, start:stop] = loss
                    if sketch.ndim == 3:
                        norms = np.linalg.norm(sketch, axis=2).sum(axis=0)
                        train_norm[unit.ckpt] += torch.from_numpy(norms).double()
                sdi3 = sdi.reshape(-1, n_query, s_q)
                tracin = sdi3.sum(dim=2)
                d_tracin[start:stop] = tracin.numpy()
                if d_sdi is not None:
                    d_sdi[start:stop] = sdi3.numpy()
                if d_matrix is not None and matrix is not None:
                    d_matrix[start:stop] = (
                        matrix.reshape(-1, s_tr, n_query, s_q).permute(0, 2, 1, 3).numpy()
                    )
                for (scope, _sign), top in tops.items():
                    top.update(tracin if scope == "overall" else sdi3, start)
                energy += sdi3.abs().sum(dim=0).double()
                signed += sdi3.sum(dim=0).double()
                log.info("merged block %d (%d..%d)", block, start, stop)
            _write_summary(out, tops, energy, signed, train_norm / n_train, train_loss, queries)
            _write_units_table(out, run, plan.units)
            out.attrs["format"] = RESULTS_FORMAT
            out.attrs["format_version"] = RESULTS_VERSION
            out.attrs["config_hash"] = config_hash(cfg)
            out.attrs["n_train"] = n_train
            out.attrs["n_query"] = n_query
            out.attrs["etas"] = json.dumps(etas)
            out.attrs["checkpoints"] = json.dumps(list(cfg.checkpoints.paths))
            out.attrs["query_layout"] = json.dumps(q_layout.to_dict())
            out.attrs["train_layout"] = json.dumps(t_layout.to_dict())
            out.attrs["slot_names"] = json.dumps(q_layout.slot_names())
            out.attrs["sdi_stored"] = bool(store_sdi)
            out.attrs["train_steps"] = str(cfg.sketch.train_steps)
            out.attrs["topk"] = k_top
        tmp.replace(run.results_path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info(
        "wrote %s: %d train x %d queries x %d slots in %.1fs",
        run.results_path, n_train, n_query, s_q, time.perf_counter() - started,
    )  # fmt: skip
    with WandbLogger(cfg, run, "merge", "merge") as wandb_log:
        wandb_log.log_merge(run.results_path)
    return 0


def _write_summary(
    out: h5py.File,
    tops: dict[tuple[str, str], RunningTopK],
    energy: torch.Tensor,
    signed: torch.Tensor,
    train_norm: torch.Tensor,
    train_loss: np.ndarray,
    queries: list[Any],
) -> None:
    for (scope, sign), top in tops.items():
        group = out.require_group(f"topk/{scope}/{sign}")
        group.create_dataset("indices", data=top.indices.numpy())
        group.create_dataset("scores", data=top.scores.float().numpy())
    diag = out.require_group("diagnostics")
    diag.create_dataset("energy", data=energy.numpy())
    share = signed / signed.abs().sum(dim=1, keepdim=True).clamp_min(1e-300)
    diag.create_dataset("signed_share", data=share.numpy())
    diag.create_dataset("train_sketch_norm", data=train_norm.numpy())
    diag.create_dataset(
        "query_sketch_norm",
        data=np.stack([np.linalg.norm(q.sketch, axis=-1) for q in queries]),
    )
    diag.create_dataset("train_loss", data=train_loss)
    diag.create_dataset("query_loss", data=np.stack([q.loss for q in queries]))


def _write_units_table(out: h5py.File, run: RunDir, units: list[Unit]) -> None:
    stats = [json.loads(run.marker_path(u).read_text()) for u in units]
    group = out.require_group("diagnostics/units")
    group.create_dataset("name", data=np.array([u.name for u in units], dtype="S"))
    for key in ("examples", "seconds", "examples_per_s", "peak_rss_mb", "rank"):
        group.create_dataset(key, data=np.array([s.get(key, np.nan) for s in stats], dtype="f8"))
    out["diagnostics"].attrs["coverage"] = json.dumps(
        {"units": len(units), "examples": int(sum(s.get("examples", 0) for s in stats))}
    )
