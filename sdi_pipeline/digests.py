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
from pathlib import Path
from typing import Any

from sdi_pipeline.atomic import write_json_atomic
from sdi_pipeline.errors import SDIError


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_digest(record: Any) -> str:
    """A 32-hex-digit digest of a JSON-able record (keys sorted): a content address."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


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

    def cached(self, path: str | Path) -> str | None:
        """The cached digest of ``path`` if its stat identity is unchanged, else None."""
        self._load()
        p = Path(path)
        entry = self._entries.get(str(p))
        try:
            key = _stat_key(p)
        except OSError:
            return None
        if entry is not None and entry.get("stat") == key:
            return str(entry["sha256"])
        return None

    def sha256(self, path: str | Path) -> str:
        """The file's sha256, from the cache when its stat identity is unchanged."""
        p = Path(path)
        hit = self.cached(p)
        if hit is not None:
            return hit
        before = _stat_key(p)
        digest = sha256_file(p)
        if _stat_key(p) == before:  # not modified while it was read
            self._entries[str(p)] = {"stat": before, "sha256": digest}
            self._dirty = True
            self.save()
        return digest

    def attach(self, path: Path) -> None:
        """Use the cache file at ``path`` from now on, keeping (and saving) what is known."""
        known = self._entries
        self.path, self._entries, self._loaded = path, {}, False
        self._load()
        self._entries.update(known)
        self._dirty = bool(known)
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
