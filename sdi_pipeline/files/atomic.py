"""Atomic file writes: every writer goes through a temporary name in the same folder.

A reader never sees a half-written file under its final name: the content goes to
``.<name>.tmp-<host>-<pid>-<random>`` and is renamed over the final name only when complete
(a rename within one folder is atomic on POSIX). Host, pid and a random part keep concurrent
writers (two launches, two workers, two machines) off each other's temporary files; a failed
write removes its temporary file, and :func:`clean_temp_files` removes those of writers that
were killed (the pid is gone on this host, or the file is old).

A write that fails because the disk is full, the filesystem is read-only or the folder is
not writable raises one :class:`RunDirError` naming the file and the fix, never a traceback.
Exclusive creation (:func:`create_exclusive`) is how leases and locks are taken: the content
is written to a temporary file first and hard-linked to the final name, which fails if the
name exists, so the file is never seen half-written either.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sdi_pipeline.errors import RunDirError

# errno values that mean "this place cannot be written": one clear line, not a traceback.
_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only filesystem",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for the filesystem",
}
# .<name>.tmp-<host>-<pid>-<8 hex>; files of older versions lack the host part.
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)-(?P<rand>[0-9a-f]{8})$")
# Temporary files of other hosts (whose pids cannot be checked) are removed after this long.
FOREIGN_TEMP_AGE_S = 6 * 3600


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.\-]", "_", socket.gethostname()) or "host"


def temp_path(final: Path) -> Path:
    """The temporary name a writer of ``final`` uses in ``final``'s folder."""
    return final.with_name(f".{final.name}.tmp-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def error_number(err: BaseException) -> int | None:
    """The errno of an OSError, also when h5py only mentions it in its message."""
    number = getattr(err, "errno", None)
    if isinstance(number, int):
        return number
    found = re.search(r"errno = (\d+)", str(err))
    return int(found.group(1)) if found else None


def write_error(path: Path, err: BaseException) -> RunDirError | None:
    """One-line RunDirError for a write that failed for lack of space or permission, else None."""
    number = error_number(err)
    if number not in _WRITE_ERRNOS:
        return None
    where = path.parent
    what = _WRITE_ERRNOS[number]
    if number in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free space there (or set run.root to another disk), then run the same command again"
    elif number == errno.EROFS:
        fix = (
            "remount it writable or set run.root to a writable place, then run the same "
            "command again"
        )
    else:
        fix = (
            f"make {where} writable for this user (or set run.root elsewhere), then run the same "
            "command again"
        )
    return RunDirError(
        f"cannot write {path}: {what} ({errno.errorcode.get(number, number)}) in {where} "
        f"(nothing was left half-written): {fix}"
    )


def _raise_write_error(path: Path, err: BaseException) -> None:
    mapped = write_error(path, err)
    if mapped is not None:
        raise mapped from err


def ensure_dir(folder: Path) -> None:
    """Create ``folder`` (and parents); a file in the way or no permission is one clear error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        blocker = next(
            (p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder
        )
        raise RunDirError(
            f"cannot create the folder {folder}: {blocker} is a file, not a directory. Move it "
            "away, or set run.root to another place"
        ) from err
    except OSError as err:
        # Name the folder that refused: the deepest one that exists, not the one to create.
        first_missing = folder
        while not first_missing.parent.exists() and first_missing.parent != first_missing:
            first_missing = first_missing.parent
        _raise_write_error(first_missing, err)
        raise


def _remove_quietly(path: Path) -> None:
    with suppress(OSError):
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush ``path``'s content to the disk, so a rename never exposes an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; rename it on success.

    A failure for lack of space or permission becomes one :class:`RunDirError`.
    """
    final = Path(path)
    ensure_dir(final.parent)
    tmp = temp_path(final)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
    except OSError as err:
        _raise_write_error(final, err)
        raise
    finally:
        _remove_quietly(tmp)


def write_bytes_atomic(path: str | Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def create_exclusive(path: str | Path, text: str) -> bool:
    """Create ``path`` with ``text`` unless it exists; True if this call created it.

    The content is complete before the name appears (a hard link of a finished temporary
    file, which fails when the name exists), so a reader never sees a partial file. On
    filesystems without hard links it falls back to ``O_CREAT | O_EXCL`` (a reader may then
    see the file empty for an instant; :mod:`sdi_pipeline.run.leases` allows for that).
    """
    final = Path(path)
    ensure_dir(final.parent)
    tmp = temp_path(final)
    try:
        with open(tmp, "wb") as f:
            f.write(text.encode())
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return _create_excl(final, text)
        return True
    except OSError as err:
        _raise_write_error(final, err)
        raise
    finally:
        _remove_quietly(tmp)


def _create_excl(final: Path, text: str) -> bool:
    try:
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode())
    return True


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temp_files(
    folders: Iterable[Path], *, foreign_age_s: float = FOREIGN_TEMP_AGE_S
) -> list[Path]:
    """Remove the temporary files of killed writers in ``folders``; returns those removed.

    A temporary file is a killed writer's when its host is this one and its pid is gone, or
    when it was not modified for ``foreign_age_s`` (the only test for other hosts' files).
    """
    removed: list[Path] = []
    host, now = _host(), time.time()
    for folder in folders:
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for path in entries:
            match = _TEMP.match(path.name)
            if match is None:
                continue
            try:
                age = now - path.stat().st_mtime
            except OSError:
                continue
            # A live writer keeps modifying its file; an old one is dead whatever its pid.
            dead = age > foreign_age_s
            if match.group("host") == host:
                dead = dead or not pid_alive(int(match.group("pid")))
            if dead:
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
    return removed
