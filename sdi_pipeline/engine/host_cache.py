"""The per-host cache folder: measured kernel costs and the native kernel's library."""

from __future__ import annotations

import os
from pathlib import Path

#: Overrides the cache folder (default ``$XDG_CACHE_HOME/sdi-pipeline``, else
#: ``~/.cache/sdi-pipeline``).
CACHE_ENV = "SDI_PIPELINE_CACHE_DIR"


def cache_dir() -> Path:
    """Where what is measured or built once per host is kept."""
    if folder := os.environ.get(CACHE_ENV):
        return Path(folder)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sdi-pipeline"
