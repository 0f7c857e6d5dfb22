"""BIF files, format v1 (see docs/format.md): loss traces and BIF score shards.

Three kinds, one layout: an HDF5 file of named datasets (each Fletcher-32 checked) and JSON
attributes, with ``format``, ``format_version`` and ``kind`` saying what it is.

- ``bif-query`` (``query/bif-ckpt-KKK.h5``): the queries' loss traces at every draw of every
  chain at one checkpoint, ``traces/loss`` (C, D, M, K) and, with ``analysis.loop_trace``,
  ``traces/loop`` (C, D, M, τ); the chains' ``step_losses`` (C, steps) float64 and ``llc``
  (C,) float64; attributes ``init_loss``, ``chain_seeds``, ``depends``, ``content_digest``.
- ``bif-train`` (``units/bif-ckpt-KKK_chain-CCC_block-BBBBB.h5``): one chain's traces of one
  block of training examples, ``traces/loss`` (1, D, n, K).
- ``bif-scores`` (``scores/bif-block-BBBBB.h5``): a block's BIF rows (``bif`` (n, M),
  ``bif_checkpoints`` (n, K, M), and where kept ``bif_query_tokens`` (n, M, T),
  ``bif_loop_steps`` (n, M, τ), ``bif_token_pairs`` (n, M, T, T)) and its own top-k per
  query (``topk/<sign>/{indices,scores}``).

Files are built in memory with no timestamps and renamed into place: the same inputs give
the same bytes, and a reader never sees a partial file. Reading is strict: wrong format,
version or kind, a failed checksum or a NaN are one :class:`CorruptBifFile` error.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from sdi_pipeline.errors import RunDirError
from sdi_pipeline.files.atomic import write_bytes_atomic

BIF_FORMAT = "sdi-pipeline/bif"
BIF_FORMAT_VERSION = 1
KINDS = ("bif-query", "bif-train", "bif-scores")


@dataclass
class BifFile:
    """A BIF file's datasets (by path inside the file) and attributes (JSON-decoded)."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


class CorruptBifFile(RunDirError):
    """A BIF file that cannot be read back as written; ``what`` says how."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, f"{path} {what}"
        super().__init__(f"{self.what}; run the same sdi-attribute command again: it is recomputed")


def write_bif_file(
    path: Path, kind: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> None:
    """Write a BIF file of ``kind`` atomically (temporary name, then rename)."""
    if kind not in KINDS:
        raise ValueError(f"unknown BIF file kind {kind!r}")
    image = io.BytesIO()
    with h5py.File(image, "w", track_order=False) as f:
        for name, data in sorted(arrays.items()):
            array = np.ascontiguousarray(data)
            if array.size == 0:
                f.create_dataset(name, data=array, track_times=False)
            else:
                f.create_dataset(name, data=array, chunks=True, fletcher32=True, track_times=False)
        f.attrs["format"] = BIF_FORMAT
        f.attrs["format_version"] = BIF_FORMAT_VERSION
        f.attrs["kind"] = kind
        for key, value in sorted(meta.items()):
            f.attrs[key] = json.dumps(value, sort_keys=True)
    write_bytes_atomic(path, image.getbuffer())


def _header(f: h5py.File, path: Path, kind: str) -> dict[str, Any]:
    if f.attrs.get("format") != BIF_FORMAT:
        raise CorruptBifFile(path, "is not an sdi-pipeline BIF file")
    version = int(f.attrs.get("format_version", -1))
    if version != BIF_FORMAT_VERSION:
        raise CorruptBifFile(
            path, f"has BIF format {version}; this sdi-pipeline writes {BIF_FORMAT_VERSION}"
        )
    if f.attrs.get("kind") != kind:
        raise CorruptBifFile(path, f"holds {f.attrs.get('kind')!r}, not {kind!r}")
    meta: dict[str, Any] = {}
    for key, value in f.attrs.items():
        if key in ("format", "format_version", "kind"):
            continue
        try:
            meta[key] = json.loads(value)
        except (TypeError, ValueError) as err:
            raise CorruptBifFile(path, f"has a damaged attribute '{key}'") from err
    return meta


def _unreadable(path: Path, err: BaseException) -> CorruptBifFile:
    text = " ".join(str(err).split())
    if "filter returned failure" in text or "checksum" in text.lower():
        return CorruptBifFile(path, "is corrupt: its data fails the Fletcher-32 checksum")
    return CorruptBifFile(path, f"is not a readable HDF5 file (truncated or corrupt: {text})")


def read_bif_meta(path: Path, kind: str) -> dict[str, Any]:
    """A BIF file's attributes (its header only); CorruptBifFile if it cannot be read."""
    try:
        with h5py.File(path, "r") as f:
            return _header(f, path, kind)
    except OSError as err:
        raise _unreadable(path, err) from err


def read_bif_file(path: Path, kind: str) -> BifFile:
    """Every dataset and attribute of a BIF file of ``kind``, checksums and values verified
    (no NaN or inf: traces and scores are finite when written)."""
    arrays: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as f:
            meta = _header(f, path, kind)

            def visit(name: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset):
                    arrays[name] = np.asarray(obj)

            f.visititems(visit)
    except OSError as err:
        raise _unreadable(path, err) from err
    for name, values in arrays.items():
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise CorruptBifFile(path, f"is corrupt: {name} holds NaN or inf values")
    return BifFile(arrays, meta)
