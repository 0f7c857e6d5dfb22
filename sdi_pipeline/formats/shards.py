"""Score shards, format v1 (see docs/format.md): one block's scores against the query set.

A worker (or ``sdi-score``, or the merge for blocks nobody scored) contracts the train
sketches of one block of training examples at *every* checkpoint with the query sketches
and writes ``scores/block-XXXXX.h5``. Because the block holds the sum over checkpoints,
everything in it is exact for the block and combines exactly across blocks:

- rows of TracIn ``tracin`` (n, M), and when kept SDI ``sdi`` (n, M, S_q), the step matrix
  ``sdi_matrix`` (n, M, S_tr, S_q) and SDI per query token ``sdi_tokens`` (n, M, S_q, P):
  the reduce stitches them into results.h5 as HDF5 virtual datasets, never copying them;
- the block's own top-k per query (``topk/<scope>/<sign>/{indices,scores}``, global train
  indices): the global top-k is the top-k of the blocks' top-k;
- sums over the block's examples in float64 (``sums/``: energy and signed SDI per query
  slot, per token, the train sketch norms per checkpoint and slot): the global sums add up;
- ``train_loss`` (K, n).

The attributes say what made it: ``depends`` (the block, the depends record of each
checkpoint's train unit, the query files' content digests, what is kept) and its digest
``content_digest``. Like sketch files it is built in memory with no timestamps and written
under a temporary name, then renamed: the file is its own completion record.

Light to import: numpy and h5py only.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from sdi_pipeline.errors import RunDirError
from sdi_pipeline.files.atomic import write_bytes_atomic
from sdi_pipeline.run.layout import RunPaths

SHARD_FORMAT = "sdi-pipeline/scores"
SHARD_FORMAT_VERSION = 1
# Per-example datasets, in the order results.h5 lists them.
ROW_DATASETS = ("tracin", "sdi", "sdi_matrix", "sdi_tokens")
# Rows per HDF5 chunk of the per-example datasets (read through results.h5 by rows).
CHUNK_ROWS = 256


@dataclass
class BlockScores:
    """What one block contributes to results.h5 (see the module docstring)."""

    rows: dict[str, np.ndarray]  # ROW_DATASETS present, float32, first axis n
    train_loss: np.ndarray  # (K, n) float32
    # "overall/positive", "per_step/negative", "per_token/positive", ... -> (indices, scores)
    topk: dict[str, tuple[np.ndarray, np.ndarray]]
    sums: dict[str, np.ndarray]  # float64
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardSummary:
    """The small part of a shard the reduce reads: attributes, top-k, sums, row shapes."""

    meta: dict[str, Any]
    topk: dict[str, tuple[np.ndarray, np.ndarray]]
    sums: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]


class CorruptShard(RunDirError):
    """A score shard that cannot be read back as written; ``what`` says how."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, f"{path} {what}"
        super().__init__(
            f"{self.what}; run the same sdi-attribute command again (or sdi-merge): it is rescored"
        )


def write_shard(path: Path, scores: BlockScores) -> None:
    """Write a score shard atomically; every dataset carries a Fletcher-32 checksum."""
    image = io.BytesIO()
    with h5py.File(image, "w", track_order=False) as f:

        def put(group: h5py.Group, name: str, data: np.ndarray, rows: int | None = None) -> None:
            array = np.ascontiguousarray(data)
            if array.size == 0:  # an empty chunk cannot exist; nothing to checksum either
                group.create_dataset(name, data=array, track_times=False)
                return
            chunks = True if rows is None else (max(1, min(rows, array.shape[0])), *array.shape[1:])
            group.create_dataset(
                name, data=array, chunks=chunks, fletcher32=True, track_times=False
            )

        for name in ROW_DATASETS:
            if name in scores.rows:
                put(f, name, scores.rows[name].astype(np.float32, copy=False), CHUNK_ROWS)
        put(f, "train_loss", scores.train_loss.astype(np.float32, copy=False))
        for key, (indices, values) in sorted(scores.topk.items()):
            group = f.require_group(f"topk/{key}")
            put(group, "indices", indices.astype(np.int64, copy=False))
            put(group, "scores", values.astype(np.float32, copy=False))
        sums = f.require_group("sums")
        for name, values in sorted(scores.sums.items()):
            put(sums, name, values.astype(np.float64, copy=False))
        f.attrs["format"] = SHARD_FORMAT
        f.attrs["format_version"] = SHARD_FORMAT_VERSION
        for key, value in sorted(scores.meta.items()):
            f.attrs[key] = json.dumps(value, sort_keys=True)
    write_bytes_atomic(path, image.getbuffer())


def _unreadable(path: Path, err: BaseException) -> CorruptShard:
    text = " ".join(str(err).split())
    if "filter returned failure" in text or "checksum" in text.lower():
        return CorruptShard(path, "is corrupt: its data fails the Fletcher-32 checksum")
    return CorruptShard(path, f"is not a readable HDF5 file (truncated or corrupt: {text})")


def _meta(f: h5py.File, path: Path) -> dict[str, Any]:
    if f.attrs.get("format") != SHARD_FORMAT:
        raise CorruptShard(path, "is not an sdi-pipeline score shard")
    version = int(f.attrs.get("format_version", -1))
    if version != SHARD_FORMAT_VERSION:
        raise CorruptShard(
            path, f"has score format {version}; this sdi-pipeline writes {SHARD_FORMAT_VERSION}"
        )
    meta: dict[str, Any] = {}
    for key, value in f.attrs.items():
        if key in ("format", "format_version"):
            continue
        try:
            meta[key] = json.loads(value)
        except (TypeError, ValueError) as err:
            raise CorruptShard(path, f"has a damaged attribute '{key}'") from err
    return meta


def read_shard_meta(path: Path) -> dict[str, Any]:
    """A shard's attributes (its header only); CorruptShard if it cannot be read."""
    try:
        with h5py.File(path, "r") as f:
            return _meta(f, path)
    except OSError as err:
        raise _unreadable(path, err) from err


def read_shard_summary(path: Path) -> ShardSummary:
    """The attributes, top-k and sums of a shard (checksums and values verified) and the
    shapes of its per-example datasets -- everything but those datasets' values."""
    try:
        with h5py.File(path, "r") as f:
            meta = _meta(f, path)
            topk: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            top = f.get("topk")
            if isinstance(top, h5py.Group):
                for scope in top:
                    for sign in top[scope]:  # type: ignore[union-attr]
                        group = top[f"{scope}/{sign}"]
                        assert isinstance(group, h5py.Group)
                        topk[f"{scope}/{sign}"] = (
                            np.asarray(group["indices"]),
                            np.asarray(group["scores"]),
                        )
            sums_group = f.get("sums")
            sums = (
                {str(name): np.asarray(sums_group[name]) for name in sums_group}
                if isinstance(sums_group, h5py.Group)
                else {}
            )
            shapes = {
                name: tuple(int(s) for s in f[name].shape)  # type: ignore[union-attr]
                for name in (*ROW_DATASETS, "train_loss")
                if name in f
            }
    except OSError as err:
        raise _unreadable(path, err) from err
    for name, values in [*sums.items(), *((k, v[1]) for k, v in topk.items())]:
        if not np.isfinite(values).all():
            raise CorruptShard(path, f"is corrupt: {name} holds NaN or inf values")
    return ShardSummary(meta, topk, sums, shapes)


def shard_matches(path: Path, query_digests: list[str]) -> bool:
    """Cheap check (its header): the shard exists and was scored against these query files.

    The launchers use it to see which blocks are left; the jobs check everything else."""
    if not path.exists():
        return False
    try:
        meta = read_shard_meta(path)
    except RunDirError:
        return False
    depends = meta.get("depends")
    return isinstance(depends, Mapping) and depends.get("query") == query_digests


def block_done(run: RunPaths, block: Any, store_train: bool, queries: list[str] | None) -> bool:
    """Cheap check (markers, a header): whether ``block`` needs no more work -- its units
    stored (with ``store_train``) and its shard scored against the query files ``queries``
    (None: they are not there yet, so it is not). The jobs check everything."""
    if store_train and not all(run.unit_done(u.name) for u in block.units):
        return False
    return queries is not None and shard_matches(run.shard_path(block.index), queries)
