"""The native CPU dense-sketch kernel: the same sketch as the stock kernel, thread-count
independent, bounds-checked; built once per host, shared by processes building at once,
and never a failure: without a compiler, or after a failed build or with a damaged library,
the stock kernel runs and the log says why.

Without a C++ compiler and ninja the tests that need the kernel skip; under ``CI=true``
that is a failure (CI's machines have both, so CI always tests it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sdi_pipeline.engine import kernels, native
from sdi_pipeline.engine.hashing import induced_buckets, make_count_sketch_hash
from sdi_pipeline.engine.host_cache import CACHE_ENV
from sdi_pipeline.engine.kernels import Workspace, linear_weight_dense


@pytest.fixture(scope="module")
def op():
    found = native.dense_sketch_op()
    if found is None:
        reason = f"the native kernel is not available here ({native.NATIVE_ENV}, compiler, ninja)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)
    return found


def _case(b: int, t: int, d_out: int, d_in: int, m: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(b, t, d_out, generator=gen)
    x = torch.randn(b, t, d_in, generator=gen)
    row = make_count_sketch_hash(seed, "w", "row", d_out, m)
    col = make_count_sketch_hash(seed, "w", "col", d_in, m)
    return delta, x, row, col


def _stock(delta, x, row, col, out, monkeypatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "dense_sketch_op", lambda: None)
        linear_weight_dense(delta, x, row, col, induced_buckets(row, col), out, Workspace())


@pytest.mark.parametrize(
    ("b", "t", "d_out", "d_in", "m"),
    [(3, 5, 13, 37, 64), (2, 1, 8, 16, 32), (1, 9, 64, 64, 16384), (4, 33, 24, 50, 1000)],
)
def test_native_kernel_equals_the_stock_kernel(op, monkeypatch, b, t, d_out, d_in, m) -> None:
    """Full and ragged register tiles, one token, one example, m not a power of two; into
    a strided slot view of a (B, slots, m) buffer as the featurizer writes."""
    delta, x, row, col = _case(b, t, d_out, d_in, m)
    got = torch.zeros(b, 3, m)
    linear_weight_dense(delta, x, row, col, induced_buckets(row, col), got[:, 1], Workspace())
    want = torch.zeros(b, 3, m)
    _stock(delta, x, row, col, want[:, 1], monkeypatch)
    assert not got[:, [0, 2]].any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_native_kernel_does_not_depend_on_the_thread_count(op) -> None:
    delta, x, row, col = _case(6, 7, 40, 24, 512, seed=3)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = torch.zeros(6, 512)
            op(out, delta, x, row.buckets, row.signs, col.buckets, col.signs)
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_native_kernel_refuses_buckets_outside_the_sketch(op) -> None:
    delta, x, row, col = _case(2, 3, 8, 16, 64)
    bad = col.buckets.clone()
    bad[5] = 64
    with pytest.raises(RuntimeError, match=r"column bucket 64 is outside \[0, 64\)"):
        op(torch.zeros(2, 64), delta, x, row.buckets, row.signs, bad, col.signs)
    strided = delta.transpose(1, 2).contiguous().transpose(1, 2)  # same shape, not contiguous
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op(torch.zeros(2, 64), strided, x, row.buckets, row.signs, col.buckets, col.signs)


def _featurize_in_a_process(cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Sketch a toy batch in a fresh process; prints the max difference from the stock kernel."""
    code = textwrap.dedent(
        """
        import logging, sys, torch
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        sys.path.insert(0, "tests")
        from conftest import make_model, parity_batch
        from sdi_pipeline.engine import kernels
        from sdi_pipeline.engine.featurizer import StepFeaturizer
        from sdi_pipeline.engine.spec import SketchSpec
        from sdi_pipeline.toy.parity import parity_loss

        spec = SketchSpec(m=512, seed=1, kernel="dense")
        run = lambda: StepFeaturizer(make_model(), ["block"], spec).featurize(
            [parity_batch(5)], parity_loss).values
        got = run()
        kernels.dense_sketch_op = lambda: None
        want = run()
        print("difference", float((got - want).abs().max() / want.abs().max()))
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, CACHE_ENV: str(cache), **env},
        timeout=600,
    )


def _difference(result: subprocess.CompletedProcess[str]) -> float:
    return float(result.stdout.split("difference")[-1])


def test_without_a_compiler_the_stock_kernel_runs(tmp_path) -> None:
    result = _featurize_in_a_process(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert "not used: no C++ compiler" in result.stdout
    assert _difference(result) == 0.0
    assert not (tmp_path / "native").exists()
    off = _featurize_in_a_process(tmp_path, **{native.NATIVE_ENV: "0"})
    assert f"not used: {native.NATIVE_ENV}=0" in off.stdout


def _failing_compiler(folder: Path) -> str:
    """A C++ compiler that reports a version but fails every compilation at once."""
    path = folder / "failing-c++"
    path.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo "g++ (fake) 12.2.0"; exit 0; }\n'
        'echo "error: this compiler fails on purpose" >&2\nexit 1\n'
    )
    path.chmod(0o755)
    return str(path)


def test_a_failed_build_is_recorded_and_not_tried_again(tmp_path) -> None:
    compiler = _failing_compiler(tmp_path)
    failing = _featurize_in_a_process(tmp_path / "cache", CXX=compiler)
    assert "building it failed" in failing.stdout and _difference(failing) == 0.0
    (record,) = (tmp_path / "cache" / "native").glob("*.failed.json")
    assert "this compiler fails on purpose" in record.read_text()
    assert not list((tmp_path / "cache" / "native").glob("build-*"))  # no build folder left
    again = _featurize_in_a_process(tmp_path / "cache", CXX=compiler)
    assert "its build failed on this host before" in again.stdout
    assert "compiling" not in again.stdout


def test_a_damaged_library_is_built_again(op, tmp_path, monkeypatch) -> None:
    # The rebuild fails at once with this compiler: the stock kernel runs, the reason is kept.
    compiler = _failing_compiler(tmp_path)
    monkeypatch.setenv("CXX", compiler)  # the library's name depends on the compiler
    path = native.library_path(tmp_path / "cache")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a shared library")
    result = _featurize_in_a_process(tmp_path / "cache", CXX=compiler)
    assert f"cannot load {path}" in result.stdout and "building it again" in result.stdout
    assert _difference(result) == 0.0 and not path.exists()


def test_processes_building_at_once_share_one_library(op, tmp_path) -> None:
    """Two processes start with an empty cache: each builds in its own folder and renames
    its library into place; both sketch with it and nothing else is left behind."""
    code = [sys.executable, "-c", "from sdi_pipeline.engine import native; "
            "assert native.dense_sketch_op() is not None"]  # fmt: skip
    env = {**os.environ, CACHE_ENV: str(tmp_path)}
    procs = [subprocess.Popen(code, env=env) for _ in range(2)]
    assert [p.wait(timeout=900) for p in procs] == [0, 0]
    assert [p.name for p in (tmp_path / "native").iterdir()] == [native.library_path(tmp_path).name]
    loaded = _featurize_in_a_process(tmp_path)
    assert "compiling" not in loaded.stdout and _difference(loaded) < 1e-6
