"""HDF5 sketch files, format v2 (see docs/format.md): written atomically, read strictly.

A sketch file holds the features of a contiguous block of examples at one checkpoint:
``indices`` (n,) int64 global example indices, ``sketch`` (n, slots, m) -- or (n, m) when
the train side is stored summed over slots -- and ``loss`` (n,). Its attributes say what made
it: sketch spec, analysed parameters, slot layout, checkpoint (path, size, sha256, eta),
config hash, package version, and ``depends`` -- everything the sketches depend on (checkpoint
sha256, digest of the examples, spec, targets, parameters, format) -- with its digest
``content_digest``, the file's content address: a file whose ``depends`` differ from the
current ones is stale and is recomputed, never reused.

Every dataset is chunked and carries an HDF5 Fletcher-32 checksum, verified on every read.
The file is built in memory and written through :mod:`sdi_pipeline.files.atomic` (temporary name,
then rename), with no timestamps inside, so the same work written twice gives identical
bytes, and a full disk or read-only folder is one clear error, never a half-written file.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from sdi_pipeline.errors import DataError, RunDirError
from sdi_pipeline.files.atomic import write_bytes_atomic
from sdi_pipeline.run.layout import SKETCH_FORMAT, SKETCH_FORMAT_VERSION

FORMAT = SKETCH_FORMAT
FORMAT_VERSION = SKETCH_FORMAT_VERSION
# Attributes that must agree between train units and the query file of a checkpoint.
MATCHING_KEYS = ("spec", "params", "checkpoint", "train_hash", "layout")
# Rows per HDF5 chunk: the merge reads whole files, so chunks only need to be moderate.
CHUNK_ROWS = 64
# Attributes stored as plain values; every other attribute is a JSON string.
_PLAIN = ("format", "format_version", "package_version", "dtype")


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


def _redo_hint(path: Path) -> str:
    job = "sdi-query" if path.parent.name == "query" else "sdi-worker"
    return (
        f"run the same sdi-attribute command again (or the {job} that wrote it): it is recomputed"
    )


def write_sketch_file(
    path: Path,
    indices: torch.Tensor,
    sketch: torch.Tensor,
    loss: torch.Tensor,
    meta: dict[str, Any],
    dtype: str = "float32",
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a sketch file atomically (built in memory, then a temporary name and rename).

    ``meta`` values must be JSON-serialisable; each becomes one attribute. ``extra``:
    further per-example datasets (a query file's per-token features and positions). Values
    that are not finite after conversion to ``dtype`` (float16 overflow) are refused.
    """
    values = sketch.detach().cpu().numpy().astype(dtype)
    losses = loss.detach().cpu().numpy().astype(np.float32)
    extras = {}
    for name, tensor in sorted((extra or {}).items()):
        data = tensor.detach().cpu().numpy()
        extras[name] = data.astype(dtype) if data.dtype.kind == "f" else data
    for name, data in (("sketch", values), *extras.items()):
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            bad = int((~np.isfinite(data)).sum())
            raise DataError(
                f"{bad} {name} values of {path.name} are not finite in {dtype} (they overflow "
                "it): use sketch.dtype=float32"
            )
    if not np.isfinite(losses).all():
        raise DataError(f"the losses of {path.name} are not all finite")
    rows = max(1, min(CHUNK_ROWS, values.shape[0]))
    image = io.BytesIO()
    with h5py.File(image, "w", track_order=False) as f:
        for name, data in (
            ("indices", indices.cpu().numpy().astype(np.int64)),
            ("sketch", values),
            ("loss", losses),
            *extras.items(),
        ):
            f.create_dataset(
                name,
                data=data,
                chunks=(rows, *data.shape[1:]),
                fletcher32=True,
                track_times=False,
            )
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["package_version"] = _package_version()
        f.attrs["dtype"] = dtype
        for key, value in sorted(meta.items()):
            f.attrs[key] = json.dumps(value, sort_keys=True)
    write_bytes_atomic(path, image.getbuffer())


class CorruptFile(RunDirError):
    """A sketch file that cannot be read back as written; ``what`` says how, without the fix."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, f"{path} {what}"
        super().__init__(f"{self.what}; {_redo_hint(path)}")


def _unreadable(path: Path, err: BaseException) -> CorruptFile:
    text = " ".join(str(err).split())
    if "filter returned failure" in text or "checksum" in text.lower():
        return CorruptFile(path, "is corrupt: its data fails the Fletcher-32 checksum")
    return CorruptFile(path, f"is not a readable HDF5 file (truncated or corrupt: {text})")


def read_meta(path: Path) -> dict[str, Any]:
    """The attributes of a sketch file; refuses files that are not complete format v2."""
    try:
        with h5py.File(path, "r") as f:
            return _meta(f, path)
    except OSError as err:
        raise _unreadable(path, err) from err


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
        raise RunDirError(f"{path} is not an sdi-pipeline sketch file; delete it")
    version = int(f.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise RunDirError(
            f"{path} has sketch format version {version}; this sdi-pipeline reads version "
            f"{FORMAT_VERSION}: {_redo_hint(path)}"
        )
    indices, sketch, loss = (dataset(f, name) for name in ("indices", "sketch", "loss"))
    meta: dict[str, Any] = {}
    for key, value in f.attrs.items():
        if key in _PLAIN:
            meta[key] = value.item() if isinstance(value, np.generic) else value
        else:
            try:
                meta[key] = json.loads(value)
            except (TypeError, ValueError) as err:
                raise RunDirError(
                    f"{path} has a damaged attribute '{key}': {_redo_hint(path)}"
                ) from err
    n = indices.shape[0]
    if sketch.shape[0] != n or loss.shape[0] != n:
        raise RunDirError(f"{path} has datasets of different lengths: the file is corrupt")
    meta["n"] = int(n)
    meta["sketch_shape"] = tuple(int(s) for s in sketch.shape)
    return meta


def _check_finite(path: Path, sketch: np.ndarray, loss: np.ndarray) -> None:
    if not (np.isfinite(sketch).all() and np.isfinite(loss).all()):
        raise CorruptFile(path, "is corrupt: it holds NaN or inf values")


def read_sketch_file(path: Path) -> SketchFile:
    """Read a whole sketch file (sketch values as float32), checksums and values verified."""
    try:
        with h5py.File(path, "r") as f:
            meta = _meta(f, path)
            extra = {
                name: np.asarray(dataset(f, name)[...])
                for name in sorted(f)
                if name not in ("indices", "sketch", "loss")
            }
            out = SketchFile(
                np.asarray(dataset(f, "indices")[...]),
                np.asarray(dataset(f, "sketch")[...], dtype=np.float32),
                np.asarray(dataset(f, "loss")[...]),
                meta,
                {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in extra.items()},
            )
    except OSError as err:
        raise _unreadable(path, err) from err
    _check_finite(path, out.sketch, out.loss)
    if "token_sketch" in out.extra:
        _check_finite(path, out.extra["token_sketch"], out.loss)
    return out


def verify_sketch_file(path: Path) -> dict[str, Any]:
    """Read every value of a sketch file: checksums, finiteness; returns its attributes."""
    return read_sketch_file(path).meta


class UnitReader:
    """Reads the values of validated sketch files into one reused buffer.

    Scoring reads every unit once, whole, with the attributes it checks against the query
    files (:data:`MATCHING_KEYS`) from the same open; reusing one buffer avoids the page
    faults of a fresh multi-MiB array per file. The returned array is overwritten by the
    next read. Checksums are verified by HDF5 and values checked to be finite: a corrupt
    file is a RunDirError naming it.
    """

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.float32)

    def read(self, path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(sketch as float32, loss, the :data:`MATCHING_KEYS` attributes) of ``path``."""
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
                losses = np.asarray(loss[...])
                attrs = {k: json.loads(str(f.attrs[k])) for k in MATCHING_KEYS if k in f.attrs}
        except OSError as err:
            raise _unreadable(path, err) from err
        except (TypeError, ValueError) as err:
            raise RunDirError(f"{path} has a damaged attribute: {_redo_hint(path)}") from err
        _check_finite(path, out, losses)
        return out, losses, attrs


def describe_mismatch(unit: dict[str, Any], query: dict[str, Any]) -> list[str]:
    """What differs between a train unit's and the query file's attributes (empty if none)."""
    diffs = []
    for key in MATCHING_KEYS:
        if unit.get(key) != query.get(key):
            diffs.append(f"{key}: unit {unit.get(key)} vs query {query.get(key)}")
    return diffs
