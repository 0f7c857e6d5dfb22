"""The run directory: its layout, work units, completion markers and provenance.

    <root>/<name>/<run id>/
        config.yaml  config.hash  provenance.json
        query/ckpt-000.h5 ...                        query sketches, one file per checkpoint
        units/ckpt-000_block-00017.h5 ...            train sketches, one file per unit
        completions/ckpt-000_block-00017             a unit is done when its marker exists
        logs/  commands/                             job logs and the command lines that ran
        results.h5                                   the merge's output

Work is enumerated up front as units (checkpoint x contiguous block of training indices);
rank r of W takes ``units[r::W]``. Any W, any order and any number of restarts give the
same files, and a crash loses at most the unit in flight.
"""

from __future__ import annotations

import difflib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sdi_pipeline.errors import ConfigError, RunDirError
from sdi_pipeline.files.atomic import ensure_dir, write_json_atomic, write_text_atomic
from sdi_pipeline.run import config as config_mod
from sdi_pipeline.run.layout import RunPaths, block_name, unit_name


@dataclass(frozen=True)
class Unit:
    """Checkpoint ``ckpt`` x training indices ``[start, stop)`` (block number ``block``)."""

    ckpt: int
    block: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return unit_name(self.ckpt, self.block)


def enumerate_units(n_checkpoints: int, n_train: int, block_size: int) -> list[Unit]:
    """All units, block-major so that one block's checkpoints are adjacent."""
    return [
        Unit(k, b, start, min(n_train, start + block_size))
        for b, start in enumerate(range(0, n_train, block_size))
        for k in range(n_checkpoints)
    ]


def run_units(cfg: DictConfig, n_train: int) -> list[Unit]:
    """The units of a run with this config and ``n_train`` training examples."""
    return enumerate_units(len(cfg.checkpoints.paths), n_train, int(cfg.data.block_size))


@dataclass(frozen=True)
class Block:
    """Training indices ``[start, stop)`` (block number ``index``) at every checkpoint: the
    unit of scoring and of a worker's share (its ``units``, one per checkpoint)."""

    index: int
    start: int
    stop: int
    units: tuple[Unit, ...]

    @property
    def name(self) -> str:
        return block_name(self.index)


def run_blocks(cfg: DictConfig, n_train: int) -> list[Block]:
    """The blocks of a run with this config and ``n_train`` training examples."""
    by_block: dict[int, list[Unit]] = {}
    for unit in run_units(cfg, n_train):
        by_block.setdefault(unit.block, []).append(unit)
    return [Block(b, us[0].start, us[0].stop, tuple(us)) for b, us in sorted(by_block.items())]


def rank_blocks(blocks: list[Block], rank: int, world_size: int) -> list[Block]:
    """The share of rank ``rank`` of ``world_size``: every ``world_size``-th block from
    ``rank``, each at all checkpoints, so that the rank can score the blocks it sketches."""
    return blocks[rank::world_size]


class RunDir(RunPaths):
    """A run directory on disk (its paths are :class:`sdi_pipeline.run.layout.RunPaths`)."""

    @classmethod
    def existing(cls, path: str | Path) -> RunDir:
        """An existing run directory: ``path`` must be a directory with a config.yaml.

        Jobs open their run dir this way before writing anything (a log), so a mistyped
        ``run_dir`` is one clear error and no stray folders are created.
        """
        run = cls(path)
        if run.path.is_file():
            raise RunDirError(
                f"run_dir {run.path} is a file, not a run directory: give the folder "
                "runs/<name>/<run id> that sdi-attribute printed"
            )
        if not run.path.is_dir():
            raise RunDirError(
                f"run_dir {run.path} does not exist: give the folder runs/<name>/<run id> that "
                "sdi-attribute printed (sdi-attribute launcher=prepare creates one)"
            )
        if not run.config_path.is_file():
            raise RunDirError(
                f"{run.path} is not a run directory (no config.yaml): give the folder "
                "runs/<name>/<run id> that sdi-attribute printed"
            )
        return run

    def recorded_train_size(self) -> int | None:
        """The number of training examples the run was prepared with, if recorded."""
        try:
            return int(json.loads(self.train_size_path.read_text())["n_train"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # damaged: unknown (sdi-attribute records it again)

    def check_train_size(self, n_train: int) -> None:
        """Refuse a training set whose size changed since the run was prepared.

        Units are blocks of example indices; a data set that grew or shrank under the same
        config would silently shift them.
        """
        recorded = self.recorded_train_size()
        if recorded is not None and recorded != n_train:
            raise RunDirError(
                f"data.train has {n_train} examples, but run {self.path} was prepared with "
                f"{recorded} ({self.train_size_path.name}): the data changed under the same "
                "config. Restore it, or start a new run (another run.name or run.id)"
            )

    def record_train_size(self, n_train: int) -> None:
        """Record the training set's size (checked against an earlier record)."""
        self.check_train_size(n_train)
        write_json_atomic(self.train_size_path, {"n_train": n_train})

    def failure_path(self, unit: Unit) -> Path:
        return self.failures_dir / f"{unit.name}.json"

    def unit_path(self, unit: Unit) -> Path:
        return self.unit_path_named(unit.name)

    def marker_path(self, unit: Unit) -> Path:
        return self.marker_path_named(unit.name)

    def is_done(self, unit: Unit) -> bool:
        return self.unit_done(unit.name)

    def mark_done(self, unit: Unit, stats: dict[str, Any]) -> None:
        """Write the unit's completion marker (after its file is in place)."""
        write_json_atomic(self.marker_path(unit), stats)

    def create(self, cfg: DictConfig) -> None:
        """Write config.yaml, config.hash and provenance.json; an existing run must match."""
        digest = config_mod.config_hash(cfg)
        ensure_dir(self.path)
        if self.hash_path.exists() and self._hash_files_intact():
            self.check_hash(digest, cfg)
            # Launcher-only fields may have changed; a damaged config.yaml is rewritten.
            config_mod.save(cfg, self.config_path)
            return
        if self.hash_path.exists() and self.path.name != digest:
            raise RunDirError(
                f"{self.hash_path} or {self.attribution_path.name} in {self.path} is damaged, and "
                "the run id does not show which config the run was made for: restore them, or "
                "start a new run (another run.id)"
            )
        for sub in ("units", "completions", "query", "logs"):
            ensure_dir(self.path / sub)
        config_mod.save(cfg, self.config_path)
        write_text_atomic(self.hash_path, digest + "\n")
        write_json_atomic(self.attribution_path, config_mod.attribution_view(cfg))
        write_text_atomic(self.train_hash_path, config_mod.train_hash(cfg) + "\n")
        write_json_atomic(self.path / "provenance.json", provenance())

    def adopt_units(self) -> int:
        """Link the finished units of sibling runs with the same train hash into this run.

        Runs that differ only in the query set or merge settings share train sketches, so a
        new query set needs only the query job and the merge. Hard links cost no space;
        across filesystems the files are copied. Returns the number of units adopted.
        """
        mine = self.train_hash_path.read_text().strip()
        adopted = 0
        for sibling in sorted(self.path.parent.iterdir()):
            other = RunDir(sibling)
            if sibling == self.path or not other.train_hash_path.is_file():
                continue
            if other.train_hash_path.read_text().strip() != mine:
                continue
            for marker in sorted(other.completions_dir.glob("*")):
                if marker.name.startswith("."):
                    continue  # a temporary file
                unit_file = other.unit_path_named(marker.name)
                if (self.completions_dir / marker.name).exists() or not unit_file.exists():
                    continue
                # The unit file first, its marker last: a crash in between leaves it undone.
                for src, dst in (
                    (unit_file, self.unit_path_named(marker.name)),
                    (marker, self.completions_dir / marker.name),
                ):
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copy2(src, dst)
                adopted += 1
        return adopted

    def _hash_files_intact(self) -> bool:
        """Whether config.hash holds a hash and attribution.json is a JSON object."""
        try:
            stored = self.hash_path.read_text().strip()
            view = json.loads(self.attribution_path.read_text())
        except (OSError, ValueError):
            return False
        return bool(re.fullmatch(r"[0-9a-f]{16}", stored)) and isinstance(view, dict)

    def stored_hash(self) -> str:
        if not self.hash_path.exists():
            raise RunDirError(f"{self.path} is not a run directory (no config.hash)")
        stored = self.hash_path.read_text().strip()
        if not re.fullmatch(r"[0-9a-f]{16}", stored):
            raise RunDirError(
                f"{self.hash_path} is damaged (it should hold a 16-hex-digit hash): run the same "
                "sdi-attribute command again to restore it"
            )
        return stored

    def check_hash(self, digest: str, cfg: DictConfig) -> None:
        """Refuse a config whose attribution hash differs from the run's, showing the diff."""
        stored = self.stored_hash()
        if digest == stored:
            return

        def lines(view: Any) -> list[str]:
            return json.dumps(view, indent=1, sort_keys=True).splitlines()

        try:
            stored_view = json.loads(self.attribution_path.read_text())
        except (OSError, ValueError) as err:
            raise RunDirError(
                f"{self.attribution_path} is damaged ({err}): run the same sdi-attribute command "
                "again to restore it"
            ) from err
        now_view = config_mod.attribution_view(cfg)
        diff = "\n".join(
            difflib.unified_diff(
                lines(stored_view), lines(now_view), "run's config", "this config", lineterm=""
            )
        )
        raise RunDirError(
            f"config hash {digest} differs from the run's {stored} ({self.path}); the fields "
            f"that change the attribution differ:\n{diff or '(only installed schema defaults)'}\n"
            "Use another run.id (or run.name) for a different attribution, or the sdi-pipeline "
            "version that made the run."
        )

    def load_config(self) -> DictConfig:
        """The run's config, checked against its stored hash with this installed schema."""
        cfg = config_mod.load(self.config_path)
        self.check_hash(config_mod.config_hash(cfg), cfg)
        return cfg


def provenance() -> dict[str, Any]:
    """Where the run came from: the user's git state, package versions, host."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("sdi-pipeline", "torch", "opacus", "h5py", "hydra-core", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=20, check=True
        ).stdout

    try:
        repo: dict[str, Any] = {
            "commit": git("rev-parse", "HEAD").strip(),
            "diff": git("diff", "HEAD"),
        }
    except (OSError, subprocess.SubprocessError):
        repo = {"commit": None, "diff": None}
    return {
        "git": repo,
        "cwd": os.getcwd(),
        "argv": sys.argv,
        "versions": versions,
        "python": sys.version,
        "host": platform.node(),
    }


def prepare_run(data: Any) -> RunDir:
    """Resolve a config (checkpoint globs to files), create or reopen its run directory.

    The run id is ``run.id`` if given, else the attribution hash, so the same config finds
    the same run and resumes it.
    """
    from sdi_pipeline.inputs.build import resolve_checkpoints

    cfg = config_mod.structured(data)
    cfg.checkpoints.paths = resolve_checkpoints(list(cfg.checkpoints.paths))
    etas = cfg.checkpoints.etas
    if etas is not None and len(etas) != len(cfg.checkpoints.paths):
        raise ConfigError(
            f"checkpoints.etas has {len(etas)} values for {len(cfg.checkpoints.paths)} "
            "checkpoints: give one per checkpoint, or null to read them from the files"
        )
    run = RunDir(run_path(cfg))
    run.create(cfg)
    run.adopt_units()
    return run


def run_path(cfg: DictConfig) -> Path:
    """``<run.root>/<run.name>/<run id>``: the run id is ``run.id``, else the config hash."""
    return Path(cfg.run.root) / cfg.run.name / (cfg.run.id or config_mod.config_hash(cfg))
