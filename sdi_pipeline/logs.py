"""The jobs' logger: ``logs/<job>.log`` in the run directory and stderr."""

from __future__ import annotations

import contextlib
import logging
import resource

from sdi_pipeline.atomic import ensure_dir, write_error
from sdi_pipeline.rundir import RunDir

log = logging.getLogger("sdi_pipeline")


class _JobFileHandler(logging.FileHandler):
    """A log file that goes quiet when its disk fails (full, read-only) instead of printing
    a traceback for every record: the job's own error says what is wrong."""

    def handleError(self, record: logging.LogRecord) -> None:
        log.removeHandler(self)
        with contextlib.suppress(OSError):
            self.close()


def setup_logging(run: RunDir, name: str) -> None:
    """Log to ``logs/<name>.log`` in the run dir and to stderr.

    A logs folder that cannot be written (read-only, full) is one RunDirError.
    """
    ensure_dir(run.logs_dir)
    log.handlers.clear()
    log.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s {name} %(levelname)s %(message)s")
    path = run.logs_dir / f"{name}.log"
    try:
        file_handler = _JobFileHandler(path)
    except OSError as err:
        mapped = write_error(path, err)
        if mapped is not None:
            raise mapped from err
        raise
    for handler in (file_handler, logging.StreamHandler()):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.propagate = False


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
