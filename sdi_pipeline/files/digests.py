"""Content digests: of files (checkpoints), of JSON-able records, and a cache of file digests.

A checkpoint's sha256 is computed once per file version, not once per job: the run
directory's ``checkpoints.sha256.json`` caches it under the file's stat identity (size,
mtime_ns, inode, ctime_ns). A file rewritten in place, replaced or copied over changes at
least one of them, so its digest is computed again. The cache is only a shortcut: when it
cannot be read or written (a read-only run dir), digests are computed and nothing breaks.
Light to import (no torch).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sdi_pipeline.errors import CheckpointError, SDIError
from sdi_pipeline.files.atomic import write_json_atomic
from sdi_pipeline.messages import shortened

# A checkpoint directory's weights: the first of these present (an index stands for its
# shards). Hugging Face save_pretrained and Trainer checkpoint-N directories hold them.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files holding a checkpoint's weights: the file itself, or a directory's weight files.

    A directory's are those of :data:`WEIGHT_FILES` (the first present); an index file
    stands for the shards it lists, in sorted order.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise CheckpointError(f"checkpoint not found: {p}")
    for name in WEIGHT_FILES:
        if (p / name).is_file():
            return _shards(p / name) if name.endswith(".index.json") else [p / name]
    raise CheckpointError(
        f"checkpoint directory {p} holds no model weights (none of {', '.join(WEIGHT_FILES)}): "
        "name a save_pretrained or Trainer checkpoint-N directory, or the weight files"
    )


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {str(err).splitlines()[0]}") from err


def _shards(index: Path) -> list[Path]:
    """The shard files a sharded save's index lists (each once, sorted); all must exist."""
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, Mapping) else None
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map: is the sharded save complete?")
    shards = [index.parent / name for name in sorted(set(map(str, weight_map.values())))]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(
            f"{index} lists shard files that are missing: {shortened(missing, 3)}"
        )
    return shards


def sha256_files(root: str | Path, files: Sequence[str | Path]) -> str:
    """sha256 of a checkpoint: a file's bytes, or a directory's files (``files``, inside
    ``root``) in order, each its relative name then its bytes."""
    root = Path(root)
    h = hashlib.sha256()
    for name in files:
        f = Path(name)
        if f != root:
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as stream:
            for block in iter(lambda stream=stream: stream.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def record_digest(record: Any) -> str:
    """A 32-hex-digit digest of a JSON-able record (keys sorted): a content address."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _stat_key(files: Sequence[Path]) -> list[list[int]]:
    stats = [f.stat() for f in files]
    return [[st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns] for st in stats]


class DigestCache:
    """sha256 of files, cached in a JSON file by their stat identity.

    ``path=None`` keeps the cache in memory only (before a run directory exists);
    :meth:`attach` then points it at the run's cache file and saves what it holds.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, dict[str, Any]] = {}
        self._loaded = False
        self._dirty = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # missing or damaged: digests are computed again
        if isinstance(data, dict):
            for key, entry in data.items():
                if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
                    self._entries.setdefault(key, entry)

    def cached(self, path: str | Path, files: Sequence[Path] | None = None) -> str | None:
        """The cached digest of ``path`` (made of ``files``, default the path itself) if the
        stat identity of every file is unchanged, else None."""
        self._load()
        p = Path(path)
        entry = self._entries.get(str(p))
        try:
            key = _stat_key(files or checkpoint_files(p))
        except (OSError, SDIError):
            return None
        if entry is not None and entry.get("stat") == key:
            return str(entry["sha256"])
        return None

    def sha256(self, path: str | Path, files: Sequence[Path] | None = None) -> str:
        """:func:`sha256_files` of ``path`` (a directory's ``files``), from the cache when
        every file's stat identity is unchanged."""
        p = Path(path)
        hit = self.cached(p, files)
        if hit is not None:
            return hit
        if not p.exists():  # as reading a missing file would: callers handle OSError
            raise FileNotFoundError(f"checkpoint not found: {p}")
        members = list(files or checkpoint_files(p))
        before = _stat_key(members)
        digest = sha256_files(p, members)
        if _stat_key(members) == before:  # not modified while it was read
            self._entries[str(p)] = {"stat": before, "sha256": digest}
            self._dirty = True
            self.save()
        return digest

    def attach(self, path: Path) -> None:
        """Use the cache file at ``path`` from now on, keeping (and saving) what is known."""
        known = self._entries
        self.path, self._entries, self._loaded = path, {}, False
        self._load()
        # Written only when it learns something: a rerun with nothing new rewrites nothing.
        self._dirty = any(self._entries.get(key) != entry for key, entry in known.items())
        self._entries.update(known)
        self.save()

    def save(self) -> None:
        """Write the cache (best effort: a cache that cannot be written is only slower)."""
        if self.path is None or not self._dirty or not self.path.parent.is_dir():
            return
        try:
            # Entries other jobs added meanwhile are kept.
            current = json.loads(self.path.read_text()) if self.path.exists() else {}
            if not isinstance(current, dict):
                current = {}
        except (OSError, ValueError):
            current = {}
        current.update(self._entries)
        try:
            write_json_atomic(self.path, current)
            self._dirty = False
        except (OSError, SDIError):
            pass


def describe_change(old: str | None, new: str | None) -> str:
    """``sha256 0123abcd… → 4567ef01…`` for two digests."""

    def short(d: str | None) -> str:
        return "none" if not d else f"{d[:12]}…"

    return f"sha256 {short(old)} → {short(new)}"


# Input files up to this size get their full sha256 in their identity record; larger ones a
# digest of FILE_SAMPLES blocks of SAMPLE_BYTES spread over the file (first and last included).
FULL_DIGEST_MAX = 32 * 2**20
FILE_SAMPLES = 16
SAMPLE_BYTES = 64 * 2**10


def _sampled_sha256(path: Path, size: int) -> str:
    h = hashlib.sha256(f"{size}:".encode())
    last = max(0, size - SAMPLE_BYTES)
    offsets = sorted({last * i // (FILE_SAMPLES - 1) for i in range(FILE_SAMPLES)})
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def file_identity(path: Path) -> dict[str, Any]:
    """What a data file is now: its path, size, mtime, inode, a digest of sampled blocks and,
    for files up to :data:`FULL_DIGEST_MAX`, its full sha256. Raises OSError."""
    st = path.stat()
    record: dict[str, Any] = {
        "path": str(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "inode": st.st_ino,
        "sampled_sha256": _sampled_sha256(path, st.st_size),
    }
    if st.st_size <= FULL_DIGEST_MAX:
        record["sha256"] = sha256_files(path, [path])
    return record


def identity_change(record: Mapping[str, Any]) -> str | None:
    """Why the file of a :func:`file_identity` record is not what it was (None: it is, or it
    is gone, which changes no result made from it).

    One stat when nothing changed; a file whose size, mtime or inode differ is hashed (whole
    when small, by samples otherwise), so a file only touched or copied back is not changed.
    A large file whose samples still match cannot be told apart from one changed elsewhere:
    it counts as changed.
    """
    path = Path(str(record.get("path")))
    try:
        st = path.stat()
    except OSError:
        return None
    same = (st.st_size, st.st_mtime_ns, st.st_ino)
    if same == (record.get("size"), record.get("mtime_ns"), record.get("inode")):
        return None
    if st.st_size != record.get("size"):
        return f"{record.get('size')} → {st.st_size} bytes"
    try:
        if "sha256" in record:
            now = sha256_files(path, [path])
            return None if now == record["sha256"] else describe_change(record["sha256"], now)
        now = _sampled_sha256(path, st.st_size)
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"
    if now != record.get("sampled_sha256"):
        return "its content changed"
    return "it was rewritten (new modification time or inode); too large to hash here"
