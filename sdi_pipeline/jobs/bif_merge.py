"""The BIF merge (``sdi-merge`` with method=bif): check the run, score any block whose shard
is missing from its stored traces, fold the shards into results.h5.

Every query trace file must be current (its checkpoint, the training and query examples, the
sampler settings) and every unit done; otherwise the merge refuses in one line naming what
is missing. The per-example BIF datasets are HDF5 virtual datasets over the shards (as the
SDI ones); the top-k is folded from the shards' own top-k; the LLC and the chains' losses
come from the query files.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sdi_pipeline.errors import MergeRefused
from sdi_pipeline.formats.results import Results, stale_reasons, write_results
from sdi_pipeline.formats.traces import read_bif_file
from sdi_pipeline.inputs import build
from sdi_pipeline.inputs.content import block_digest
from sdi_pipeline.jobs.bif_context import SIGNS, BifJob
from sdi_pipeline.jobs.bif_query import query_depends, query_problem
from sdi_pipeline.jobs.bif_worker import block_state, load_queries, score_block_units
from sdi_pipeline.jobs.context import JobContext
from sdi_pipeline.jobs.logs import log
from sdi_pipeline.jobs.scores import RunningTopK
from sdi_pipeline.messages import shortened
from sdi_pipeline.report.plots import bif_figures
from sdi_pipeline.report.wandb_log import WandbLogger
from sdi_pipeline.run.config import config_hash
from sdi_pipeline.run.freshness import record_data_files
from sdi_pipeline.run.layout import bif_block_name
from sdi_pipeline.run.rundir import RunDir, run_blocks, run_path

RERUN = "run the same sdi-attribute command again (or sdi-query, the workers, then sdi-merge)"


def bif_merge(run: RunDir) -> int:
    """Validate the BIF run, score blocks nobody scored, write results.h5 and the plots."""
    ctx = JobContext(run.load_config(), run)
    job = BifJob(ctx)
    cfg = ctx.cfg
    # Before the data is read and hashed: a file changed during the merge shows as changed.
    data_files = record_data_files(cfg.data)
    train = build.build_dataset(cfg, "train")
    query = build.build_dataset(cfg, "query")
    n_train = len(train)
    run.check_train_size(n_train)
    started = time.perf_counter()
    train_sha = block_digest(train, 0, n_train)
    query_sha = block_digest(query, 0, len(query), "query")
    problems = []
    for k in range(len(ctx.checkpoints)):
        why = query_problem(run.bif_query_path(k), query_depends(job, k, train_sha, query_sha))
        if why:
            problems.append(f"query traces of checkpoint {k}: {why}")
    if problems:
        raise MergeRefused(f"the merge refuses this run: {' | '.join(problems)}; {RERUN}")
    queries = load_queries(job)
    blocks = run_blocks(cfg, n_train)
    missing: list[str] = []
    unit_digests: dict[str, str] = {}
    for block in blocks:
        units, _currents, whys = block_state(job, train, queries, block)
        undone = [u.name for u, why in zip(units, whys, strict=True) if why]
        if undone:
            missing.extend(undone)
            continue
        for unit in units:
            unit_digests[unit.name] = str((run.read_marker(unit.name) or {})["content_digest"])
        score_block_units(job, queries, block, units)
    if missing:
        raise MergeRefused(
            f"the merge refuses this run: {len(missing)} BIF units not done or stale: "
            f"{shortened(missing)}; {RERUN}"
        )
    k_top = int(cfg.merge.topk)
    n_query = queries.traces[0].z_sequence.shape[0]
    tops = {sign: RunningTopK((n_query,), k_top, sign) for sign in SIGNS}
    shapes: dict[str, tuple[int, ...]] = {}
    shard_digests: dict[str, str] = {}
    for block in blocks:
        shard = read_bif_file(run.bif_shard_path(block.index), "bif-scores")
        shard_digests[bif_block_name(block.index)] = str(shard.meta["content_digest"])
        for sign, top in tops.items():  # type: ignore[assignment]
            top.fold(
                torch.from_numpy(shard.arrays[f"topk/{sign}/indices"]),
                torch.from_numpy(shard.arrays[f"topk/{sign}/scores"]),
            )
        rows = {n: a.shape[1:] for n, a in shard.arrays.items() if n.startswith("bif")}
        if not shapes:
            shapes = rows
        elif rows != shapes:
            raise MergeRefused(
                f"the merge refuses this run: {run.bif_shard_path(block.index)} holds datasets "
                f"of other shapes than the others ({rows} vs {shapes}); delete it and {RERUN}"
            )
    files = [read_bif_file(run.bif_query_path(k), "bif-query") for k in range(len(queries.meta))]
    etas = [float(f.meta["eta"]) for f in files]
    attrs = {
        "method": "bif",
        "config_hash": ctx.hash,
        "n_train": n_train,
        "etas": etas,
        "checkpoints": list(cfg.checkpoints.paths),
        "sdi_stored": False,
        "train_steps": "",
        "topk": k_top,
        "assignment": "BIF (SGLD loss-trace correlations; no loop-step slots)",
        "query_tokens": json.dumps(None),
        "bif_settings": json.dumps(job.settings()),
        "bif_sgld": json.dumps(queries.meta[0]["depends"]["chain"]["sgld"]),
    }
    shard_files = [run.bif_shard_path(b.index).relative_to(run.path) for b in blocks]
    sources = [(str(f), b.start, b.stop) for f, b in zip(shard_files, blocks, strict=True)]
    with write_results(
        run.results_path,
        n_query=n_query,
        query_layout={},
        train_layout={},
        slot_names=[],
        train_slot_names=[],
        attrs=attrs,
    ) as out:
        for name, rest in sorted(shapes.items()):
            out.stitch(f"bif/{name.removeprefix('bif').lstrip('_') or 'scores'}", name,
                       (n_train, *rest), 0, sources)  # fmt: skip
        extra: dict[str, np.ndarray] = {
            "llc": np.stack([f.arrays["llc"] for f in files]),
            "init_loss": np.array([float(f.meta["init_loss"]) for f in files]),
            "step_losses": np.stack([f.arrays["step_losses"] for f in files]),
            # The queries' traces averaged over positions: (K, C, D, M).
            "query_traces": np.stack([f.arrays["traces/loss"].mean(axis=-1) for f in files]),
        }
        for sign, top in tops.items():
            result = top.result()
            extra[f"topk/{sign}/indices"] = result.indices.numpy()
            extra[f"topk/{sign}/scores"] = result.scores.float().numpy()
        out.write_bif(extra)
        out.write_inputs(
            config_hash=ctx.hash,
            units=unit_digests,
            shards=shard_digests,
            query=[],
            checkpoints=list(cfg.checkpoints.paths),
            checkpoint_sha256=[ctx.checkpoint_sha(k) for k in range(len(ctx.checkpoints))],
            data_files=data_files,
            bif_query=queries.digests,
        )
    log.info(
        "wrote %s: BIF of %d train x %d queries from %d shards in %.1fs",
        run.results_path, n_train, n_query, len(blocks), time.perf_counter() - started,
    )  # fmt: skip
    with Results.open(run.results_path) as res:
        tracin = _sibling_tracin(cfg, res)
        for path in bif_figures(res, run.path / "plots", tracin):
            log.info("wrote %s", path)
    with WandbLogger(cfg, run, "merge", "merge") as wandb_log:
        wandb_log.log_merge(run.results_path)
    return 0


def _sibling_tracin(cfg: DictConfig, res: Results) -> np.ndarray | None:
    """TracIn (N, M) of the SDI run of this very config (method=sdi: the same data,
    checkpoints and model) when it is merged and current, for the ranking comparison."""
    sdi = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    assert isinstance(sdi, DictConfig)
    sdi.method = "sdi"
    sdi.run.id = None
    path = run_path(sdi).parent / config_hash(sdi) / "results.h5"
    if not path.is_file() or stale_reasons(path):
        return None
    with Results.open(path) as other:
        if (other.n_train, other.n_query) != (res.n_train, res.n_query):
            return None
        log.info("comparing BIF with the TracIn of %s", path)
        return np.asarray(other.tracin[:])
