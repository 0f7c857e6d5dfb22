"""Benchmarks of the distributed core on the toy model, printed side by side in one run.

1. Scoring one unit against the queries, against a bare torch addmm of the same shapes on
   tensors already in memory: (a) as a worker does it, from the sketches it has just made
   (`BlockScorer.add`: checks, sum over steps, one matmul, the sketch-norm diagnostic from
   the norms the featurizer's finite check computed), target bare / scoring >= 0.7, and the
   same with the norms recomputed from the sketches, as the scorer did before the featurizer
   handed them over; (b) as `sdi-score` (and the merge, for a block nobody scored) do it,
   from the stored unit file (HDF5 read with checksums, finite check, then the same),
   reported with its read rate. The three in memory are timed in interleaved rounds, (b)
   apart (its file read evicts the others' sketches from the caches).
2. Worker peak memory (max RSS of a `sdi-worker` process) at N_train = 1k and 16k.
   Target: growth under 10%.
3. Bytes on disk per training example per checkpoint, `train_steps=full` and `summed`.

    python tools/bench/bench_pipeline.py [--threads 2] [--m 1024] [--big 16384]

Run it alone: other processes on the machine distort the timings.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from pipeline_helpers import parity, toy_config  # noqa: E402

from sdi_pipeline.formats.sketches import (  # noqa: E402
    MATCHING_KEYS,
    SketchFile,
    UnitReader,
    read_sketch_file,
)
from sdi_pipeline.jobs.query import run_query  # noqa: E402
from sdi_pipeline.jobs.scoring import (  # noqa: E402
    BlockScorer,
    QuerySet,
    ScoringPlan,
    add_stored,
    query_set,
)
from sdi_pipeline.jobs.worker import run_worker  # noqa: E402
from sdi_pipeline.run.rundir import RunDir, prepare_run, run_blocks  # noqa: E402


def make_run(tmp: Path, name: str, n_train: int, m: int, steps: str, threads: int) -> RunDir:
    cfg = toy_config(
        tmp,
        run={"name": name},
        data={
            "train": parity(n_train, 1),
            "query": parity(16, 2),
            "block_size": 512,
            "batch_size": 64,
        },
        sketch={"m": m, "train_steps": steps},
        runtime={"progress": False, "threads": threads},
    )
    cfg["checkpoints"]["paths"] = [str(tmp / "ckpts" / "ckpt-000000.pt")]
    return prepare_run(cfg)


def worker_peak_rss_mb(run: RunDir, threads: int) -> tuple[float, float]:
    """Run one worker process over the whole run; its max RSS (MiB) and wall time (s)."""
    started = time.perf_counter()
    code = (
        "import resource, sys\n"
        "from sdi_pipeline.jobs.worker import run_worker\n"
        f"assert run_worker({str(run.path)!r}, 0, 1) == 0\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    env_threads = {"SDI_THREADS": str(threads), "PYTHONPATH": str(ROOT / "tests")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env_threads},
    )
    return int(out.stdout.strip().splitlines()[-1]) / 1024, time.perf_counter() - started


def interleaved_medians(fns: tuple[Any, ...], repeats: int) -> tuple[float, ...]:
    """Median seconds of each function over ``repeats`` rounds, each called once a round."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, spent in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return tuple(sorted(t)[len(t) // 2] for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--small", type=int, default=1024)
    parser.add_argument("--big", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--queries", type=int, nargs="+", default=[16, 128])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"command: python tools/bench/bench_pipeline.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"torch {torch.__version__}, {args.threads} threads, m={args.m}\n")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        memory, disk = {}, {}
        for n in (args.small, args.big):
            run = make_run(tmp, f"full-{n}", n, args.m, "full", args.threads)
            assert run_query(run.path) == 0
            memory[n] = worker_peak_rss_mb(run, args.threads)
            files = sorted(run.units_dir.glob("*.h5"))
            disk["full"] = sum(f.stat().st_size for f in files) / n
            full_run = run
        summed = make_run(tmp, "summed", args.small, args.m, "summed", args.threads)
        assert run_query(summed.path) == 0 and run_worker(summed.path, 0, 1) == 0
        disk["summed"] = sum(f.stat().st_size for f in summed.units_dir.glob("*.h5")) / args.small

        # 1. Scoring one stored unit vs a bare matmul of the same shapes. Random query
        # sketches of each size (with the real query file's attributes) stand in for query sets.
        config = full_run.load_config()
        block = run_blocks(config, args.big)[0]
        unit = block.units[0]
        train = torch.from_numpy(read_sketch_file(full_run.unit_path(unit)).sketch)
        n_unit, slots, m = train.shape
        real_query = read_sketch_file(full_run.query_path(0))
        reader = UnitReader()
        attrs = {key: real_query.meta[key] for key in MATCHING_KEYS}
        losses = torch.zeros(n_unit).numpy()
        # A worker has the per-step norms from the featurizer's finite check.
        norms = torch.linalg.vector_norm(train, dim=2)
        merge_times = {}
        for n_query in args.queries:
            sketch = torch.randn(n_query, slots, m).numpy()
            fake = SketchFile(real_query.indices, sketch, real_query.loss, real_query.meta, {})
            queries = query_set([fake], torch.device("cpu"))
            q_flat = queries.flat[0]
            out = torch.zeros(n_unit, q_flat.shape[1])
            plan = ScoringPlan(topk=10, sdi=True, step_matrix=False, sdi_tokens=False)

            def in_worker(queries: QuerySet = queries, plan: ScoringPlan = plan) -> None:
                scorer = BlockScorer(block, queries, plan, torch.device("cpu"))
                scorer.add(unit, train, losses, attrs, {}, norms)

            def recomputing(queries: QuerySet = queries, plan: ScoringPlan = plan) -> None:
                scorer = BlockScorer(block, queries, plan, torch.device("cpu"))
                scorer.add(unit, train, losses, attrs, {})  # the norms read the sketches again

            def stored(queries: QuerySet = queries, plan: ScoringPlan = plan) -> None:
                scorer = BlockScorer(block, queries, plan, torch.device("cpu"))
                add_stored(scorer, full_run, unit, reader)

            def bare(q_flat: torch.Tensor = q_flat, out: torch.Tensor = out) -> None:
                out.addmm_(train.sum(dim=1), q_flat)

            # Reading the file evicts the sketches in memory from the caches: (b) is timed
            # on its own, the three in-memory ways interleaved.
            t_worker, t_bare, t_before = interleaved_medians(
                (in_worker, bare, recomputing), args.repeats
            )
            (t_stored,) = interleaved_medians((stored,), args.repeats)
            merge_times[n_query] = (t_worker, t_stored, t_bare, t_before)

    rss_small, rss_big = memory[args.small][0], memory[args.big][0]
    n_unit, slots, m = train.shape
    print("1. scoring one unit: (a) in the worker, (b) from its file; vs bare addmm")
    unit_bytes = n_unit * slots * m * 4
    for n_query, (t_worker, t_stored, t_bare, t_before) in merge_times.items():
        flops = 2 * n_unit * m * n_query * slots
        print(
            f"   unit ({n_unit}, {slots}, {m}) x {n_query:>4} queries: "
            f"bare {t_bare * 1e3:6.2f} ms ({flops / t_bare / 1e9:5.1f} GFLOP/s)   "
            f"(a) {t_worker * 1e3:6.2f} ms ({flops / t_worker / 1e9:5.1f} GFLOP/s) "
            f"bare/(a) {t_bare / t_worker:.2f}   "
            f"(b) {t_stored * 1e3:6.2f} ms bare/(b) {t_bare / t_stored:.2f} "
            f"({unit_bytes / t_stored / 2**30:.1f} GiB/s of sketches)\n"
            f"{'':<47}(a, norms recomputed as before) {t_before * 1e3:6.2f} ms "
            f"bare/(a) {t_bare / t_before:.2f}"
        )
    print("2. worker peak RSS (one process, all units)")
    for n in (args.small, args.big):
        print(f"   N_train={n:>6}: {memory[n][0]:8.1f} MiB   ({memory[n][1]:.1f} s)")
    growth = (rss_big - rss_small) / rss_small
    print(f"   growth {growth * 100:+.1f}%")
    print("3. bytes on disk per training example per checkpoint")
    for kind in ("full", "summed"):
        alone = 4 * m * (slots if kind == "full" else 1)
        print(f"   {kind:>6}: {disk[kind]:10.1f} B   (sketch values alone: {alone} B)")
    print("\ntargets")
    for n_query, (t_worker, _t_stored, t_bare, _t_before) in merge_times.items():
        verdict = "PASS" if t_bare / t_worker >= 0.7 else "FAIL"
        print(
            f"  {verdict}  worker scoring bare/scoring >= 0.7 at {n_query} queries: "
            f"{t_bare / t_worker:.2f}"
        )
    print(f"  {'PASS' if growth < 0.10 else 'FAIL'}  worker RSS growth < 10%: {growth * 100:+.1f}%")


if __name__ == "__main__":
    main()
