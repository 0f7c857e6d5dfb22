"""Fault points for jobs run as subprocesses by the fault tests.

``python -c "import fault_hooks; fault_hooks.main('worker')" run_dir=... rank=0 world_size=1``
runs a job's command line after installing, from the environment:

- ``SDI_TEST_PAUSE_WRITE=<file name>``: when the job has written that file completely under its
  temporary name, but before the rename, touch ``SDI_TEST_PAUSE_FLAG`` and sleep: the test
  then kills the job in the middle of its write.
- ``SDI_TEST_PAUSE_ROWS=1``: the merge pauses the same way after writing its first
  per-example dataset of results.h5 (a temporary file half full).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def _pause() -> None:
    Path(os.environ["SDI_TEST_PAUSE_FLAG"]).write_text(str(os.getpid()))
    time.sleep(3600)


def install() -> None:
    target = os.environ.get("SDI_TEST_PAUSE_WRITE")
    if target:
        import sdi_pipeline.files.atomic as atomic

        real = atomic._fsync

        def fsync_then_pause(path: Path) -> None:
            real(path)
            if path.name.startswith(f".{target}.tmp-"):
                _pause()

        atomic._fsync = fsync_then_pause  # type: ignore[assignment]
    if os.environ.get("SDI_TEST_PAUSE_ROWS"):
        from sdi_pipeline.formats.results import ResultsWriter

        real_rows = ResultsWriter.stitch

        def rows_then_pause(self: Any, *args: Any, **kwargs: Any) -> None:
            real_rows(self, *args, **kwargs)
            self._f.flush()
            _pause()

        ResultsWriter.stitch = rows_then_pause  # type: ignore[method-assign]


def main(job: str) -> None:
    install()
    from sdi_pipeline.launch import cli

    {"worker": cli.worker_main, "query": cli.query_main, "merge": cli.merge_main}[job]()
