"""What a unit's sketches depend on in the data: digests of examples, and cheap data checks.

A unit records the digest of its block's examples (``data_sha256``): the sha256 of the
per-example digests of indices ``[start, stop)`` in order, each example hashed through its
tensors' dtype, shape and bytes (dicts by sorted key, lists in order). Changing any example
of a block, even to another of the same size, changes the digest and makes the unit stale.

:func:`scan_dataset` is the preflight's one pass over a dataset: it reads every example
(naming the row of one that cannot be read), hashes each block, checks token ids against
the model's vocabulary and length limits (:func:`token_limits`), collates the batches the
jobs will form and checks them as the loss will (:func:`batch_check`), and re-reads the
first examples to make sure the dataset is deterministic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from sdi_pipeline.errors import DataError, SDIError
from sdi_pipeline.inputs.losses import input_check

# Keys of a dict example that hold token ids, in order of preference.
ID_KEYS = ("input_ids", "tokens", "token_ids", "ids")
# Config / model attributes that bound the sequence length, in order of preference.
LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_len",
    "max_seq_len",
    "max_seq_length",
    "n_ctx",
    "block_size",
)
_POSITION_WORDS = ("pos", "wpe", "position")
# Examples read per vectorised check.
CHUNK = 4096
# Datasets at least this large get a progress bar.
PROGRESS_FROM = 20_000


def _feed(h: Any, obj: Any) -> None:
    """Feed ``obj``'s content (not its identity) into the hash ``h``."""
    kind = type(obj)
    # Exact types first, the same bytes as the general branches below: a string key is
    # otherwise checked against four types, one of them an ABC, per example.
    if kind is str:
        data = obj.encode()
        h.update(f"S{len(data)}:".encode() + data)
    elif kind is dict:
        h.update(f"M{len(obj)}".encode())
        for key in sorted(obj, key=str):
            _feed(h, str(key))
            _feed(h, obj[key])
    elif isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        try:  # the same bytes through numpy: a few times faster than torch's views
            h.update(np.ascontiguousarray(t.numpy()))
        except (TypeError, RuntimeError):  # bfloat16, not on the CPU, conjugated, ...
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray) and obj.dtype != object:
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(obj, Mapping):
        h.update(f"M{len(obj)}".encode())
        for key in sorted(obj, key=str):
            _feed(h, str(key))
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)) or (isinstance(obj, np.ndarray) and obj.dtype == object):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, str):
        data = obj.encode()
        h.update(f"S{len(data)}:".encode() + data)
    elif isinstance(obj, bytes):
        h.update(f"B{len(obj)}:".encode() + obj)
    elif obj is None or isinstance(obj, (bool, int, float, np.generic)):
        h.update(f"V{type(obj).__name__}:{obj!r};".encode())
    else:
        text = repr(obj).encode()
        h.update(f"O{type(obj).__qualname__}{len(text)}:".encode() + text)


def example_digest(example: Any) -> bytes:
    """The 32-byte sha256 of one example's content."""
    h = hashlib.sha256()
    _feed(h, example)
    return h.digest()


def combine(digests: Sequence[bytes]) -> str:
    """The digest of a block from its examples' digests, in order (hex)."""
    h = hashlib.sha256(f"{len(digests)}:".encode())
    for d in digests:
        h.update(d)
    return h.hexdigest()


def _read(dataset: Any, i: int, which: str) -> Any:
    try:
        return dataset[i]
    except DataError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(
            f"data.{which} row {i}{_where(dataset, i)} cannot be read "
            f"({type(err).__name__}: {first}): fix or remove that example"
        ) from err


def block_digest(dataset: Any, start: int, stop: int, which: str = "train") -> str:
    """``data_sha256`` of examples ``[start, stop)`` of ``dataset``."""
    return combine([example_digest(_read(dataset, i, which)) for i in range(start, stop)])


class HashingSubset(Dataset):
    """Examples ``[start, stop)`` of a dataset, hashed as they are read (for the sketch pass).

    After a full pass, :meth:`digest` is the block's ``data_sha256`` of the values the
    sketches were computed from.
    """

    def __init__(self, dataset: Any, start: int, stop: int, which: str = "train") -> None:
        self.dataset, self.start, self.stop, self.which = dataset, start, stop, which
        self._digests: dict[int, bytes] = {}

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Any:
        example = _read(self.dataset, self.start + i, self.which)
        self._digests[i] = example_digest(example)
        return example

    def digest(self) -> str:
        if len(self._digests) != len(self):
            raise DataError(
                f"data.{self.which} rows {self.start}..{self.stop - 1} were not all read"
            )
        return combine([self._digests[i] for i in range(len(self))])


def _where(dataset: Any, i: int) -> str:
    """`` (file … row …)`` for datasets that can say where a row comes from."""
    describe = getattr(dataset, "describe_row", None)
    if callable(describe):
        try:
            return f" ({describe(i)})"
        except Exception:  # a description is a courtesy, never an error
            return ""
    return ""


def example_ids(example: Any) -> torch.Tensor | None:
    """The token ids of an example: an integer tensor under ``input_ids`` / ``tokens`` / …,
    the example itself if it is an integer tensor, or the first item of a tuple."""
    value: Any = None
    if isinstance(example, Mapping):
        value = next((example[k] for k in ID_KEYS if k in example), None)
    elif isinstance(example, (torch.Tensor, np.ndarray)):
        value = example
    elif isinstance(example, (tuple, list)) and example:
        value = example[0]
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
        value = torch.from_numpy(np.asarray(value, dtype=np.int64))
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        return None
    return value


@dataclass
class TokenLimits:
    """The model's token id range and longest sequence, and where each was read from."""

    vocab: int | None = None
    vocab_from: str = ""
    max_len: int | None = None
    len_from: str = ""


def _int_attr(obj: Any, name: str) -> int | None:
    value = getattr(obj, name, None)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def token_limits(model: nn.Module) -> TokenLimits:
    """What the model accepts: ``config.vocab_size``, else its input embedding's size (the
    largest non-positional ``nn.Embedding``); the first of :data:`LENGTH_KEYS` on its config
    or itself, else a position embedding's size. Unknown limits stay None (not checked)."""
    limits = TokenLimits()
    config = getattr(model, "config", None)
    if config is not None and _int_attr(config, "vocab_size"):
        limits.vocab, limits.vocab_from = _int_attr(config, "vocab_size"), "model.config.vocab_size"
    embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    positional = [(n, m) for n, m in embeddings if any(w in n.lower() for w in _POSITION_WORDS)]
    if limits.vocab is None:
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        if isinstance(emb, nn.Embedding):
            limits.vocab = emb.num_embeddings
            limits.vocab_from = "the model's input embedding (get_input_embeddings())"
        else:
            inputs = [(n, m) for n, m in embeddings if (n, m) not in positional]
            if inputs:
                name, emb = max(inputs, key=lambda nm: nm[1].num_embeddings)
                limits.vocab = emb.num_embeddings
                limits.vocab_from = f"nn.Embedding '{name}' has {emb.num_embeddings} rows"
    for owner, prefix in ((config, "model.config"), (model, "model")):
        if owner is None or limits.max_len is not None:
            continue
        for key in LENGTH_KEYS:
            if _int_attr(owner, key):
                limits.max_len, limits.len_from = _int_attr(owner, key), f"{prefix}.{key}"
                break
    if limits.max_len is None and positional:
        name, emb = max(positional, key=lambda nm: nm[1].num_embeddings)
        limits.max_len = emb.num_embeddings
        limits.len_from = f"position embedding '{name}' has {emb.num_embeddings} rows"
    return limits


@dataclass
class Scan:
    """What one pass over a dataset found: its size and the digest of each block."""

    n: int
    block_digests: list[str]
    checked_ids: bool


def _check_chunk(
    ids: list[tuple[int, torch.Tensor]], limits: TokenLimits, which: str, dataset: Any
) -> None:
    """Vectorised range and length checks of one chunk; names the first bad row."""
    if not ids:
        return
    flat = torch.cat([t.reshape(-1) for _, t in ids]) if ids else torch.empty(0)
    lengths = torch.tensor([t.shape[-1] for _, t in ids])
    bad_range = flat.numel() > 0 and (
        int(flat.min()) < 0 or (limits.vocab is not None and int(flat.max()) >= limits.vocab)
    )
    bad_len = limits.max_len is not None and int(lengths.max()) > limits.max_len
    if not (bad_range or bad_len):
        return
    for i, t in ids:
        row = f"data.{which} row {i}{_where(dataset, i)}"
        if t.numel() and int(t.min()) < 0:
            raise DataError(
                f"{row} holds the negative token id {int(t.min())}: token ids must be 0.."
                f"{'' if limits.vocab is None else limits.vocab - 1}; fix the data (pad with a "
                "valid id, e.g. data.collate.pad_id)"
            )
        if limits.vocab is not None and t.numel() and int(t.max()) >= limits.vocab:
            raise DataError(
                f"{row} holds token id {int(t.max())}, outside the model's vocabulary of "
                f"{limits.vocab} ids (0..{limits.vocab - 1}; {limits.vocab_from}): fix the "
                "data, or use the model (tokenizer) the data was made for"
            )
        if limits.max_len is not None and t.shape[-1] > limits.max_len:
            raise DataError(
                f"{row} has {t.shape[-1]} tokens, more than the model's {limits.max_len} "
                f"({limits.len_from}): truncate the examples to {limits.max_len} tokens or "
                "use a model with longer context"
            )


BatchCheck = Callable[[list[Any]], None]


def batch_check(collate: Callable[[list[Any]], Any] | None, loss: Any) -> BatchCheck:
    """What the jobs do to a batch of examples before the model sees it: the collate
    (``data.collate``, else torch's default) and the loss's checks of its inputs (for the
    losses of :mod:`sdi_pipeline.inputs.losses`, e.g. each example has a target position)."""
    collate_fn = collate or default_collate
    check_inputs = input_check(loss)

    def check(examples: list[Any]) -> None:
        batch = collate_fn(examples)
        if check_inputs is not None:
            check_inputs(batch)

    return check


def _problem(err: Exception) -> str:
    if isinstance(err, SDIError):
        return str(err)
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"


def _check_batch(check: BatchCheck, batch: list[tuple[int, Any]], which: str, dataset: Any) -> None:
    """One batch as the jobs will form it; on failure, the first example that fails alone
    is named by its row (else the batch's rows)."""
    try:
        check([example for _, example in batch])
        return
    except Exception as err:  # the user's collate, or a check of the loss
        whole = err
    for i, example in batch:
        try:
            check([example])
        except Exception as err:
            raise DataError(
                f"data.{which} row {i}{_where(dataset, i)} cannot be used: {_problem(err)}; fix "
                "or remove that example"
            ) from err
    first, last = batch[0][0], batch[-1][0]
    raise DataError(
        f"data.{which} rows {first}..{last} (one batch of the jobs) cannot be collated together: "
        f"{_problem(whole)}; check data.collate against these examples"
    ) from whole


def scan_dataset(
    dataset: Any,
    which: str,
    limits: TokenLimits | None,
    block_size: int,
    *,
    check: BatchCheck | None = None,
    batch_size: int = 1,
    progress: bool = False,
    recheck: int = 8,
) -> Scan:
    """Read every example once: block digests, token checks, the batches the jobs will form
    (``batch_size`` examples from each block's start) through ``check``, and a determinism
    check.

    Raises DataError naming the dataset (``data.<which>``), the file and row where the
    dataset can say, and what to fix.
    """
    n = len(dataset)
    digests: list[str] = []
    block: list[bytes] = []
    chunk: list[tuple[int, torch.Tensor]] = []
    batch: list[tuple[int, Any]] = []
    first: list[bytes] = []
    checked = False
    bar = tqdm(
        total=n,
        desc=f"checking data.{which}",
        unit="ex",
        disable=not progress or n < PROGRESS_FROM,
        leave=False,
    )
    try:
        for i in range(n):
            example = _read(dataset, i, which)
            digest = example_digest(example)
            block.append(digest)
            if i < recheck:
                first.append(digest)
            if limits is not None:
                ids = example_ids(example)
                if ids is not None:
                    checked = True
                    chunk.append((i, ids))
            if len(chunk) >= CHUNK:
                _check_chunk(chunk, limits or TokenLimits(), which, dataset)
                chunk = []
            if check is not None:
                batch.append((i, example))
            if len(block) == block_size:
                digests.append(combine(block))
                block = []
            # The jobs' batches: batch_size examples from each block's start.
            if check is not None and (len(batch) == batch_size or not block or i == n - 1):
                _check_batch(check, batch, which, dataset)
                batch = []
            bar.update(1)
        _check_chunk(chunk, limits or TokenLimits(), which, dataset)
        if block:
            digests.append(combine(block))
    finally:
        bar.close()
    for i, digest in enumerate(first):
        if example_digest(_read(dataset, i, which)) != digest:
            raise DataError(
                f"data.{which} row {i}{_where(dataset, i)} reads differently each time (random "
                "augmentation or sampling inside the dataset?): attribution needs the same "
                "example at each index; make its __getitem__ deterministic"
            )
    return Scan(n, digests, checked)
