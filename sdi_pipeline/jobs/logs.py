"""The jobs' logger: ``logs/<job>.log`` in the run directory and stderr."""

from __future__ import annotations

import contextlib
import logging
import resource
import sys

from sdi_pipeline.errors import DataError, SDIError
from sdi_pipeline.files.atomic import ensure_dir, write_error
from sdi_pipeline.run.rundir import RunDir

log = logging.getLogger("sdi_pipeline")


class _JobFileHandler(logging.FileHandler):
    """A log file that goes quiet when its disk fails (full, read-only) instead of printing
    a traceback for every record: the job's own error says what is wrong."""

    def handleError(self, record: logging.LogRecord) -> None:
        log.removeHandler(self)
        with contextlib.suppress(OSError):
            self.close()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now, not the one of when the job began: jobs run
    in-process (tests, notebooks) outlive a replaced or closed stderr."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


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
    for handler in (file_handler, _StderrHandler()):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.propagate = False


def log_file(job: str) -> str:
    """Where the current job logs (for messages that point to the full traceback)."""
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return f"logs/{job}.log"


def traceback_to_file(message: str) -> None:
    """Log ``message`` with the current exception's traceback to the log file only: the
    terminal gets the one-line error, the log keeps everything."""
    record = log.makeRecord(log.name, logging.ERROR, "", 0, message, (), sys.exc_info())
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def as_job_error(err: BaseException, what: str, job: str) -> SDIError:
    """An unexpected exception from the user's code (model, loss, collate, dataset) during a
    job, as one line; its traceback goes to the job's log file."""
    if isinstance(err, SDIError):
        return err
    traceback_to_file(f"{what} failed")
    first = " ".join(str(err).split())[:300]
    return DataError(
        f"{what} failed: {type(err).__name__}: {first} (in the model, loss, collate or dataset "
        f"code; the traceback is in {log_file(job)})"
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
