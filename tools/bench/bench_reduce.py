"""The whole pipeline at N_train = 4k, 16k, 64k on the toy model: where the time goes.

For each size it runs the query job, W worker processes and the merge as separate
processes (the same commands as launcher=local), and prints the wall time of each stage,
the merge's share of the total, the merge's peak RSS and the bytes it read (``rchar`` of
/proc/self/io: every read syscall, page cache or not) per training example. With
``--baseline REV`` the same is measured for a git revision of this repository (checked out
into a temporary worktree) in the same run, interleaved size by size: today's merge, which
re-reads every train sketch and contracts it, against the reduce.

    python tools/bench/bench_reduce.py [--sizes 4096 16384 65536] [--baseline 174ab0a]
        [--workers 2] [--queries 64] [--m 1024] [--block-size 2048]

Run it alone: other processes on the machine distort the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter whose sys.path starts with the source tree under test.
PREPARE = """
import json, sys
sys.path.insert(0, {tests!r})
from pipeline_helpers import parity, toy_config
from sdi_pipeline.run.rundir import prepare_run
from pathlib import Path
cfg = toy_config(
    Path({tmp!r}),
    run={{"name": {name!r}}},
    data={{"train": parity({n}, 1), "query": parity({queries}, 2), "block_size": {block},
          "batch_size": 64}},
    sketch={{"m": {m}}},
    runtime={{"progress": False}},
)
print(prepare_run(cfg).path)
"""
# A job with its own peak RSS and read bytes appended as one JSON line.
JOB = """
import json, resource, sys
from sdi_pipeline.launch import cli
code = cli.JOBS[sys.argv[1]](sys.argv[2:])
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print(json.dumps({"code": code, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                  / 1024, "rchar": int(io["rchar"])}))
"""


def _env(src: Path, threads: int) -> dict[str, str]:
    return os.environ | {
        "PYTHONPATH": str(src),
        "SDI_THREADS": str(threads),
        "SDI_PROGRESS": "0",
        "WANDB_MODE": "disabled",
    }


def _job(src: Path, threads: int, *args: str) -> subprocess.Popen:
    # In the source tree: ``python -c`` puts the working directory first on sys.path.
    return subprocess.Popen(
        [sys.executable, "-c", JOB, *args],
        cwd=src,
        env=_env(src, threads),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> dict[str, float]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"job failed ({proc.returncode}):\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def measure(src: Path, tmp: Path, n: int, args: argparse.Namespace) -> dict[str, float]:
    """Query, workers and merge of one run made by the source tree ``src``."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // args.workers)
    script = PREPARE.format(
        tests=str(src / "tests"), tmp=str(tmp), name=f"n{n}", n=n, queries=args.queries,
        block=args.block_size, m=args.m,
    )  # fmt: skip
    run_dir = subprocess.run(
        [sys.executable, "-c", script],
        cwd=src,
        env=_env(src, cores),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[-1]
    out: dict[str, float] = {}
    started = time.perf_counter()
    _finish(_job(src, cores, "query", f"run_dir={run_dir}"))
    out["query_s"] = time.perf_counter() - started
    started = time.perf_counter()
    workers = [
        _job(
            src, threads, "worker", f"run_dir={run_dir}", f"rank={r}", f"world_size={args.workers}"
        )
        for r in range(args.workers)
    ]
    for proc in workers:
        _finish(proc)
    out["workers_s"] = time.perf_counter() - started
    started = time.perf_counter()
    merge = _finish(_job(src, cores, "merge", f"run_dir={run_dir}"))
    out["merge_s"] = time.perf_counter() - started
    out["merge_rss_mb"] = merge["rss_mb"]
    out["merge_rchar"] = merge["rchar"]
    out["total_s"] = out["query_s"] + out["workers_s"] + out["merge_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--baseline", help="a git revision to measure side by side")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=2048)
    args = parser.parse_args()
    print(f"command: python tools/bench/bench_reduce.py {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"toy model, 2 checkpoints, {args.queries} queries, m={args.m}, "
        f"block_size={args.block_size}, {args.workers} workers on {os.cpu_count()} cores\n"
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sides = {"now": ROOT}
        if args.baseline:
            tree = tmp / "baseline"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.baseline],
                check=True,
                capture_output=True,
            )
            sides = {args.baseline: tree, "now": ROOT}
        results: dict[str, dict[int, dict[str, float]]] = {side: {} for side in sides}
        try:
            for n in args.sizes:  # interleaved: both sides at one size, then the next size
                for side, src in sides.items():
                    results[side][n] = measure(src, tmp / side, n, args)
        finally:
            if args.baseline:
                subprocess.run(
                    [
                        "git",
                        "-C",
                        str(ROOT),
                        "worktree",
                        "remove",
                        "--force",
                        str(tmp / "baseline"),
                    ],
                    check=False,
                    capture_output=True,
                )
    head = f"{'side':>9} {'N_train':>8} {'query':>7} {'workers':>8} {'merge':>7} {'total':>7}"
    print(head + f" {'merge %':>8} {'merge RSS':>10} {'read/example':>13}")
    for n in args.sizes:
        for side in sides:
            r = results[side][n]
            share = 100 * r["merge_s"] / r["total_s"]
            print(
                f"{side:>9} {n:>8} {r['query_s']:6.1f}s {r['workers_s']:7.1f}s "
                f"{r['merge_s']:6.1f}s {r['total_s']:6.1f}s {share:7.1f}% "
                f"{r['merge_rss_mb']:8.0f}MiB {r['merge_rchar'] / n:11.0f} B"
            )
    now = results["now"]
    big, small = max(args.sizes), min(args.sizes)
    share = now[big]["merge_s"] / now[big]["total_s"]
    growth = now[big]["merge_rss_mb"] / now[small]["merge_rss_mb"] - 1
    marginal = (now[big]["merge_rchar"] - now[small]["merge_rchar"]) / (big - small)
    print(f"\nreduce: bytes read per extra training example {marginal:.0f} B")
    print("targets")
    print(f"  {'PASS' if share <= 0.05 else 'FAIL'}  reduce <= 5% of the pipeline at N={big}: "
          f"{100 * share:.1f}%")  # fmt: skip
    print(f"  {'PASS' if growth < 0.10 else 'FAIL'}  reduce peak RSS flat in N_train "
          f"({small} -> {big}): {100 * growth:+.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
