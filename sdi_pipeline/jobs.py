"""The worker and query jobs: sketch blocks of a dataset at each checkpoint, write files.

Both jobs read everything from the run directory's config.yaml; a worker additionally gets
its rank and the world size. The same code runs under every launcher.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from sdi_pipeline import build
from sdi_pipeline.atomic import write_json_atomic
from sdi_pipeline.checkpoints import (
    CheckpointSpec,
    checkpoint_size,
    file_digest,
    load_checkpoint,
    load_into,
    resolve_eta_and_source,
)
from sdi_pipeline.config import config_hash, train_hash
from sdi_pipeline.dynamics import LoopTrace, trace_batches
from sdi_pipeline.engine.featurizer import StepFeatures, StepFeaturizer
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.errors import ConfigError, SDIError
from sdi_pipeline.launchers import allocated_cpus
from sdi_pipeline.logs import log, peak_rss_mb, setup_logging
from sdi_pipeline.rundir import RunDir, Unit, rank_units, run_units
from sdi_pipeline.store import read_meta, write_sketch_file
from sdi_pipeline.wandb_log import WandbLogger

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
    neither, a cluster job uses its CPU allocation (:func:`launchers.allocated_cpus`), not
    every core of the node.
    """

    def __init__(self, cfg: DictConfig, run: RunDir | None = None) -> None:
        self.run = run if run is not None else RunDir(".")
        self.cfg = cfg
        self.hash = config_hash(self.cfg)
        self.train_hash = train_hash(self.cfg)
        threads = os.environ.get("SDI_THREADS") or self.cfg.runtime.threads or allocated_cpus()
        if threads:
            torch.set_num_threads(int(threads))
        self.progress = bool(self.cfg.runtime.progress) and os.environ.get("SDI_PROGRESS") != "0"
        self.device = build.pick_device(self.cfg)
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
        self.featurizer = StepFeaturizer(
            self.model,
            list(self.cfg.analysis.targets),
            self.spec,
            expected_steps=self.cfg.analysis.expected_steps,
        )
        self._loaded: int | None = None
        self._info: dict[int, CheckpointInfo] = {}
        self.stop = threading.Event()

    @classmethod
    def open(cls, run_dir: str | Path) -> JobContext:
        """The context of a run directory (its config checked against its hash)."""
        run = RunDir(run_dir)
        return cls(run.load_config(), run)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self._loss(model, build.to_device(batch, self.device))

    def use_checkpoint(self, k: int) -> CheckpointInfo:
        """Load checkpoint k into the model (if not loaded) and describe it."""
        if self._loaded != k:
            path = self.checkpoints[k]
            data = load_checkpoint(path, trust=bool(self.cfg.checkpoints.trust))
            load_into(self.model, data, path)
            etas = self.cfg.checkpoints.etas
            spec = CheckpointSpec(path, None if etas is None else float(etas[k]))
            eta, source = resolve_eta_and_source(spec, data, given_by="checkpoints.etas")
            if k not in self._info:
                self._info[k] = CheckpointInfo(
                    k, path, checkpoint_size(path), file_digest(path), eta, source
                )
                log.info("checkpoint %d %s: eta %.6g from %s", k, path, eta, source)
            self._loaded = k
        return self._info[k]

    def base_meta(self, info: CheckpointInfo) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "params": [[p.name, list(p.shape)] for p in self.featurizer.params],
            "checkpoint": info.as_meta(),
            "train_hash": self.train_hash,
        }

    def sketch(
        self, dataset: Any, start: int, stop: int, desc: str, tokens: bool = False
    ) -> StepFeatures:
        """Sketch examples [start, stop) of ``dataset``; raises Interrupted on a stop request.

        ``tokens``: also per-token features, as ``analysis.query_tokens`` chooses."""
        loader = self._loader(dataset, start, stop)
        parts = []
        choice = self.query_tokens if tokens else None
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
        return StepFeatures.concat(parts)

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
        """While inside, SIGTERM (preemption) and SIGINT stop after the current batch."""
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


def run_worker(run_dir: str | Path, rank: int, world_size: int) -> int:
    """Sketch this rank's units (``units[rank::world_size]``) that are not done yet.

    Returns 0 when all its units are done, EXIT_INTERRUPTED when stopped by a signal.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    setup_logging(RunDir(run_dir), f"worker-{rank:04d}")
    ctx = JobContext.open(run_dir)
    name = f"worker-{rank:04d}"
    with ctx.signals_stop(), WandbLogger(ctx.cfg, ctx.run, "worker", name) as wandb_log:
        return _work(ctx, rank, world_size, wandb_log)


def _work(ctx: JobContext, rank: int, world_size: int, wandb_log: WandbLogger) -> int:
    run = ctx.run
    train = build.build_dataset(ctx.cfg, "train")
    run.check_train_size(len(train))
    mine = rank_units(run_units(ctx.cfg, len(train)), rank, world_size)
    todo = [u for u in mine if not run.is_done(u)]
    log.info(
        "rank %d/%d on %s (%s): %d units, %d already done",
        rank, world_size, socket.gethostname(), ctx.device, len(mine), len(mine) - len(todo),
    )  # fmt: skip
    for i, unit in enumerate(todo):
        try:
            stats = _unit(ctx, train, unit, f"[{i + 1}/{len(todo)}] {unit.name}", rank, world_size)
            if i == 0:
                log.info("targets: %s", ctx.featurizer.assignment)
        except Interrupted:
            log.warning("stopped during %s; it will be redone on restart", unit.name)
            return EXIT_INTERRUPTED
        except Exception as err:
            # Recorded so sdi-status can name the unit and its log; the job still fails.
            write_json_atomic(
                run.failure_path(unit),
                {"unit": unit.name, "rank": rank, "error": f"{type(err).__name__}: {err}",
                 "log": str(run.logs_dir / f"worker-{rank:04d}.log"), "host": socket.gethostname()},
            )  # fmt: skip
            log.error("unit %s failed: %s: %s", unit.name, type(err).__name__, err)
            raise
        run.failure_path(unit).unlink(missing_ok=True)
        wandb_log.log_unit(stats)
        if ctx.stop.is_set():
            log.warning("stopping after %s on request", unit.name)
            return EXIT_INTERRUPTED
    log.info("rank %d/%d: all %d units done", rank, world_size, len(mine))
    return 0


def _unit(
    ctx: JobContext, train: Any, unit: Unit, desc: str, rank: int, world_size: int
) -> dict[str, Any]:
    """Sketch one unit, write its file, then its completion marker; returns its stats."""
    run = ctx.run
    started = time.perf_counter()
    info = ctx.use_checkpoint(unit.ckpt)
    feats = ctx.sketch(train, unit.start, unit.stop, desc)
    meta = ctx.base_meta(info) | {
        "kind": "train",
        "layout": feats.layout.to_dict(),
        "train_steps": ctx.cfg.sketch.train_steps,
        "block": {"index": unit.block, "start": unit.start, "stop": unit.stop},
    }
    values = feats.summed() if ctx.cfg.sketch.train_steps == "summed" else feats.values
    indices = torch.arange(unit.start, unit.stop)
    write_sketch_file(run.unit_path(unit), indices, values, feats.loss, meta, ctx.cfg.sketch.dtype)
    seconds = time.perf_counter() - started
    stats = {
        "unit": unit.name,
        "examples": unit.stop - unit.start,
        "seconds": round(seconds, 4),
        "examples_per_s": round((unit.stop - unit.start) / max(seconds, 1e-9), 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rank": rank,
        "world_size": world_size,
        "host": socket.gethostname(),
    }
    if ctx.device.type == "cuda":
        stats["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(ctx.device) / 2**20, 1)
    run.mark_done(unit, stats)
    log.info(
        "done %s: %d examples in %.2fs (%.1f ex/s), peak RSS %.0f MiB",
        unit.name, stats["examples"], seconds, stats["examples_per_s"], stats["peak_rss_mb"],
    )  # fmt: skip
    return stats


def run_query(run_dir: str | Path) -> int:
    """Sketch the query set at every checkpoint (skipping valid existing files)."""
    setup_logging(RunDir(run_dir), "query")
    ctx = JobContext.open(run_dir)
    with ctx.signals_stop(), WandbLogger(ctx.cfg, ctx.run, "query", "query") as wandb_log:
        return _query(ctx, wandb_log)


def _query(ctx: JobContext, wandb_log: WandbLogger) -> int:
    run = ctx.run
    query = build.build_dataset(ctx.cfg, "query")
    for k in range(len(ctx.checkpoints)):
        path = run.query_path(k)
        if path.exists():
            try:
                if read_meta(path).get("config_hash") == ctx.hash:
                    log.info("query sketches for checkpoint %d exist: %s", k, path)
                    continue
            except SDIError as err:
                log.warning("rewriting %s: %s", path, err)
        info = ctx.use_checkpoint(k)
        started = time.perf_counter()
        try:
            feats = ctx.sketch(query, 0, len(query), f"query ckpt {k}", tokens=True)
        except Interrupted:
            log.warning("query job stopped during checkpoint %d", k)
            return EXIT_INTERRUPTED
        meta = ctx.base_meta(info) | {
            "kind": "query",
            "layout": feats.layout.to_dict(),
            "assignment": ctx.featurizer.assignment,
            "config_hash": ctx.hash,
        }
        extra = {}
        if feats.tokens is not None and feats.positions is not None:
            extra = {"token_sketch": feats.tokens, "token_positions": feats.positions}
            meta["query_tokens"] = ctx.query_tokens
        if ctx.loop_trace is not None:
            trace = ctx.trace(query, feats.layout.loop_steps)
            extra |= {"loop_states": trace.states, "loop_margins": trace.margins}
        write_sketch_file(
            path,
            torch.arange(len(query)),
            feats.values,
            feats.loss,
            meta,
            ctx.cfg.sketch.dtype,
            extra=extra,
        )
        log.info("wrote %s (%d queries; targets: %s)", path, len(query), ctx.featurizer.assignment)
        seconds = time.perf_counter() - started
        wandb_log.log({"query/checkpoint": k, "query/seconds": seconds, "query/n": len(query)})
    return 0
