"""Token datasets for language models, read from common on-disk formats, and a padding collate.

``token_dataset`` is the Hydra target for ``data.train`` / ``data.query``::

    data:
      train: {_target_: sdi_pipeline.inputs.data.token_dataset, path: train.h5, limit: 10000}
      collate: {_target_: sdi_pipeline.inputs.data.PadCollate, pad_id: 0}

Each item is ``{"input_ids": LongTensor (T_i,)}``. Large files are read lazily (``.npy`` is
memory-mapped, ``.h5`` is read row by row, ``.jsonl`` is indexed by line offsets), and every
dataset pickles without open file handles, so DataLoader workers reopen files for themselves.
"""

from __future__ import annotations

import importlib
import json
import operator
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import default_collate

from sdi_pipeline.errors import ConfigError, DataError

FORMATS = ("npy", "pt", "h5", "hf", "jsonl")
_ALIASES = {"hdf5": "h5", "json": "jsonl", "datasets": "hf", "pth": "pt"}
_SUFFIXES = {
    ".npy": "npy",
    ".pt": "pt",
    ".pth": "pt",
    ".h5": "h5",
    ".hdf5": "h5",
    ".jsonl": "jsonl",
    ".json": "jsonl",
}
_HF_MARKERS = ("dataset_info.json", "state.json")


class _RowSource(Protocol):
    """Where rows come from: ``len`` rows, each a 1-D int64 tensor."""

    def __len__(self) -> int: ...

    def row(self, i: int) -> torch.Tensor: ...


def _as_token_row(value: Any, where: str) -> torch.Tensor:
    """One row as a fresh 1-D int64 tensor; a DataError if it is not 1-D integers."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise DataError(f"{where} holds {value.dtype} values; token ids must be integers")
        if value.dim() != 1:
            raise DataError(f"{where} is {value.dim()}-D; each sequence must be 1-D token ids")
        return value.to(torch.int64, copy=True)
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as err:  # ragged nested lists and the like
        raise DataError(f"{where} is not a flat list of token ids ({err})") from err
    if arr.size == 0:
        # json's [] parses as float64; an empty sequence is still a valid (empty) row.
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise DataError(f"{where} holds {arr.dtype} values; token ids must be integers")
    if arr.ndim != 1:
        raise DataError(f"{where} is {arr.ndim}-D; each sequence must be 1-D token ids")
    return torch.from_numpy(np.array(arr, dtype=np.int64, copy=True))


def _check_int_dtype(dtype: np.dtype[Any] | torch.dtype, where: str) -> None:
    if isinstance(dtype, torch.dtype):
        bad = dtype.is_floating_point or dtype.is_complex or dtype == torch.bool
    else:
        bad = dtype.kind not in "iu"
    if bad:
        raise DataError(f"{where} holds {dtype} values; token ids must be integers")


def _check_2d(shape: Sequence[int], where: str) -> None:
    if len(shape) != 2:
        raise DataError(
            f"{where} has shape {tuple(shape)}; expected a 2-D (N, T) array of token ids"
        )


# --- sources ----------------------------------------------------------------------------------


class _NpySource:
    """A 2-D integer ``.npy`` array, memory-mapped on first use in each process."""

    def __init__(self, path: Path, n_rows: int) -> None:
        self.path = path
        self.n_rows = n_rows
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n_rows

    def row(self, i: int) -> torch.Tensor:
        array = self._array
        if array is None:
            array = self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return torch.from_numpy(np.array(array[i], dtype=np.int64, copy=True))

    def __getstate__(self) -> dict[str, Any]:
        # A pickled memmap would carry the whole array; workers remap the file instead.
        return {**self.__dict__, "_array": None}


class _InMemorySource:
    """A 2-D integer tensor or a list of 1-D integer sequences already in memory."""

    def __init__(self, rows: torch.Tensor | Sequence[Any], where: str) -> None:
        self.rows = rows
        self.where = where

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> torch.Tensor:
        return _as_token_row(self.rows[i], f"{self.where} row {i}")


class _H5Source:
    """A 2-D integer HDF5 dataset, read row by row through a per-process file handle."""

    def __init__(self, path: Path, key: str, n_rows: int) -> None:
        self.path = path
        self.key = key
        self.n_rows = n_rows
        self._file: Any = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.n_rows

    def row(self, i: int) -> torch.Tensor:
        # h5py handles must not cross a fork: reopen in each process that reads.
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return torch.from_numpy(np.asarray(self._file[self.key][i], dtype=np.int64))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_pid": None}


class _JsonlSource:
    """JSON Lines, indexed by byte offset; a line is parsed only when its row is asked for."""

    def __init__(self, path: Path, column: str, offsets: np.ndarray, line_numbers: np.ndarray):
        self.path = path
        self.column = column
        self.offsets = offsets
        self.line_numbers = line_numbers
        self._file: Any = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def row(self, i: int) -> torch.Tensor:
        # A file object inherited over fork shares its position with the parent; reopen.
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.path, "rb")  # noqa: SIM115 (kept open across calls)
            self._pid = os.getpid()
        self._file.seek(int(self.offsets[i]))
        line = self._file.readline()
        where = f"{self.path} line {int(self.line_numbers[i])}"
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(
                f"{where} is not valid JSON ({err.__class__.__name__}: {err}); "
                "expected one JSON object per line (JSON Lines)"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{where} is a JSON {type(obj).__name__}, not an object; expected one object "
                f"per line with a '{self.column}' list"
            )
        if self.column not in obj:
            keys = ", ".join(sorted(obj)) or "none"
            raise DataError(f"{where} has no column '{self.column}' (its keys: {keys})")
        return _as_token_row(obj[self.column], f"{where} column '{self.column}'")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_pid": None}


class _HFSource:
    """One column of a Hugging Face ``datasets.Dataset`` (memory-mapped Arrow on disk)."""

    def __init__(self, dataset: Any, column: str, where: str) -> None:
        self.dataset = dataset
        self.column = column
        self.where = where

    def __len__(self) -> int:
        return len(self.dataset)

    def row(self, i: int) -> torch.Tensor:
        return _as_token_row(self.dataset[i][self.column], f"{self.where} row {i}")


# --- loaders ----------------------------------------------------------------------------------


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if any((path / m).is_file() for m in _HF_MARKERS):
            return "hf"
        if (path / "dataset_dict.json").is_file():
            return "hf"  # _load_hf explains that one split must be chosen
        raise DataError(
            f"cannot tell the format of directory {path}: it is not a Hugging Face dataset "
            f"saved with save_to_disk (no {' or '.join(_HF_MARKERS)}); point path at a file"
        )
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {path} from its suffix '{path.suffix}'; use one of "
            f"{', '.join(_SUFFIXES)} or set format= to one of {', '.join(FORMATS)}"
        )
    return fmt


def _load_npy(path: Path, allow_pickle: bool) -> _RowSource:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # no public reader for newer headers; the array itself is still lazy
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
                shape, dtype = arr.shape, arr.dtype
    except (ValueError, OSError) as err:
        raise DataError(f"{path} is not a readable .npy file ({err})") from err
    if dtype.hasobject:
        return _load_ragged_npy(path, shape, allow_pickle)
    _check_int_dtype(dtype, str(path))
    _check_2d(shape, str(path))
    return _NpySource(path, shape[0])


def _load_ragged_npy(path: Path, shape: tuple[int, ...], allow_pickle: bool) -> _RowSource:
    if not allow_pickle:
        raise DataError(
            f"{path} is an object array (ragged sequences), which numpy stores with pickle; "
            "loading it can run arbitrary code. If you trust the file, pass allow_pickle=True "
            "(or save a 2-D padded array, .h5 or .jsonl instead)"
        )
    if len(shape) != 1:
        raise DataError(
            f"{path} is a {len(shape)}-D object array; ragged sequences must be a 1-D object "
            "array of 1-D integer arrays"
        )
    try:
        rows = np.load(path, allow_pickle=True)
    except Exception as err:  # unpickling can fail in many ways
        raise DataError(f"{path} could not be unpickled ({type(err).__name__}: {err})") from err
    # The whole array is in memory already, so check every row now rather than mid-run.
    for i, r in enumerate(rows):
        _as_token_row(r, f"{path} row {i}")
    return _InMemorySource(rows, str(path))


def _load_pt(path: Path, key: str) -> _RowSource:
    try:
        try:
            obj = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except RuntimeError:  # files in the legacy format cannot be memory-mapped
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises a zoo of types for bad or unsafe files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{path} could not be loaded with torch.load(weights_only=True): {first}. Save a "
            "plain tensor, list of tensors or dict of them with torch.save"
        ) from err
    where = str(path)
    if isinstance(obj, Mapping):
        if key not in obj:
            keys = ", ".join(str(k) for k in obj) or "none"
            raise DataError(f"{path} is a dict with no key '{key}' (its keys: {keys}); set key=")
        obj = obj[key]
        where = f"{path}['{key}']"
    if isinstance(obj, torch.Tensor):
        _check_int_dtype(obj.dtype, where)
        _check_2d(obj.shape, where)
        return _InMemorySource(obj, where)
    if isinstance(obj, (list, tuple)):
        for i, r in enumerate(obj):
            if not isinstance(r, torch.Tensor):
                raise DataError(
                    f"{where} row {i} is a {type(r).__name__}; a list must hold 1-D integer tensors"
                )
            _as_token_row(r, f"{where} row {i}")
        return _InMemorySource(obj, where)
    raise DataError(
        f"{where} holds a {type(obj).__name__}; expected a 2-D integer tensor, a list of 1-D "
        "integer tensors, or a dict holding one of those"
    )


def _load_h5(path: Path, key: str) -> _RowSource:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path} is not a readable HDF5 file ({err})") from err
    with f:
        if key not in f:
            keys = ", ".join(f.keys()) or "none"
            raise DataError(f"{path} has no dataset '{key}' (top-level keys: {keys}); set key=")
        node = f[key]
        if not isinstance(node, h5py.Dataset):
            raise DataError(f"{path}['{key}'] is an HDF5 {type(node).__name__}, not a dataset")
        where = f"{path}['{key}']"
        _check_int_dtype(node.dtype, where)
        _check_2d(node.shape, where)
        n_rows = int(node.shape[0])
    return _H5Source(path, key, n_rows)


def _load_jsonl(path: Path, column: str, stop: int | None) -> _RowSource:
    starts: list[int] = []
    line_numbers: list[int] = []
    try:
        with open(path, "rb") as f:
            pos = 0
            for number, line in enumerate(f, start=1):
                if line.strip():  # blank lines (e.g. a trailing newline) are not rows
                    starts.append(pos)
                    line_numbers.append(number)
                    if stop is not None and len(starts) >= stop:
                        break  # rows past the window are never read
                pos += len(line)
    except OSError as err:
        raise DataError(f"cannot read {path} ({err})") from err
    return _JsonlSource(
        path, column, np.asarray(starts, dtype=np.int64), np.asarray(line_numbers, dtype=np.int64)
    )


def _load_hf(path: Path, column: str) -> _RowSource:
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as err:
        raise DataError(
            f"{path} is a Hugging Face dataset directory; reading it needs the `datasets` "
            "package: pip install datasets"
        ) from err
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # a damaged or foreign directory
        raise DataError(
            f"{path} could not be read with datasets.load_from_disk ({type(err).__name__}: {err})"
        ) from err
    if not hasattr(ds, "column_names") or isinstance(ds.column_names, Mapping):
        splits = ", ".join(ds.keys()) if hasattr(ds, "keys") else "?"
        raise DataError(
            f"{path} is a DatasetDict with splits {splits}; point path at one split's "
            f"directory (e.g. {path / 'train'})"
        )
    if column not in ds.column_names:
        raise DataError(
            f"{path} has no column '{column}' (its columns: {', '.join(ds.column_names)}); "
            "set column="
        )
    return _HFSource(ds.select_columns([column]), column, str(path))


# --- public API -------------------------------------------------------------------------------


class TokenDataset(torch.utils.data.Dataset):
    """A map-style dataset of token sequences: item ``i`` is ``{"input_ids": LongTensor (T_i,)}``.

    Args:
        path: a ``.npy``, ``.pt``/``.pth``, ``.h5``/``.hdf5`` or ``.jsonl``/``.json`` file, or a
            directory written by ``datasets.Dataset.save_to_disk``.
        format: ``"auto"`` (from the suffix or directory contents) or one of ``npy``, ``pt``,
            ``h5``, ``hf``, ``jsonl``.
        column: the column holding token ids in ``jsonl`` and Hugging Face datasets.
        key: the dict key (``.pt``) or dataset name (``.h5``); ``None`` means ``"input_ids"``.
        limit: at most this many rows (fewer if the file ends sooner); ``None`` for all.
        offset: the first row to use, so the rows are ``[offset, offset + limit)``.
        allow_pickle: allow a ragged ``.npy`` object array, which numpy stores with pickle.
            Only set it for files you trust.

    Raises:
        DataError: for a missing or unreadable file, unknown format, non-integer or non-2-D data,
            a missing column or key, an empty selection, or an offset past the end.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        format: str = "auto",
        column: str = "input_ids",
        key: str | None = None,
        limit: int | None = None,
        offset: int = 0,
        *,
        allow_pickle: bool = False,
    ) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise DataError(f"dataset path {self.path} does not exist")
        if not isinstance(offset, int) or offset < 0:
            raise ConfigError(
                f"offset must be a non-negative integer, got {offset!r} ({self.path})"
            )
        if limit is not None and (not isinstance(limit, int) or limit <= 0):
            raise ConfigError(
                f"limit must be a positive integer or None, got {limit!r} ({self.path})"
            )
        fmt = _ALIASES.get(format.lower(), format.lower())
        if fmt == "auto":
            fmt = _detect_format(self.path)
        elif fmt not in FORMATS:
            raise DataError(
                f"unknown format '{format}' for {self.path}; "
                f"use auto or one of {', '.join(FORMATS)}"
            )
        if fmt == "hf" and not self.path.is_dir():
            raise DataError(
                f"format=hf needs a directory written by save_to_disk; {self.path} is a file"
            )
        if fmt != "hf" and self.path.is_dir():
            raise DataError(f"format={fmt} needs a file; {self.path} is a directory")
        self.format = fmt
        key = "input_ids" if key is None else key

        source: _RowSource
        if fmt == "npy":
            source = _load_npy(self.path, allow_pickle)
        elif fmt == "pt":
            source = _load_pt(self.path, key)
        elif fmt == "h5":
            source = _load_h5(self.path, key)
        elif fmt == "jsonl":
            source = _load_jsonl(self.path, column, None if limit is None else offset + limit)
        else:
            source = _load_hf(self.path, column)
        self._source = source

        total = len(source)
        if total == 0:
            raise DataError(f"{self.path} contains no rows (an empty dataset)")
        if offset >= total:
            raise DataError(
                f"offset={offset} is beyond the end of {self.path}, which has {total} rows"
            )
        self.offset = offset
        self._len = total - offset if limit is None else min(limit, total - offset)
        if fmt in ("jsonl", "hf"):
            # Rows there are checked on read; read the first now so a wrong column fails early.
            self[0]

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = operator.index(index)  # also accepts numpy and 0-d tensor indices
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {index} out of range for a dataset of {self._len} rows")
        return {"input_ids": self._source.row(self.offset + i)}

    def describe_row(self, index: int) -> str:
        """Where row ``index`` comes from, for error messages: the file and its row or line."""
        row = self.offset + int(index)
        lines = getattr(self._source, "line_numbers", None)
        if lines is not None and row < len(lines):
            return f"{self.path} line {int(lines[row])}"
        return f"{self.path} row {row}"

    def __repr__(self) -> str:
        stop = self.offset + self._len
        return f"TokenDataset('{self.path}', format='{self.format}', rows [{self.offset}, {stop}))"


def token_dataset(
    path: str,
    format: str = "auto",
    column: str = "input_ids",
    key: str | None = None,
    limit: int | None = None,
    offset: int = 0,
    *,
    allow_pickle: bool = False,
) -> TokenDataset:
    """The Hydra target for token data:
    ``{_target_: sdi_pipeline.inputs.data.token_dataset, path: ...}``.

    Builds a :class:`TokenDataset`; see it for the formats and arguments. For example, the
    first 10k rows of an HDF5 file: ``token_dataset("train.h5", key="tokens", limit=10_000)``.
    """
    return TokenDataset(
        path,
        format=format,
        column=column,
        key=key,
        limit=limit,
        offset=offset,
        allow_pickle=allow_pickle,
    )


class PadCollate:
    """A DataLoader ``collate_fn`` that right-pads ``input_ids`` to the longest in the batch.

    Returns ``{"input_ids": (B, T_max) int64 padded with pad_id, "attention_mask": (B, T_max)
    int64}`` with 1 marking real tokens. An example's own ``attention_mask`` is padded with 0
    and kept; any other keys (e.g. ``target``) are collated with torch's default collate.
    Hydra: ``{_target_: sdi_pipeline.inputs.data.PadCollate, pad_id: 0}``.
    """

    def __init__(self, pad_id: int = 0) -> None:
        if isinstance(pad_id, bool) or not isinstance(pad_id, int):
            raise DataError(f"PadCollate pad_id must be an integer token id, got {pad_id!r}")
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if len(examples) == 0:
            raise DataError("PadCollate got an empty batch")
        rows: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        for n, ex in enumerate(examples):
            if not isinstance(ex, Mapping) or "input_ids" not in ex:
                raise DataError(
                    f"PadCollate needs examples with an 'input_ids' entry; example {n} is "
                    f"{type(ex).__name__}"
                    + (f" with keys {', '.join(map(str, ex))}" if isinstance(ex, Mapping) else "")
                )
            ids = _as_token_row(ex["input_ids"], f"PadCollate example {n} 'input_ids'")
            rows.append(ids)
            if "attention_mask" in ex:
                mask = torch.as_tensor(ex["attention_mask"]).to(torch.int64)
                if mask.shape != ids.shape:
                    raise DataError(
                        f"PadCollate example {n}: attention_mask shape {tuple(mask.shape)} "
                        f"differs from input_ids shape {tuple(ids.shape)}"
                    )
                masks.append(mask)
            else:
                masks.append(torch.ones_like(ids))
        t_max = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), t_max), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), t_max), dtype=torch.int64)
        for b, (ids, mask) in enumerate(zip(rows, masks, strict=True)):
            input_ids[b, : len(ids)] = ids
            attention_mask[b, : len(ids)] = mask
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        others = {k for ex in examples for k in ex} - {"input_ids", "attention_mask"}
        for k in sorted(others):
            if not all(k in ex for ex in examples):
                raise DataError(f"PadCollate: key '{k}' is present in only some examples")
            out[k] = default_collate([ex[k] for ex in examples])
        return out

    def __repr__(self) -> str:
        return f"PadCollate(pad_id={self.pad_id})"
