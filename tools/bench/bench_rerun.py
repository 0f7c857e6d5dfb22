"""A no-op rerun of the demo: the same ``sdi-attribute`` command twice.

The first run trains the toy checkpoints (once per ``--work`` folder) and attributes; each
rerun must find everything up to date. Per rerun it prints the wall time, whether any job
started (a new ``commands/*.sh`` or job log line) and whether ``results.h5`` or a plot was
rewritten (mtime). Target: no job start, no rewrite, under 5 s on the project's 2-core
machine (the first run's time is printed beside it).

    python tools/bench/bench_rerun.py [--work /tmp/sdi-rerun] [--reruns 3] [-- OVERRIDES...]

Run it alone: other processes on the machine distort the timings.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ENTRY = "from sdi_pipeline.launch.attribute_cli import main; main()"
ROOT = Path(__file__).resolve().parents[2]


def sdi_attribute(work: Path, overrides: list[str]) -> tuple[float, str]:
    """Run ``sdi-attribute`` in ``work``; its wall time and output."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "SDI_PROGRESS": "0"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", ENTRY, *overrides],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    took = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"sdi-attribute failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return took, proc.stdout


def snapshot(runs: Path) -> dict[Path, float]:
    """mtime of every file the launcher or a job writes in a finished run."""
    return {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdi-rerun"))
    parser.add_argument("--reruns", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    first, _ = sdi_attribute(args.work, args.overrides)
    print(f"first run (trains the toy once per --work): {first:.1f} s")
    runs = args.work / "runs"
    for i in range(args.reruns):
        before = snapshot(runs)
        took, out = sdi_attribute(args.work, args.overrides)
        after = snapshot(runs)
        changed = sorted(str(p.relative_to(runs)) for p in after if before.get(p) != after[p])
        jobs = [c for c in changed if "/commands/" in c or "/logs/" in c]
        rewritten = [c for c in changed if c.endswith("results.h5") or "/plots/" in c]
        listed = ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
        print(
            f"rerun {i + 1}: {took:.1f} s, jobs started: {len(jobs)}, results/plots rewritten: "
            f"{len(rewritten)}, files changed: {len(changed)}" + (f" ({listed})" if changed else "")
        )
    print("last rerun's output:\n" + out)


if __name__ == "__main__":
    main()
