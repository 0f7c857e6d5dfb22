"""The jobs' logger: ``logs/<job>.log`` in the run directory and stderr."""

from __future__ import annotations

import logging
import resource

from sdi_pipeline.rundir import RunDir

log = logging.getLogger("sdi_pipeline")


def setup_logging(run: RunDir, name: str) -> None:
    """Log to ``logs/<name>.log`` in the run dir and to stderr."""
    run.logs_dir.mkdir(parents=True, exist_ok=True)
    log.handlers.clear()
    log.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s {name} %(levelname)s %(message)s")
    for handler in (logging.FileHandler(run.logs_dir / f"{name}.log"), logging.StreamHandler()):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.propagate = False


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
