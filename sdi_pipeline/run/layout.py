"""Where things are in a run directory: paths only, light to import (no torch, no Hydra).

    <root>/<name>/<run id>/
        config.yaml  config.hash  attribution.json  train.hash  train.size  provenance.json
        checkpoints.sha256.json                      checkpoint digests, cached by file stat
        launcher.lock                                held while an sdi-attribute runs the run
        query/ckpt-000.h5 ...                        query sketches, one file per checkpoint
        units/ckpt-000_block-00017.h5 ...            train sketches, one file per unit
        completions/ckpt-000_block-00017             a unit is done when its marker exists
        scores/block-00017.h5 ...                    a block's scores against the query set
        query/bif-ckpt-000.h5, units/bif-ckpt-000_chain-000_block-00017.h5,
        scores/bif-block-00017.h5                    method=bif: traces and BIF shards
        leases/block-00017                           the job computing the block now
        failures/  logs/  commands/                  failed units, job logs, command lines
        results.h5                                   the merge's output

:class:`sdi_pipeline.run.rundir.RunDir` adds what needs the config;
:mod:`sdi_pipeline.formats.results`
and :mod:`sdi_pipeline.run.freshness` use these paths without importing it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdi_pipeline.errors import RunDirError

# The sketch file format (units/*.h5, query/*.h5; see docs/format.md and formats/sketches.py).
# Here so that the light freshness checks know it without importing torch.
SKETCH_FORMAT = "sdi-pipeline/sketches"
SKETCH_FORMAT_VERSION = 2


def unit_name(ckpt: int, block: int) -> str:
    return f"ckpt-{ckpt:03d}_block-{block:05d}"


def block_name(block: int) -> str:
    """A block of training examples: its score shard's and its lease's name."""
    return f"block-{block:05d}"


def query_lease_name(ckpt: int) -> str:
    return f"query-ckpt-{ckpt:03d}"


def bif_unit_name(ckpt: int, chain: int, block: int) -> str:
    """A BIF unit: one SGLD chain at one checkpoint, recorded on one block of examples."""
    return f"bif-ckpt-{ckpt:03d}_chain-{chain:03d}_block-{block:05d}"


def bif_block_name(block: int) -> str:
    """A block's BIF score shard's and lease's name."""
    return f"bif-block-{block:05d}"


def bif_query_name(ckpt: int) -> str:
    """The query loss traces of one checkpoint: their file's stem and lease's name."""
    return f"bif-ckpt-{ckpt:03d}"


class RunPaths:
    """The paths of a run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def hash_path(self) -> Path:
        return self.path / "config.hash"

    @property
    def attribution_path(self) -> Path:
        return self.path / "attribution.json"

    @property
    def train_hash_path(self) -> Path:
        return self.path / "train.hash"

    @property
    def train_size_path(self) -> Path:
        return self.path / "train.size"

    @property
    def digest_cache_path(self) -> Path:
        return self.path / "checkpoints.sha256.json"

    @property
    def launcher_lock_path(self) -> Path:
        return self.path / "launcher.lock"

    @property
    def units_dir(self) -> Path:
        return self.path / "units"

    @property
    def scores_dir(self) -> Path:
        return self.path / "scores"

    @property
    def completions_dir(self) -> Path:
        return self.path / "completions"

    @property
    def leases_dir(self) -> Path:
        return self.path / "leases"

    @property
    def query_dir(self) -> Path:
        return self.path / "query"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def failures_dir(self) -> Path:
        return self.path / "failures"

    @property
    def results_path(self) -> Path:
        return self.path / "results.h5"

    def folders(self) -> list[Path]:
        """Every folder a job writes to (for cleaning killed writers' temporary files)."""
        return [
            self.path,
            self.units_dir,
            self.scores_dir,
            self.completions_dir,
            self.leases_dir,
            self.query_dir,
            self.failures_dir,
            self.logs_dir,
            self.path / "commands",
            self.path / "plots",
        ]

    def unit_path_named(self, name: str) -> Path:
        return self.units_dir / f"{name}.h5"

    def marker_path_named(self, name: str) -> Path:
        return self.completions_dir / name

    def unit_done(self, name: str) -> bool:
        """Cheap: unit ``name``'s file and its completion marker both exist."""
        return self.marker_path_named(name).exists() and self.unit_path_named(name).exists()

    def lease_path(self, name: str) -> Path:
        return self.leases_dir / name

    def shard_path(self, block: int) -> Path:
        """The score shard of training block ``block`` (see :mod:`sdi_pipeline.formats.shards`)."""
        return self.scores_dir / f"{block_name(block)}.h5"

    def query_path(self, ckpt: int) -> Path:
        return self.query_dir / f"ckpt-{ckpt:03d}.h5"

    def bif_query_path(self, ckpt: int) -> Path:
        """The query loss traces (all chains) of checkpoint ``ckpt`` (method=bif)."""
        return self.query_dir / f"{bif_query_name(ckpt)}.h5"

    def bif_shard_path(self, block: int) -> Path:
        """Block ``block``'s BIF scores against the query traces (method=bif)."""
        return self.scores_dir / f"{bif_block_name(block)}.h5"

    def read_marker(self, name: str) -> dict[str, Any] | None:
        """The completion marker of unit ``name`` (None if there is none).

        A marker that is not a complete JSON object (truncated, overwritten) is a RunDirError
        naming it: the unit is not done and must be recomputed.
        """
        path = self.marker_path_named(name)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise RunDirError(f"completion marker {path} is unreadable ({err})") from err
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RunDirError(
                f"completion marker {path} is not valid JSON (truncated or overwritten: {err})"
            ) from err
        if not isinstance(data, dict):
            raise RunDirError(
                f"completion marker {path} holds a {type(data).__name__}, not an object"
            )
        return data
