"""``sdi-status``: which units of a run are done, stale, corrupt, running, missing or failed,
whether results.h5 is up to date, where the logs are, and what the launchers report about
its jobs (e.g. their states under launcher=slurm).

By default it is cheap and needs neither the data nor the model: completion markers, file
sizes, HDF5 headers, the checkpoints' digests (from the run's cache; a checkpoint whose
file changed is hashed once) and a stat of each data file results.h5 was made from.
``verify=true`` audits everything: it reads every value of every unit and query file (HDF5
checksums, finite values) and hashes the data again (which builds the datasets), so a
silently corrupted unit or a changed example is reported too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sdi_pipeline.errors import SDIError
from sdi_pipeline.formats.results import stale_reasons
from sdi_pipeline.formats.shards import shard_matches
from sdi_pipeline.inputs import build
from sdi_pipeline.launch.launchers import LAUNCHERS
from sdi_pipeline.messages import shortened
from sdi_pipeline.run.freshness import (
    CORRUPT,
    DATA_SPLITS,
    DONE,
    STALE,
    check_unit,
    checkpoint_digests,
    explain_stale,
    query_digests,
    read_attrs,
)
from sdi_pipeline.run.layout import bif_block_name, block_name
from sdi_pipeline.run.leases import read_holder
from sdi_pipeline.run.rundir import RunDir, run_blocks, run_units

FIX = "run the same sdi-attribute command again (or its sdi-worker / sdi-query): it is recomputed"


@dataclass
class RunStatus:
    method: str = "sdi"  # sdi: sketches; bif: loss traces (units: a chain on a block)
    done: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failed: dict[str, dict] = field(default_factory=dict)
    # Unit -> why it no longer matches its inputs / why it is damaged.
    stale: dict[str, str] = field(default_factory=dict)
    corrupt: dict[str, str] = field(default_factory=dict)
    # Unit -> who holds its lease (a live job computing it now).
    running: dict[str, str] = field(default_factory=dict)
    query_done: list[int] = field(default_factory=list)
    query_missing: list[int] = field(default_factory=list)
    # Checkpoint -> why its query file is stale or damaged.
    query_bad: dict[int, str] = field(default_factory=dict)
    # Blocks whose score shard is there for the current query sketches, and the others.
    scored: list[str] = field(default_factory=list)
    unscored: list[str] = field(default_factory=list)
    # Block -> why its shard is damaged (verify=true reads them).
    bad_shards: dict[str, str] = field(default_factory=dict)
    store_train: bool = True
    merged: bool = False
    # Why results.h5 no longer matches the run (empty: up to date, or not written).
    results_stale: list[str] = field(default_factory=list)
    verified: bool = False
    # Checkpoints of the config that are missing or unreadable now.
    missing_checkpoints: list[str] = field(default_factory=list)
    # What the launchers say about the jobs they started for the run (Launcher.status_lines).
    launcher_lines: list[str] = field(default_factory=list)
    # Datasets built in code (no data.<split>.path): their changes need verify=true.
    built_in_code: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not (
            self.failed
            or self.corrupt
            or self.stale
            or self.query_bad
            or self.results_stale
            or self.bad_shards
        )


def run_status(run: RunDir, verify: bool = False) -> RunStatus:
    cfg = run.load_config()
    # The recorded size spares building the user's data set (and importing its code).
    n_train = run.recorded_train_size()
    if n_train is None or verify:
        n_train = len(build.build_dataset(cfg, "train"))
    status = RunStatus(merged=run.results_path.exists(), verified=verify)
    status.built_in_code = [
        f"data.{which}" for which in DATA_SPLITS if not isinstance(cfg.data[which].get("path"), str)
    ]
    if status.merged:
        status.results_stale = stale_reasons(run.results_path)
    # Every launcher is asked, not only the config's: after launcher=prepare, jobs may have
    # been submitted by hand.
    for launcher in LAUNCHERS.values():
        if launcher.status_lines is not None:
            status.launcher_lines += launcher.status_lines(run, status.merged)
    paths = list(cfg.checkpoints.paths)
    shas = checkpoint_digests(run, paths)
    status.missing_checkpoints = [p for p, sha in zip(paths, shas, strict=True) if sha is None]
    if cfg.method == "bif":
        return _bif_status(run, cfg, n_train, status)
    audit = _Audit(run, cfg, n_train) if verify else None
    for k in range(len(paths)):
        path = run.query_path(k)
        if not path.exists():
            status.query_missing.append(k)
            continue
        why = _query_problem(path, shas[k], audit, k)
        if why:
            status.query_bad[k] = why
        else:
            status.query_done.append(k)
    timeout = float(cfg.runtime.lease_timeout_s)
    status.store_train = bool(cfg.sketch.store_train)
    digests = query_digests(run, len(paths))
    for block in run_blocks(cfg, n_train):
        path = run.shard_path(block.index)
        if digests is not None and shard_matches(path, digests):
            status.scored.append(block.name)
            if audit is not None:
                why = audit.read_shard(path)
                if why:
                    status.bad_shards[block.name] = why
        else:
            status.unscored.append(block.name)
            if path.exists():
                try:
                    read_attrs(path, "content_digest")
                except SDIError as err:
                    status.bad_shards[block.name] = (
                        f"{err}; run the same command again: the block is scored again"
                    )
    for unit in run_units(cfg, n_train):
        if not status.store_train:
            # No train sketches kept: a unit is only ever failed or being computed.
            if run.failure_path(unit).exists():
                status.failed[unit.name] = _failure(run.failure_path(unit))
            continue
        current = audit.unit_depends(unit, shas[unit.ckpt]) if audit else None
        # Cheap: markers and file sizes (a truncated file shows); verify=true: headers and data.
        check = check_unit(
            run, unit.name, checkpoint_sha=shas[unit.ckpt], current=current, read_header=verify
        )
        if check.state == DONE and audit is not None:
            check = audit.read(unit.name, check)
        if check.state == DONE:
            status.done.append(unit.name)
        elif check.state == STALE:
            status.stale[unit.name] = check.why
        elif check.state == CORRUPT:
            status.corrupt[unit.name] = check.why
        elif run.failure_path(unit).exists():
            status.failed[unit.name] = _failure(run.failure_path(unit))
        else:
            holder = read_holder(run.lease_path(block_name(unit.block)))
            if holder is not None and holder.gone(timeout) is None:
                status.running[unit.name] = (
                    f"{holder.describe()}, heartbeat {holder.age_s:.0f}s ago"
                )
            else:
                status.missing.append(unit.name)
    if verify and status.merged and status.stale:
        status.results_stale.append("units it was made from are stale now (their inputs changed)")
    return status


def _bif_status(run: RunDir, cfg: Any, n_train: int, status: RunStatus) -> RunStatus:
    """method=bif: its query traces (one file per checkpoint), its units (a chain at a
    checkpoint recorded on a block: markers and file sizes; verify=true: each file's record
    against the chain and the block's examples as they are now) and its BIF shards."""
    from sdi_pipeline.jobs.bif_context import BifJob, block_units
    from sdi_pipeline.jobs.bif_worker import block_state, load_queries
    from sdi_pipeline.jobs.context import JobContext

    status.method = "bif"
    n_ckpt = len(cfg.checkpoints.paths)
    for k in range(n_ckpt):
        path = run.bif_query_path(k)
        if not path.exists():
            status.query_missing.append(k)
            continue
        try:
            read_attrs(path, "content_digest")
            status.query_done.append(k)
        except SDIError as err:
            status.query_bad[k] = str(err)
    audit: tuple[Any, Any, Any] | None = None
    if status.verified and not status.query_missing and not status.query_bad:
        job = BifJob(JobContext(cfg, run))
        audit = (job, build.build_dataset(cfg, "train"), load_queries(job))
    timeout = float(cfg.runtime.lease_timeout_s)
    for block in run_blocks(cfg, n_train):
        name = bif_block_name(block.index)
        scored = status.scored if run.bif_shard_path(block.index).exists() else status.unscored
        scored.append(name)
        units = block_units(block, n_ckpt, int(cfg.bif.chains))
        # verify=true: each unit's record against the chain and the block's data now.
        current = block_state(*audit, block)[2] if audit is not None else [""] * len(units)
        holder = read_holder(run.lease_path(name))
        live = holder is not None and holder.gone(timeout) is None
        for unit, why in zip(units, current, strict=True):
            check = check_unit(run, unit.name, read_header=False)
            if check.state == CORRUPT:
                status.corrupt[unit.name] = check.why
            elif check.state == DONE and why:
                status.stale[unit.name] = why
            elif check.state == DONE:
                status.done.append(unit.name)
            elif live and holder is not None:
                status.running[unit.name] = f"{holder.describe()}, heartbeat {holder.age_s:.0f}s"
            else:
                status.missing.append(unit.name)
    return status


def _failure(path: Any) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {"error": "unreadable failure record"}
    except (OSError, ValueError):
        return {"error": f"unreadable failure record {path}"}


def _query_problem(path: Any, sha: str | None, audit: _Audit | None, k: int) -> str:
    try:
        attrs = read_attrs(path, "depends", "content_digest")
    except SDIError as err:
        return str(err)
    depends = attrs.get("depends") if isinstance(attrs.get("depends"), dict) else {}
    if sha is not None and (depends or {}).get("checkpoint_sha256") != sha:
        return explain_stale(depends or {}, {"checkpoint_sha256": sha})
    if audit is not None:
        return audit.query_problem(path, depends or {}, sha)
    return ""


class _Audit:
    """verify=true: the data's digests as they are now, and full reads of every file."""

    def __init__(self, run: RunDir, cfg: Any, n_train: int) -> None:
        from sdi_pipeline.inputs.content import block_digest

        self.run, self.cfg = run, cfg
        self.train = build.build_dataset(cfg, "train")
        query = build.build_dataset(cfg, "query")
        self.query_sha = block_digest(query, 0, len(query), "query")
        self._blocks: dict[int, str] = {}
        self._block_digest = block_digest

    def unit_depends(self, unit: Any, sha: str | None) -> dict[str, Any]:
        from sdi_pipeline.jobs.merge import current_depends

        if unit.block not in self._blocks:
            self._blocks[unit.block] = self._block_digest(self.train, unit.start, unit.stop)
        out = current_depends(self.cfg, "train", sha, self._blocks[unit.block])
        out["block"] = {"index": unit.block, "start": unit.start, "stop": unit.stop}
        return out

    def read(self, name: str, check: Any) -> Any:
        from sdi_pipeline.formats.sketches import verify_sketch_file
        from sdi_pipeline.run.freshness import UnitCheck

        path = self.run.unit_path_named(name)
        try:
            verify_sketch_file(path)
        except SDIError as err:
            # The workers only read headers: a unit damaged inside needs removing (or a merge,
            # which reads everything and removes its marker).
            what = getattr(err, "what", str(err))
            return UnitCheck(CORRUPT, f"{what}; delete {path} and run the same command again")
        return check

    def read_shard(self, path: Any) -> str:
        """Why the shard at ``path`` cannot be read whole (empty: every value checks out)."""
        import h5py
        import numpy as np

        from sdi_pipeline.formats.shards import read_shard_summary

        try:
            read_shard_summary(path)
            with h5py.File(path, "r") as f:
                for name in ("tracin", "sdi", "sdi_matrix", "sdi_tokens", "train_loss"):
                    if name in f and not np.isfinite(np.asarray(f[name])).all():
                        return f"{path} holds NaN or inf values; delete it and run again"
        except (SDIError, OSError) as err:
            return f"{getattr(err, 'what', err)}; delete {path} and run the same command again"
        return ""

    def query_problem(self, path: Any, depends: dict[str, Any], sha: str | None) -> str:
        from sdi_pipeline.formats.sketches import verify_sketch_file
        from sdi_pipeline.jobs.merge import current_depends

        try:
            verify_sketch_file(path)
        except SDIError as err:
            return str(err)  # the query job verifies its files: running it again is the fix
        return explain_stale(depends, current_depends(self.cfg, "query", sha, self.query_sha))


def format_status(run: RunDir, status: RunStatus) -> str:
    total = (
        len(status.done) + len(status.missing) + len(status.failed) + len(status.stale)
        + len(status.corrupt) + len(status.running)
    )  # fmt: skip
    n_query = len(status.query_done) + len(status.query_missing) + len(status.query_bad)
    bad_query = f", {len(status.query_bad)} stale or corrupt" if status.query_bad else ""
    verified = " [verified: checksums and data]" if status.verified else ""
    lines = [
        f"run {run.path}",
        f"  query {'traces' if status.method == 'bif' else 'sketches'}: "
        f"{len(status.query_done)} of {n_query} checkpoints{bad_query}",
        f"  units: {len(status.done)} done, {len(status.missing)} missing, "
        f"{len(status.failed)} failed, {len(status.stale)} stale, {len(status.corrupt)} corrupt, "
        f"{len(status.running)} running (of {total}){verified}"
        if status.store_train
        else f"  units: not stored (sketch.store_train=false), {len(status.failed)} failed",
        f"  scores: {len(status.scored)} of {len(status.scored) + len(status.unscored)} blocks "
        + (
            "scored (BIF shards)"
            if status.method == "bif"
            else "scored against the current query sketches"
        )
        + (f", {len(status.bad_shards)} damaged" if status.bad_shards else ""),
    ]
    for name, why in sorted(status.bad_shards.items()):
        lines.append(f"    DAMAGED {name}: {why}")
    for path in status.missing_checkpoints:
        lines.append(f"    checkpoint missing: {path} (only needed to compute units again)")
    for k, why in sorted(status.query_bad.items()):
        lines.append(f"    QUERY {k}: {why}")
    for name, why in sorted(status.corrupt.items()):
        lines.append(f"    CORRUPT {name}: {why}")
    for name, why in sorted(status.stale.items()):
        lines.append(f"    STALE {name}: {why}")
    if status.corrupt or status.stale or status.query_bad:
        lines.append(f"    fix: {FIX}")
    for name, who in sorted(status.running.items()):
        lines.append(f"    RUNNING {name}: {who}")
    for name, info in sorted(status.failed.items()):
        lines.append(f"    FAILED {name} (rank {info.get('rank')}): {info.get('error')}")
        lines.append(f"           log: {info.get('log')}")
    if status.missing:
        lines.append(f"    missing: {shortened(status.missing, 8)}")
    if not status.merged:
        results = "not yet"
    elif status.results_stale:
        results = (
            f"STALE ({'; '.join(status.results_stale[:2])}"
            f"{' ...' if len(status.results_stale) > 2 else ''}): run the same sdi-attribute "
            "command again"
        )
    else:
        results = "written, up to date"
    lines.append(f"  results.h5: {results}")
    if not status.verified:
        lines.append("  (cheap checks; sdi-status verify=true also reads every file and the data)")
        if status.built_in_code:
            lines.append(
                f"  ({' and '.join(status.built_in_code)} built in code, not from a data file: "
                "a change of their examples is seen by verify=true and the jobs, not here)"
            )
    lines += status.launcher_lines
    return "\n".join(lines)
