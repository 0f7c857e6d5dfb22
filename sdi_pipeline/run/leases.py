"""Leases: one owner per unit of work, and one launcher per run.

Before computing a unit a worker creates ``leases/<unit>`` exclusively (see
:func:`sdi_pipeline.files.atomic.create_exclusive`) with its host, boot id, pid, the pid's start
time and the job's name, and a heartbeat thread touches the file every few seconds while it
works. Another worker that finds the lease leaves the unit alone while its owner lives, and
takes it over when the owner is gone:

- dead: on the same host (and boot), no process with that pid and start time exists; or
- silent: the file was not touched for the lease timeout (any host: a crashed machine, a
  frozen process).

Takeover renames the old lease away before creating a new one, so two takers cannot both
win cleanly; should a race ever let two workers compute the same unit, both write the same
bytes through atomic renames, so it costs time, never correctness.

The launcher lock (``launcher.lock``) is the same kind of lease, held while one
``sdi-attribute`` runs a run's jobs, so a second launch of the same config is told instead of
starting duplicate workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdi_pipeline.files.atomic import create_exclusive, pid_alive, temp_path

# Default seconds a lease may go without a heartbeat before it is taken over.
DEFAULT_TIMEOUT_S = 300.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """Start time of process ``pid`` (clock ticks since boot; Linux), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so count after its ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def owner_record(owner: str) -> dict[str, Any]:
    """Who holds a lease: this process, described so other processes can check on it."""
    pid = os.getpid()
    return {
        "owner": owner,
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": pid,
        "pid_start": process_start(pid),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "token": secrets.token_hex(8),
    }


@dataclass
class Holder:
    """The current holder of a lease, as read from its file."""

    path: Path
    record: dict[str, Any]
    raw: bytes
    age_s: float  # seconds since its last heartbeat

    def describe(self) -> str:
        r = self.record
        who = r.get("owner") or "a job"
        where = f"pid {r.get('pid', '?')} on {r.get('host', '?')}"
        return f"{who} ({where}, since {r.get('started', '?')})"

    def gone(self, timeout_s: float) -> str | None:
        """Why the holder is gone (dead or silent), or None while it lives."""
        if self.age_s > timeout_s:
            return f"silent for {self.age_s:.0f}s (lease timeout {timeout_s:g}s)"
        r = self.record
        if not r:
            # Leases are created complete; an unreadable one is damaged, not being written.
            return "its lease file is unreadable" if self.age_s > 10 else None
        if r.get("host") != socket.gethostname():
            return None  # only silence tells about another machine's processes
        if r.get("boot_id") and r.get("boot_id") != _boot_id():
            return "its host rebooted since"
        pid = r.get("pid")
        if not isinstance(pid, int) or not pid_alive(pid):
            return f"process {pid} is gone"
        start = r.get("pid_start")
        if start is not None and process_start(pid) not in (None, start):
            return f"process {pid} is gone (the pid now belongs to another process)"
        return None


def read_holder(path: Path) -> Holder | None:
    """The holder of the lease at ``path``, None if there is no lease."""
    try:
        raw = path.read_bytes()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    except OSError:
        return Holder(path, {}, b"", 0.0)
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            record = {}
    except ValueError:
        record = {}
    return Holder(path, record, raw, max(age, 0.0))


class Lease:
    """A held lease: its heartbeat runs until :meth:`release`."""

    def __init__(self, path: Path, record: dict[str, Any], heartbeat_s: float) -> None:
        self.path = path
        self.record = record
        self.token = record["token"]
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(heartbeat_s,), name=f"lease {path.name}", daemon=True
        )
        self._thread.start()

    def _mine(self) -> bool:
        holder = read_holder(self.path)
        return holder is not None and holder.record.get("token") == self.token

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                if not self._mine():
                    return  # taken over (we were judged gone); nothing to keep alive
                os.utime(self.path)
            except OSError:
                pass  # a read-only or full disk: the lease may go silent, nothing worse

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            if self._mine():
                self.path.unlink()
        except OSError:
            pass

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between heartbeats for a lease timeout: a tenth of it, between 0.2 and 30."""
    return min(30.0, max(0.2, timeout_s / 10))


def acquire(
    path: Path, owner: str, timeout_s: float = DEFAULT_TIMEOUT_S, log: Any = None
) -> Lease | Holder:
    """Take the lease at ``path`` for ``owner``: the Lease, or the live Holder that has it.

    A holder that is gone (dead or silent, see :meth:`Holder.gone`) is taken over, and
    ``log.warning`` (if given) says so.
    """
    for _ in range(5):
        record = owner_record(owner)
        if create_exclusive(path, json.dumps(record, sort_keys=True)):
            return Lease(path, record, heartbeat_interval(timeout_s))
        holder = read_holder(path)
        if holder is None:
            continue  # released meanwhile: try again
        why = holder.gone(timeout_s)
        if why is None:
            return holder
        if log is not None:
            log.warning("taking over %s from %s: %s", path.name, holder.describe(), why)
        _take_away(path, holder)
    holder = read_holder(path)
    return holder if holder is not None else Holder(path, {}, b"", 0.0)


def _take_away(path: Path, holder: Holder) -> None:
    """Remove the gone holder's lease, unless another owner replaced it meanwhile."""
    aside = temp_path(path)
    try:
        os.rename(path, aside)
    except OSError:
        return  # someone else took it away first
    try:
        if aside.read_bytes() != holder.raw:
            # A fresh lease was renamed away: put it back if its name is still free.
            with contextlib.suppress(OSError):
                os.link(aside, path)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            aside.unlink()
