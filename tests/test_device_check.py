"""The device check's CPU form (what CI runs of tools/bench/device_check.sh): every step
runs, the table is printed and written under $OUT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_cpu_form_prints_the_table_and_writes_it_under_out(tmp_path) -> None:
    out = tmp_path / "out"
    env = os.environ | {"OUT": str(out), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = ROOT / "tools" / "bench" / "device_check.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--cpu", "--quick", "--budget", "400"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = (out / "device_check.txt").read_text()
    assert written in proc.stdout  # the same table, printed
    table = written.split("\n== profile")[0]
    assert "GPU figures pending a GPU session" in table
    rows = [line.split() for line in table.splitlines() if line.split()[:1]]
    steps = {row[0] for row in rows}
    assert {"tests", "agree", "time", "pipeline", "profile"} <= steps
    assert "0 FAIL" in table, table
    # Without a GPU the CUDA subset is selected and skipped, with the reason.
    assert "no CUDA device here" in table
    assert any(r[0] == "agree" and r[-1] == "PASS" for r in rows)
    assert any(r[0] == "pipeline" and r[-1] == "PASS" for r in rows)
    assert any(r[0] == "time" and "plain" in r and "ms" in r for r in rows)
    # The profiling hook: torch.profiler's table of the top kernels, after the table.
    assert "== profile: one sketch call" in written and "Self CPU" in written
