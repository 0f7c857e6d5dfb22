"""HDF5 sketch files, format v1 (see docs/format.md): writing atomically, reading strictly.

A sketch file holds the features of a contiguous block of examples at one checkpoint:
``indices`` (n,) int64 global example indices, ``sketch`` (n, slots, m) -- or (n, m) when
the train side is stored summed over slots -- and ``loss`` (n,). Its attributes say what made
it: sketch spec, analysed parameters, slot layout, checkpoint (path, size, sha256, eta),
config hash and package version. Files are written under a temporary name and renamed when
complete, with no timestamps inside, so the same work written twice gives identical bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from sdi_pipeline.atomic import atomic_path
from sdi_pipeline.errors import RunDirError

FORMAT = "sdi-pipeline/sketches"
FORMAT_VERSION = 1
# Attributes that must agree between train units and the query file of a checkpoint.
MATCHING_KEYS = ("spec", "params", "checkpoint", "train_hash", "layout")
# Rows per HDF5 chunk: the merge reads whole files, so chunks only need to be moderate.
CHUNK_ROWS = 64


@dataclass
class SketchFile:
    """The contents of one sketch file."""

    indices: np.ndarray  # (n,) int64
    sketch: np.ndarray  # (n, slots, m) or (n, m)
    loss: np.ndarray  # (n,) float32
    meta: dict[str, Any]
    # Query files with per-token features: "token_sketch" (n, slots, P, m) and
    # "token_positions" (n, P).
    extra: dict[str, np.ndarray]


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdi-pipeline")
    except PackageNotFoundError:
        return "unknown"


def write_sketch_file(
    path: Path,
    indices: torch.Tensor,
    sketch: torch.Tensor,
    loss: torch.Tensor,
    meta: dict[str, Any],
    dtype: str = "float32",
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a sketch file atomically: a temporary name in the same folder, then rename.

    ``meta`` values must be JSON-serialisable; each becomes one attribute. ``extra``:
    further per-example datasets (a query file's per-token features and positions).
    """
    values = sketch.detach().cpu().numpy().astype(dtype)
    rows = max(1, min(CHUNK_ROWS, values.shape[0]))
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=False) as f:
        f.create_dataset("indices", data=indices.cpu().numpy().astype(np.int64), track_times=False)
        f.create_dataset("sketch", data=values, chunks=(rows, *values.shape[1:]), track_times=False)
        f.create_dataset(
            "loss", data=loss.detach().cpu().numpy().astype(np.float32), track_times=False
        )
        for name, tensor in sorted((extra or {}).items()):
            data = tensor.detach().cpu().numpy()
            if data.dtype.kind == "f":
                data = data.astype(dtype)
            f.create_dataset(name, data=data, chunks=(rows, *data.shape[1:]), track_times=False)
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["package_version"] = _package_version()
        f.attrs["dtype"] = dtype
        for key, value in sorted(meta.items()):
            f.attrs[key] = json.dumps(value, sort_keys=True)


def read_meta(path: Path) -> dict[str, Any]:
    """The attributes of a sketch file; refuses files that are not complete format v1."""
    try:
        with h5py.File(path, "r") as f:
            return _meta(f, path)
    except OSError as err:
        raise RunDirError(
            f"{path} is not a readable HDF5 file (truncated or corrupt: {err}); delete it and "
            "its completion marker, then rerun the job that wrote it"
        ) from err


def dataset(group: h5py.Group, name: str) -> h5py.Dataset:
    """The dataset ``name`` of ``group``; anything else there is a corrupt file."""
    obj = group.get(name)
    if not isinstance(obj, h5py.Dataset):
        raise RunDirError(
            f"{group.file.filename} lacks the dataset '{name}': the file is incomplete"
        )
    return obj


def _meta(f: h5py.File, path: Path) -> dict[str, Any]:
    if f.attrs.get("format") != FORMAT:
        raise RunDirError(f"{path} is not an sdi-pipeline sketch file")
    version = int(f.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise RunDirError(
            f"{path} has sketch format version {version}; this sdi-pipeline reads version "
            f"{FORMAT_VERSION}"
        )
    indices, sketch, loss = (dataset(f, name) for name in ("indices", "sketch", "loss"))
    meta: dict[str, Any] = {}
    for key, value in f.attrs.items():
        if key in ("format", "format_version", "package_version", "dtype"):
            meta[key] = value.item() if isinstance(value, np.generic) else value
        else:
            meta[key] = json.loads(value)
    n = indices.shape[0]
    if sketch.shape[0] != n or loss.shape[0] != n:
        raise RunDirError(f"{path} has datasets of different lengths: the file is corrupt")
    meta["n"] = int(n)
    meta["sketch_shape"] = tuple(int(s) for s in sketch.shape)
    return meta


def read_sketch_file(path: Path) -> SketchFile:
    """Read a whole sketch file (sketch values as float32)."""
    try:
        with h5py.File(path, "r") as f:
            meta = _meta(f, path)
            extra = {
                name: np.asarray(dataset(f, name)[...])
                for name in sorted(f)
                if name not in ("indices", "sketch", "loss")
            }
            return SketchFile(
                np.asarray(dataset(f, "indices")[...]),
                np.asarray(dataset(f, "sketch")[...], dtype=np.float32),
                np.asarray(dataset(f, "loss")[...]),
                meta,
                {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in extra.items()},
            )
    except OSError as err:
        raise RunDirError(
            f"{path} is not a readable HDF5 file (truncated or corrupt: {err}); delete it and "
            "its completion marker, then rerun the job that wrote it"
        ) from err


class UnitReader:
    """Reads the values of validated sketch files into one reused buffer.

    The merge reads every unit once, whole: attributes were checked during validation, and
    reusing one buffer avoids the page faults of a fresh multi-MiB array per file. The
    returned array is overwritten by the next read.
    """

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.float32)

    def read(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """(sketch as float32, loss) of the file at ``path``."""
        try:
            # No chunk cache: every chunk is read exactly once, straight into the buffer.
            with h5py.File(path, "r", rdcc_nbytes=0) as f:
                sketch, loss = dataset(f, "sketch"), dataset(f, "loss")
                n = int(np.prod(sketch.shape))
                if self._buf.size < n:
                    self._buf = np.empty(n, dtype=np.float32)
                out = self._buf[:n].reshape(sketch.shape)
                if sketch.dtype == np.float32:
                    sketch.read_direct(out)
                else:
                    out[...] = sketch[...]
                return out, np.asarray(loss[...])
        except OSError as err:
            raise RunDirError(f"{path} became unreadable during the merge: {err}") from err


def describe_mismatch(unit: dict[str, Any], query: dict[str, Any]) -> list[str]:
    """What differs between a train unit's and the query file's attributes (empty if none)."""
    diffs = []
    for key in MATCHING_KEYS:
        if unit.get(key) != query.get(key):
            diffs.append(f"{key}: unit {unit.get(key)} vs query {query.get(key)}")
    return diffs
