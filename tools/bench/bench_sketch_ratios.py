"""Sketching cost side by side in one process: every sketch-side ratio in one table.

For each looped GPT below, interleaved rounds (each method once per round, medians over
rounds) of, on the same batch and weights:

  plain     forward + loss.sum().backward(), no hooks (the floor every ratio divides by)
  eq        our sketch at equal bytes: m = 1024 x n_params, what the reference stores per
            example and step at its m = 1024 (one m-vector per parameter tensor)
  eq-stock  the same with the native CPU dense kernel off (bmm + index_add_, as before it)
  m1024     our sketch at m = 1024
  ref       the reference's ProjectedTracInSDI at m = 1024 (if `sdi` is installed)
  exact     our exact mode (spec=None), where (B, slots, #params) fits --exact-mb
  ref-full  the reference's FullGradientTracInSDI, same models as exact
  base      with --baseline REV: the equal-bytes sketch by that git revision of this
            package (imported under another name), to compare before and after measured
            the same way; its features are checked equal to ours up to float rounding
  base-exact  the same revision's exact mode

    bash tools/bench/run_sketch_bench.sh   # once: creates .bench-venv with the reference
    .bench-venv/bin/python tools/bench/bench_sketch_ratios.py [--threads 2] [--rounds 7]
        [--baseline main] [--sizes toy tau6 d256]

The reference (`step-decomposed-influence`, kept out of .venv) is optional: without it,
.venv/bin/python runs the rest. The load average is printed before and after: the machine
should be otherwise idle.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from sdi_pipeline.engine import kernels
from sdi_pipeline.engine.featurizer import StepFeaturizer
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.toy.model import LoopedGPT, LoopedGPTConfig

REPO = Path(__file__).resolve().parents[2]
# name: (d_model, d_mlp, seq_len, batch, vocab, loop steps)
SIZES = {
    "toy": (64, 256, 9, 32, 3, 4),
    "tau6": (128, 512, 33, 32, 64, 6),
    "d256": (256, 1024, 128, 16, 256, 4),
    "d512": (512, 2048, 256, 8, 256, 4),
}
REF_M = 1024


def import_baseline(rev: str, folder: Path) -> ModuleType:
    """``sdi_pipeline`` at git revision ``rev``, importable as ``sdi_pipeline_baseline``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "sdi_pipeline"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    package = folder / "sdi_pipeline_baseline"
    (folder / "sdi_pipeline").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\bsdi_pipeline\b", "sdi_pipeline_baseline", path.read_text()))
    sys.path.insert(0, str(folder))
    return importlib.import_module("sdi_pipeline_baseline.engine.featurizer")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["toy", "tau6", "d256"])
    parser.add_argument("--baseline", help="git revision to compare against (e.g. main)")
    parser.add_argument("--exact-mb", type=float, default=512, help="largest exact buffer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import sdi  # the reference package (optional)
    except ImportError:
        sdi = None
    with tempfile.TemporaryDirectory() as tmp:
        base = import_baseline(args.baseline, Path(tmp)) if args.baseline else None
        native = "yes" if kernels.dense_sketch_op() is not None else "no (see the log)"
        print(
            f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved "
            f"rounds; reference: {'yes' if sdi else 'not installed'}; baseline: "
            f"{args.baseline or 'none'}; native CPU kernel: {native}; "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        for name in args.sizes:
            measure(name, args, sdi, base)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def timed(methods: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms of each method over interleaved rounds, after one warm-up call each."""
    times: dict[str, list[float]] = {k: [] for k in methods}
    for fn in methods.values():
        fn()  # warm-up (and the kernel cost calibration, once per host)
    for _ in range(rounds):
        for key, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}


def measure(name: str, args: argparse.Namespace, sdi: ModuleType | None, base: ModuleType | None):
    """Time every method on one model size and print its rows."""
    d, d_mlp, seq, batch, vocab, loops = SIZES[name]
    torch.manual_seed(0)
    heads = 4 if d == 64 else 8
    cfg = LoopedGPTConfig(vocab, d, heads, d_mlp, n_loops=loops, max_len=seq)
    model = LoopedGPT(cfg)
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    block = model.block
    n_params = len(list(block.parameters()))
    n_weights = sum(p.numel() for p in block.parameters())
    m_eq = REF_M * n_params

    def loss_fn(m: torch.nn.Module, b: torch.Tensor) -> torch.Tensor:
        logits = m(b)[:, :-1]
        flat = F.cross_entropy(logits.reshape(-1, vocab), b[:, 1:].reshape(-1), reduction="none")
        return flat.view(b.shape[0], -1).mean(dim=1)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model, tokens).sum().backward()

    def ours(spec: SketchSpec | None) -> Callable[[], torch.Tensor]:
        featurizer = StepFeaturizer(model, ["block"], spec)
        return lambda: featurizer.featurize([tokens], loss_fn).values

    def stock(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def without_native() -> torch.Tensor:
            native_op = kernels.dense_sketch_op
            kernels.dense_sketch_op = lambda: None
            try:
                return fn()
            finally:
                kernels.dense_sketch_op = native_op

        return without_native

    sketches: dict[str, Callable[[], object]] = {"plain": plain, "eq": ours(SketchSpec(m=m_eq))}
    if kernels.dense_sketch_op() is not None:
        sketches["eq-stock"] = stock(ours(SketchSpec(m=m_eq)))
    sketches["m1024"] = ours(SketchSpec(m=REF_M))
    notes = []
    if base is not None:
        spec = sys.modules["sdi_pipeline_baseline.engine.spec"].SketchSpec(m=m_eq)
        old = base.StepFeaturizer(model, ["block"], spec)
        sketches["base"] = lambda: old.featurize([tokens], loss_fn).values
        a, b = sketches["base"](), sketches["eq"]()
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        diff = float((a - b).abs().max() / a.abs().max())
        notes.append(f"base vs eq features: max difference / max {diff:.1e}")
    if sdi is not None:
        ref_model = copy.deepcopy(model)  # the reference leaves hooks on its model
        ref = sdi.ProjectedTracInSDI(
            model=ref_model, target_modules=ref_model.block, projection_size=REF_M
        )
        sketches["ref"] = lambda: ref.featurize_loader(loader=[tokens], loss_fn=loss_fn)
    ms = timed(sketches, args.rounds)
    # The exact modes' large buffers would disturb the sketches' allocations: timed apart,
    # against their own plain forward+backward.
    exact_mb = batch * loops * n_weights * 4 / 2**20
    if exact_mb <= args.exact_mb:
        exact: dict[str, Callable[[], object]] = {"plain": plain, "exact": ours(None)}
        if base is not None:
            old_exact = base.StepFeaturizer(model, ["block"], None)
            exact["base-exact"] = lambda: old_exact.featurize([tokens], loss_fn).values
        if sdi is not None:
            full_model = copy.deepcopy(model)
            full = sdi.FullGradientTracInSDI(
                model=full_model, target_modules=full_model.block, loss_reduction="sum"
            )
            exact["ref-full"] = lambda: full.featurize_loader(loader=[tokens], loss_fn=loss_fn)
        exact_ms = timed(exact, args.rounds)
        ms |= {k: v * ms["plain"] / exact_ms["plain"] for k, v in exact_ms.items()}
        notes.append(
            f"exact modes timed apart (their plain: {exact_ms['plain']:.1f} ms), "
            "shown scaled to the plain above"
        )
    else:
        notes.append(f"exact modes skipped: {exact_mb:.0f} MB > --exact-mb")
    print(
        f"\n{name}: d_model {d}, d_mlp {d_mlp}, T {seq}, B {batch}, {loops} loop steps, "
        f"{n_params} parameter tensors ({n_weights:,} weights); equal bytes m = {m_eq}"
    )
    print(f"  {'method':<11}{'ms':>10}{'x plain':>9}")
    for key, value in ms.items():
        print(f"  {key:<11}{value:>10.1f}{value / ms['plain']:>9.2f}")
    pairs = [("ref", "eq"), ("ref", "m1024"), ("ref-full", "exact"), ("base", "eq")]
    pairs.append(("eq-stock", "eq"))
    pairs.append(("base-exact", "exact"))
    ratios = [f"{a}/{b} {ms[a] / ms[b]:.2f}" for a, b in pairs if a in ms and b in ms]
    for line in [", ".join(ratios), *notes]:
        if line:
            print(f"  {line}")


if __name__ == "__main__":
    main()
