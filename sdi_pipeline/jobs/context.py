"""What every job shares: the job context built from the run's config, starting a job,
ranked jobs' rank checks, and the query files' freshness check.

Files are content-addressed: each records what it depends on (``depends``: checkpoint
sha256, digest of its examples, sketch spec, targets, parameters, format) and a job reuses
a finished file only while those are unchanged; a stale or damaged one is logged
(``stale: <unit>: <why>``), its marker removed, and recomputed. The same code runs under
every launcher: the jobs read everything from the run directory's config.yaml.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from sdi_pipeline.engine.checks import check_forward
from sdi_pipeline.engine.featurizer import StepFeatures, StepFeaturizer, target_params
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.errors import CheckpointError, ConfigError, SDIError
from sdi_pipeline.files.atomic import clean_temp_files
from sdi_pipeline.files.digests import DigestCache, record_digest
from sdi_pipeline.formats.sketches import (
    FORMAT_VERSION,
    UnitReader,
    read_sketch_file,
    verify_sketch_file,
)
from sdi_pipeline.inputs import build
from sdi_pipeline.inputs.checkpoints import (
    CheckpointSpec,
    checkpoint_size,
    load_checkpoint,
    load_into,
    resolve_eta_and_source,
)
from sdi_pipeline.inputs.content import BatchCheck, HashingSubset, batch_check, block_digest
from sdi_pipeline.inputs.dynamics import LoopTrace, trace_batches
from sdi_pipeline.jobs.allocation import allocated_cpus, local_rank
from sdi_pipeline.jobs.logs import log, setup_logging
from sdi_pipeline.jobs.scoring import (
    Scoring,
    query_set,
    scoring_plan,
)
from sdi_pipeline.report.wandb_log import WandbLogger
from sdi_pipeline.run.config import config_hash, train_hash
from sdi_pipeline.run.freshness import (
    explain_stale,
    read_attrs,
)
from sdi_pipeline.run.leases import Holder
from sdi_pipeline.run.rundir import RunDir, Unit

T = TypeVar("T")

# Exit status of a job stopped by SIGTERM/SIGINT before finishing its work (EX_TEMPFAIL).
EXIT_INTERRUPTED = 75


class Interrupted(Exception):
    """The job was asked to stop (SIGTERM / SIGINT) between two batches."""


@dataclass
class CheckpointInfo:
    """A loaded checkpoint: where it is, its digest and eta (and where eta was read)."""

    index: int
    path: str
    size: int
    sha256: str
    eta: float
    eta_source: str

    def as_meta(self) -> dict[str, Any]:
        """The sketch files' checkpoint record (docs/format.md); eta's source is logged."""
        return {
            "index": self.index,
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "eta": self.eta,
        }


class JobContext:
    """What every job builds from a config: model, loss, featurizer, checkpoints.

    ``SDI_THREADS`` and ``SDI_PROGRESS=0`` in the environment (set by the local launcher
    for its parallel workers) override ``runtime.threads`` and ``runtime.progress``. With
    neither, a cluster job uses its CPU allocation
    (:func:`~sdi_pipeline.jobs.allocation.allocated_cpus`), not
    every core of the node.
    """

    def __init__(self, cfg: DictConfig, run: RunDir | None = None) -> None:
        self.run = run if run is not None else RunDir(".")
        self.cfg = cfg
        self.hash = config_hash(self.cfg)
        self.train_hash = train_hash(self.cfg)
        # Checkpoint digests, cached by file identity in the run dir (in memory without one).
        self.digests = DigestCache(run.digest_cache_path if run is not None else None)
        threads = os.environ.get("SDI_THREADS") or self.cfg.runtime.threads or allocated_cpus()
        if threads:
            torch.set_num_threads(int(threads))
        self.progress = bool(self.cfg.runtime.progress) and os.environ.get("SDI_PROGRESS") != "0"
        self.device = build.pick_device(self.cfg, local_rank())
        self.model = build.build_model(self.cfg).to(self.device)
        self._loss = build.build_loss(self.cfg)
        self.loop_trace = build.build_loop_trace(self.cfg)
        self._collate = build.build_collate(self.cfg)
        self.checkpoints = list(self.cfg.checkpoints.paths)
        tokens = self.cfg.analysis.query_tokens
        self.query_tokens = None if tokens is None else (
            tokens if isinstance(tokens, str) else [int(p) for p in tokens]
        )  # fmt: skip
        self.spec = SketchSpec(
            m=int(self.cfg.sketch.m), seed=int(self.cfg.sketch.seed), kernel=self.cfg.sketch.kernel
        )
        # The analysed parameters (in the depends records) now; the featurizer on first use:
        # choosing its layer handlers may import Opacus, which a rerun with nothing to do
        # does not need.
        self.params = target_params(self.model, list(self.cfg.analysis.targets))
        self._featurizer: StepFeaturizer | None = None
        self._forward_checked = False
        self.lease_timeout = float(self.cfg.runtime.lease_timeout_s)
        self.store_train = bool(self.cfg.sketch.store_train)
        self.reader = UnitReader()
        self._loaded: tuple[int, str] | None = None
        # Checkpoints kept in memory (by index: sha256, contents) up to runtime.checkpoint_cache_gb:
        # a worker goes through every checkpoint once per block.
        self._cached: dict[int, tuple[str, Any]] = {}
        self._info: dict[int, CheckpointInfo] = {}
        self._block_digests: dict[int, str] = {}
        self.stop = threading.Event()

    @property
    def featurizer(self) -> StepFeaturizer:
        """The run's featurizer (built on first use)."""
        if self._featurizer is None:
            self._featurizer = StepFeaturizer(
                self.model,
                list(self.cfg.analysis.targets),
                self.spec,
                expected_steps=self.cfg.analysis.expected_steps,
                loop_entry=self.cfg.analysis.loop_entry,
            )
        return self._featurizer

    @classmethod
    def open(cls, run_dir: str | Path) -> JobContext:
        """The context of a run directory (its config checked against its hash)."""
        run = RunDir.existing(run_dir)
        return cls(run.load_config(), run)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self._loss(model, build.to_device(batch, self.device))

    def batch_check(self) -> BatchCheck:
        """What the jobs do to a batch before the model: this run's collate and the loss's
        checks of its inputs (for the preflight, which names a failing example's row)."""
        return batch_check(self._collate, self._loss)

    def checkpoint_sha(self, k: int) -> str:
        """sha256 of checkpoint k now (from the run's digest cache when the file is unchanged)."""
        path = self.checkpoints[k]
        try:
            return self.digests.sha256(path)
        except OSError as err:
            raise CheckpointError(f"cannot read checkpoint {path} ({err})") from err

    def use_checkpoint(self, k: int) -> CheckpointInfo:
        """Load checkpoint k into the model (unless loaded and unchanged) and describe it."""
        path = self.checkpoints[k]
        sha = self.checkpoint_sha(k)
        if self._loaded != (k, sha):
            size = checkpoint_size(path)
            cached = self._cached.get(k)
            if cached is not None and cached[0] == sha:
                data = cached[1]
            else:
                data = load_checkpoint(path, trust=bool(self.cfg.checkpoints.trust))
                if self.checkpoint_sha(k) != sha:
                    raise CheckpointError(
                        f"checkpoint {path} changed while it was read: wait until it is written "
                        "completely, then run the same command again"
                    )
                self._cache_checkpoint(k, sha, size, data)
            load_into(self.model, data, path, trust=bool(self.cfg.checkpoints.trust))
            etas = self.cfg.checkpoints.etas
            spec = CheckpointSpec(path, None if etas is None else float(etas[k]))
            eta, source = resolve_eta_and_source(spec, data, given_by="checkpoints.etas")
            if k not in self._info or self._info[k].sha256 != sha:
                log.info("checkpoint %d %s: eta %.6g from %s", k, path, eta, source)
            self._info[k] = CheckpointInfo(k, path, size, sha, eta, source)
            self._loaded = (k, sha)
        return self._info[k]

    def _cache_checkpoint(self, k: int, sha: str, size: int, data: Any) -> None:
        self._cached.pop(k, None)
        held = sum(self._info[i].size for i in self._cached if i in self._info)
        if held + size <= float(self.cfg.runtime.checkpoint_cache_gb) * 2**30:
            self._cached[k] = (sha, data)

    def scoring(self, n_train: int) -> Scoring | None:
        """The run's query set, ready to score against, when every query file is complete
        and current; None otherwise (logged). Each file is read once, every value verified."""
        query = build.build_dataset(self.cfg, "query")
        query_sha = block_digest(query, 0, len(query), "query")
        files = []
        for k in range(len(self.checkpoints)):
            path = self.run.query_path(k)
            why = query_record_problem(path, self.query_depends(k, query_sha))
            if not why and path.exists():
                try:
                    files.append(read_sketch_file(path))
                except SDIError as err:
                    why = getattr(err, "what", str(err))
            if why or not path.exists():
                log.info("query sketches of checkpoint %d not ready (%s)", k, why or "missing")
                return None
        queries = query_set(files, self.device)
        return Scoring(queries, scoring_plan(self.cfg, n_train, queries))

    def base_meta(self, info: CheckpointInfo) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "params": [[p.name, list(p.shape)] for p in self.params],
            "checkpoint": info.as_meta(),
            "train_hash": self.train_hash,
        }

    def depends(
        self, kind: str, checkpoint_sha: str, data_sha: str, **extra: Any
    ) -> dict[str, Any]:
        """Everything a sketch file of ``kind`` depends on: its content address's record."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "checkpoint_sha256": checkpoint_sha,
            "data_sha256": data_sha,
            "spec": self.spec.to_dict(),
            "targets": list(self.cfg.analysis.targets),
            "params": [[p.name, list(p.shape)] for p in self.params],
            "dtype": str(self.cfg.sketch.dtype),
            **extra,
        }

    def unit_depends(self, unit: Unit, train: Any) -> dict[str, Any]:
        """What unit ``unit`` depends on now (its block's examples are hashed once per job)."""
        if unit.block not in self._block_digests:
            self._block_digests[unit.block] = block_digest(train, unit.start, unit.stop)
        return self.depends(
            "train",
            self.checkpoint_sha(unit.ckpt),
            self._block_digests[unit.block],
            train_hash=self.train_hash,
            train_steps=str(self.cfg.sketch.train_steps),
            block={"index": unit.block, "start": unit.start, "stop": unit.stop},
        )

    def query_depends(self, k: int, query_sha: str) -> dict[str, Any]:
        return self.depends("query", self.checkpoint_sha(k), query_sha, config_hash=self.hash)

    def sketch(
        self, dataset: Any, start: int, stop: int, desc: str, which: str = "train"
    ) -> tuple[StepFeatures, str]:
        """Sketch examples [start, stop) of ``dataset``: the features and the digest of the
        examples they were computed from. Raises Interrupted on a stop request. Queries
        also get per-token features, as ``analysis.query_tokens`` chooses."""
        self._check_forward(dataset, start, stop)
        subset = HashingSubset(dataset, start, stop, which)
        loader = DataLoader(
            subset,
            batch_size=int(self.cfg.data.batch_size),
            shuffle=False,
            collate_fn=self._collate,
        )
        parts = []
        choice = self.query_tokens if which == "query" else None
        batches = self.featurizer.iter_batches(
            loader, self.loss, progress=self.progress, desc=desc, tokens=choice
        )
        try:
            for part in batches:
                parts.append(part)
                if self.stop.is_set():
                    raise Interrupted(desc)
        finally:
            batches.close()
        return StepFeatures.concat(parts), subset.digest()

    def _check_forward(self, dataset: Any, start: int, stop: int) -> None:
        """Once per process, before the first features: refuse a forward that is not
        deterministic or examples coupled within a batch (engine.checks), on the first batch
        this job sketches with the checkpoint it has loaded."""
        if self._forward_checked:
            return
        size = int(self.cfg.data.batch_size)
        batch = next(iter(self._loader(dataset, start, min(stop, start + size))))
        note = check_forward(
            self.model,
            self.loss,
            batch,
            allow_coupled=bool(self.cfg.analysis.allow_coupled_batch),
        )
        if note is not None:
            log.warning("%s", note)
        self._forward_checked = True

    def trace(self, dataset: Any, loop_steps: int, stop: int | None = None) -> LoopTrace:
        """``analysis.loop_trace`` of examples [0, stop) of ``dataset`` (default: all)."""
        assert self.loop_trace is not None
        n = len(dataset) if stop is None else stop
        batches = (build.to_device(b, self.device) for b in self._loader(dataset, 0, n))
        trace = trace_batches(self.loop_trace, self.model, batches, loop_steps)
        trace.check(loop_steps, n)
        return trace

    def _loader(self, dataset: Any, start: int, stop: int) -> DataLoader:
        return DataLoader(
            Subset(dataset, range(start, stop)),
            batch_size=int(self.cfg.data.batch_size),
            shuffle=False,
            collate_fn=self._collate,
        )

    @contextmanager
    def signals_stop(self) -> Iterator[None]:
        """While inside, SIGTERM (preemption) and SIGINT stop after the current batch (a
        repeated signal too: a scheduler may send it to every process of the job)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: Any) -> None:
            log.warning(
                "received %s: stopping after the current batch", signal.Signals(signum).name
            )
            self.stop.set()

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def start_job(run_dir: str | Path, name: str) -> RunDir:
    """Open the run dir, log to its logs/<name>.log, remove killed writers' temporary files."""
    run = RunDir.existing(run_dir)
    setup_logging(run, name)
    removed = clean_temp_files(run.folders())
    if removed:
        log.info("removed %d temporary file(s) of killed writers", len(removed))
    return run


def poll_seconds(ctx: JobContext) -> float:
    """How often a job waiting for units leased by others looks again."""
    return min(5.0, max(0.2, ctx.lease_timeout / 20))


def until_done(ctx: JobContext, items: list[T], attempt: Callable[[T], Holder | int]) -> int:
    """Attempt each item; one leased by another live job (``attempt`` returns its Holder) is
    attempted again after a pause, until none is left: its owner finishes it, or its lease
    runs out and this job takes it over. EXIT_INTERRUPTED as soon as an attempt was stopped
    or a stop is requested while waiting; 0 when every item is done."""
    pending = list(items)
    while pending:
        still = []
        for item in pending:
            outcome = attempt(item)
            if isinstance(outcome, Holder):
                still.append(item)
            elif outcome == EXIT_INTERRUPTED:
                return EXIT_INTERRUPTED
        pending = still
        if pending:
            if ctx.stop.is_set():
                return EXIT_INTERRUPTED
            time.sleep(poll_seconds(ctx))
    return 0


def ranked_job(
    run_dir: str | Path,
    rank: int,
    world_size: int,
    job: str,
    body: Callable[[JobContext, int, int, WandbLogger], int],
) -> int:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    name = f"{job}-{rank:04d}"
    start_job(run_dir, name)
    ctx = JobContext.open(run_dir)
    with ctx.signals_stop(), WandbLogger(ctx.cfg, ctx.run, job, name) as wandb_log:
        return body(ctx, rank, world_size, wandb_log)


def query_fresh(path: Path, current: dict[str, Any]) -> tuple[bool, str]:
    """Whether the query file at ``path`` matches ``current`` depends, and if not, why."""
    why = query_record_problem(path, current)
    if not why and path.exists():
        try:  # query files are small: every value is verified (checksums, finite)
            verify_sketch_file(path)
        except SDIError as err:
            why = getattr(err, "what", str(err))
    return path.exists() and not why, why


def query_record_problem(path: Path, current: dict[str, Any]) -> str:
    """Why the query file's record (its header) does not match ``current`` depends: empty
    when it does, and when the file is missing."""
    if not path.exists():
        return ""
    try:
        attrs = read_attrs(path, "content_digest", "depends", "format_version")
    except SDIError as err:
        return str(err)
    recorded = attrs.get("depends") if isinstance(attrs.get("depends"), dict) else {}
    why = explain_stale(recorded or {}, current)
    if not why and attrs.get("content_digest") != record_digest(current):
        why = "its content digest does not match its record"
    return why
