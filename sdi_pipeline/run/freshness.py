"""Is a unit, a query file or results.h5 still what the run's current inputs give?

Units and query files record what they depend on (``depends``: checkpoint sha256, digest of
their examples, sketch spec, targets, parameters, format; see
:mod:`sdi_pipeline.formats.sketches`) and
its digest (``content_digest``); a unit's completion marker repeats the digest, the file's
size and the checkpoint's sha256. results.h5 records the digests of every unit and query
file it was made from and the checkpoints' sha256.

Checks here are cheap (markers, file sizes, HDF5 attributes, checkpoint digests from the
run's stat-keyed cache, a stat of each data file) and light to import (no torch):
``Results.open`` and ``sdi-status`` use them. The data files a config names
(``data.train.path``, ``data.query.path``) are recorded in results.h5 by the merge
(:func:`record_data_files`) and compared here; a dataset built in code (a ``_target_``
without a ``path``) is only checked by the jobs and ``sdi-status verify=true``, which hash
the examples again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from sdi_pipeline.errors import RunDirError
from sdi_pipeline.files.digests import (
    DigestCache,
    describe_change,
    file_identity,
    identity_change,
)
from sdi_pipeline.run.layout import SKETCH_FORMAT_VERSION, RunPaths

DONE, STALE, CORRUPT, MISSING = "done", "stale", "corrupt", "missing"


def explain_stale(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """Why a file's recorded ``depends`` differ from the current ones (keys of ``current``)."""
    reasons = []
    for key, now in current.items():
        then = recorded.get(key)
        if then == now:
            continue
        if key == "checkpoint_sha256":
            reasons.append(f"its checkpoint changed ({describe_change(then, now)})")
        elif key == "data_sha256":
            block = current.get("block")
            what = (
                f"training examples {block['start']}..{block['stop'] - 1}"
                if isinstance(block, Mapping)
                else "the query examples"
            )
            reasons.append(f"{what} changed ({describe_change(then, now)})")
        elif key == "format_version":
            reasons.append(f"it has format version {then}, this sdi-pipeline writes {now}")
        else:
            reasons.append(f"{key} changed ({then} → {now})")
    if not recorded:
        reasons = ["it records no dependencies (made by an older sdi-pipeline)"]
    return "; ".join(reasons)


def read_attrs(path: Path, *names: str) -> dict[str, Any]:
    """JSON attributes ``names`` of an HDF5 file (missing ones absent); RunDirError if it
    cannot be read."""
    try:
        with h5py.File(path, "r") as f:
            out = {}
            for name in names:
                if name in f.attrs:
                    value = f.attrs[name]
                    out[name] = json.loads(value) if isinstance(value, str) else value
            return out
    except (OSError, ValueError) as err:
        raise RunDirError(
            f"{path} is not a readable HDF5 file (truncated or corrupt: {err})"
        ) from err


@dataclass
class UnitCheck:
    """The state of one unit: done, stale, corrupt or missing, and why."""

    state: str
    why: str = ""


def check_unit(
    run: RunPaths,
    name: str,
    *,
    checkpoint_sha: str | None = None,
    current: Mapping[str, Any] | None = None,
    read_header: bool = True,
) -> UnitCheck:
    """Whether unit ``name`` is done and still matches its inputs.

    Cheap checks always (marker readable, file present with the marker's size, marker's
    checkpoint sha256 against ``checkpoint_sha``); with ``read_header`` the file's recorded
    digest against its marker's; with ``current`` (the depends this run would record now)
    the recorded ones against them.
    """
    try:
        marker = run.read_marker(name)
    except RunDirError as err:
        return UnitCheck(CORRUPT, str(err))
    unit_file = run.unit_path_named(name)
    if marker is None:
        return UnitCheck(MISSING)
    if not unit_file.exists():
        return UnitCheck(MISSING, f"{unit_file} is missing (its marker is there)")
    attrs: dict[str, Any] = {}
    if read_header or current is not None:
        try:
            attrs = read_attrs(unit_file, "content_digest", "depends", "format_version")
        except RunDirError as err:
            return UnitCheck(CORRUPT, str(err))
    digest = marker.get("content_digest")
    if not isinstance(digest, str):
        return UnitCheck(
            STALE, "its marker records no content digest (made by an older sdi-pipeline)"
        )
    size = unit_file.stat().st_size
    if marker.get("file_size") != size:
        return UnitCheck(
            CORRUPT,
            f"{unit_file} has {size} bytes, its marker says {marker.get('file_size')} (truncated "
            "or overwritten)",
        )
    if checkpoint_sha is not None and marker.get("checkpoint_sha256") != checkpoint_sha:
        return UnitCheck(
            STALE,
            "its checkpoint changed ("
            f"{describe_change(marker.get('checkpoint_sha256'), checkpoint_sha)})",
        )
    if not attrs:
        return UnitCheck(DONE)
    version = attrs.get("format_version")
    if version != SKETCH_FORMAT_VERSION:
        return UnitCheck(
            STALE,
            f"it has format version {version}, this sdi-pipeline writes {SKETCH_FORMAT_VERSION}",
        )
    if attrs.get("content_digest") != digest:
        return UnitCheck(CORRUPT, f"{unit_file} is not the file its marker describes")
    if current is not None:
        recorded = attrs.get("depends")
        why = explain_stale(recorded if isinstance(recorded, Mapping) else {}, current)
        if why:
            return UnitCheck(STALE, why)
    return UnitCheck(DONE)


def query_digests(run: RunPaths, n_checkpoints: int) -> list[str] | None:
    """The content digests of the query files (None unless every one is there and readable):
    the identity of the query set the shards are scored against."""
    out = []
    for k in range(n_checkpoints):
        try:
            digest = read_attrs(run.query_path(k), "content_digest").get("content_digest")
        except RunDirError:
            return None
        if not isinstance(digest, str):
            return None
        out.append(digest)
    return out


def checkpoint_digests(run: RunPaths, paths: list[str]) -> list[str | None]:
    """Current sha256 of each checkpoint (None if missing), via the run's digest cache."""
    cache = DigestCache(run.digest_cache_path)
    out: list[str | None] = []
    for path in paths:
        try:
            out.append(cache.sha256(path))
        except OSError:
            out.append(None)
    return out


def results_inputs(f: h5py.File) -> dict[str, Any] | None:
    """What a results.h5 records it was made from (None for files without the record)."""
    group = f.get("inputs")
    if not isinstance(group, h5py.Group):
        return None

    def strings(name: str) -> list[str]:
        data = group.get(name)
        if not isinstance(data, h5py.Dataset):
            return []
        return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(data).tolist()]

    return {
        "units": dict(zip(strings("unit_names"), strings("unit_digests"), strict=False)),
        "shards": dict(zip(strings("shard_names"), strings("shard_digests"), strict=False)),
        "query": strings("query_digests"),
        "bif_query": strings("bif_query_digests"),
        "checkpoints": strings("checkpoint_paths"),
        "checkpoint_sha256": strings("checkpoint_sha256"),
        "config_hash": str(group.attrs.get("config_hash", "")),
        "data_files": json.loads(str(group.attrs.get("data_files", "{}"))),
    }


DATA_SPLITS = ("train", "query")


def record_data_files(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The identity of each data file the config names (``data`` is its ``data`` section),
    per split: ``{"files": [file_identity, ...]}`` for a ``path`` naming a file or a folder
    (each file inside, and the folder's listing), ``{"built_by": target}`` for a dataset
    built in code, whose inputs no config value names."""
    out: dict[str, dict[str, Any]] = {}
    for which in DATA_SPLITS:
        node = data.get(which)
        path = node.get("path") if isinstance(node, Mapping) else None
        root = Path(os.path.abspath(os.path.expanduser(path))) if isinstance(path, str) else None
        if root is None or not root.exists():
            target = node.get("_target_") if isinstance(node, Mapping) else None
            out[which] = {"built_by": str(target or type(node).__name__)}
            continue
        if root.is_dir():
            members = sorted(p for p in root.rglob("*") if p.is_file())
            out[which] = {
                "folder": str(root),
                "listing": [str(p.relative_to(root)) for p in members],
                "files": [file_identity(p) for p in members],
            }
        else:
            out[which] = {"files": [file_identity(root)]}
    return out


def data_file_changes(record: Mapping[str, Any]) -> list[str]:
    """Which recorded data files changed since :func:`record_data_files` (one stat each when
    none did)."""
    reasons = []
    for which, entry in record.items():
        if not isinstance(entry, Mapping):
            continue
        folder = entry.get("folder")
        if isinstance(folder, str) and Path(folder).is_dir():
            now = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
            if now != entry.get("listing"):
                reasons.append(f"data.{which} folder {folder} holds other files since the merge")
                continue
        for file in entry.get("files") or []:
            why = identity_change(file)
            if why:
                reasons.append(
                    f"data.{which} file {file.get('path')} changed since the merge ({why})"
                )
    return reasons


def results_staleness(results: Path, inputs: Mapping[str, Any] | None) -> list[str]:
    """Why results.h5 no longer matches its run directory's units and checkpoints (empty if
    it does, or if it is not inside a run directory)."""
    run = RunPaths(results.parent)
    if inputs is None:
        return ["it records no inputs (made by an older sdi-pipeline)"]
    # results.h5 reads its per-example datasets from the score shards beside it: a shard
    # missing or rewritten since the merge would show NaN or other numbers. This holds for
    # a copied results.h5 too (copy the scores/ folder with it).
    reasons = _shard_changes(run, inputs["shards"])
    if not run.hash_path.is_file():
        return reasons  # a copied results file: nothing else to compare it with
    try:
        stored = run.hash_path.read_text().strip()
    except OSError:
        stored = ""
    if stored != inputs["config_hash"]:
        reasons.append(
            f"the run's config hash is {stored}, results.h5 was made for {inputs['config_hash']}"
        )
    reasons += data_file_changes(inputs["data_files"])
    now = checkpoint_digests(run, list(inputs["checkpoints"]))
    for k, (path, then, sha) in enumerate(
        zip(inputs["checkpoints"], inputs["checkpoint_sha256"], now, strict=False)
    ):
        # A checkpoint deleted after the run (to save space) changes nothing: only one that is
        # there with other bytes makes the results stale.
        if sha is not None and sha != then:
            reasons.append(
                f"checkpoint {k} ({path}) changed since the merge ({describe_change(then, sha)})"
            )
    for name, digest in inputs["units"].items():
        try:
            marker = run.read_marker(name)
        except RunDirError:
            marker = {}
        if marker is None:
            reasons.append(f"unit {name} is no longer done")
        elif marker.get("content_digest") != digest:
            reasons.append(f"unit {name} was recomputed or damaged since the merge")
    for k, digest in enumerate(inputs["query"]):
        try:
            attrs = read_attrs(run.query_path(k), "content_digest")
        except RunDirError:
            attrs = {}
        if attrs.get("content_digest") != digest:
            reasons.append(f"the query sketches of checkpoint {k} changed since the merge")
    for k, digest in enumerate(inputs.get("bif_query", [])):
        try:
            attrs = read_attrs(run.bif_query_path(k), "content_digest")
        except RunDirError:
            attrs = {}
        if attrs.get("content_digest") != digest:
            reasons.append(f"the BIF query traces of checkpoint {k} changed since the merge")
    return reasons


def _shard_changes(run: RunPaths, shards: Mapping[str, str]) -> list[str]:
    missing, changed, damaged = [], [], []
    for name, digest in shards.items():
        path = run.scores_dir / f"{name}.h5"
        if not path.exists():
            missing.append(name)
            continue
        try:
            attrs = read_attrs(path, "content_digest")
        except RunDirError:
            damaged.append(name)
            continue
        if attrs.get("content_digest") != digest:
            changed.append(name)
    out = []
    if damaged:
        out.append(
            f"{len(damaged)} score shard(s) it reads are damaged (not a readable HDF5 file, "
            f"truncated or overwritten: {run.scores_dir / damaged[0]}.h5)"
        )
    if missing:
        out.append(
            f"{len(missing)} score shard(s) it reads are missing from {run.scores_dir} "
            f"(e.g. {missing[0]}.h5; a copied results.h5 needs the scores/ folder beside it)"
        )
    if changed:
        out.append(f"{len(changed)} score shard(s) were recomputed since the merge ({changed[0]})")
    return out


def stale_message(results: Path, reasons: list[str]) -> str:
    """One line: results.h5 is stale, the first reasons, and the fix."""
    shown = "; ".join(reasons[:3]) + (f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else "")
    return (
        f"{results} is stale: {shown}. Run the same sdi-attribute command again (or the jobs, "
        "then sdi-merge) to recompute what changed"
    )
