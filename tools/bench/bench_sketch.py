"""Benchmark the per-example, per-loop-step gradient sketch engine against a plain
forward+backward and against the public reference package `step-decomposed-influence`
(import name `sdi`), on the toy looped GPT (parity task).

What it measures, in one run, printed as aligned tables:

  a. Time per example of sketching (``StepFeaturizer`` at m = 1024 and 4096, target: the
     looped block) divided by a plain forward + ``loss.sum().backward()`` of the same batch
     without hooks (grads zeroed each time). Target: <= 1.5.
  b. The same for the reference's ``ProjectedTracInSDI`` at the same projection size m, and
     the speed ratio reference time / our time (target: >= 3). The reference at equal stored
     bytes is shown too, for information.
  c. Relative Frobenius error ||X_sketch - X_exact||_F / ||X_exact||_F of SDI (N_train,
     N_query, steps) and TracIn (N_train, N_query), for ours at m and for the reference at
     EQUAL STORED BYTES per example and step (it keeps one m_ref-vector per parameter, so
     m_ref = m / n_params), both against exact per-step gradients (ours with spec=None);
     mean ± std over hash seeds. Target: ours no worse.
  d. Cross-check: the reference's exact ``FullGradientTracInSDI`` SDI/TracIn (through its
     own ``influence_across_checkpoints``) and per-step gradients vs our exact mode. They
     should agree to float32 precision.

Every method runs on identical batches and identical weights (deep copies of one model,
each with only its own hooks). Timings are medians over interleaved rounds after warm-up.
The model is the toy trained briefly with ``sdi_pipeline.toy.train.train_toy`` (into a temp
dir; ``--train-steps``) where that works, else a random init (torch.manual_seed(0)); the
header says which.

The reference must not be installed into the dev environment (.venv); run through

    bash tools/bench/run_sketch_bench.sh [--threads 2] [--repeats 7] [--seeds 0 1 2 3 4]

which creates .bench-venv with torch, this package (editable) and the reference. Run it alone
on the machine for final numbers: other processes distort the timings.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import inspect
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdi_pipeline.engine.featurizer import StepFeaturizer
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.jobs import scores
from sdi_pipeline.toy.model import LoopedGPT, LoopedGPTConfig
from sdi_pipeline.toy.parity import make_parity_dataset, parity_accuracy, parity_loss

try:
    import sdi  # the reference package, installed only in .bench-venv
except ImportError:
    sys.exit(
        "the reference package `sdi` (step-decomposed-influence) is not installed here; "
        "run this benchmark through: bash tools/bench/run_sketch_bench.sh"
    )

Batch = dict[str, torch.Tensor]
TARGETS = ["block"]  # the looped block: what is sketched
SPEED_TARGET = 1.5  # ours / plain forward+backward, at most
REF_RATIO_TARGET = 3.0  # reference / ours, at least
EXACT_TOLERANCE = 1e-4  # relative agreement of the two exact modes (float32 precision)
DATA_SEED, QUERY_SEED = 1234, 5678


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=32, help="batch size (timing and features)")
    parser.add_argument("--m", type=int, nargs="+", default=[1024, 4096], help="our sketch sizes")
    parser.add_argument("--n-train", type=int, default=256, help="training examples for (c), (d)")
    parser.add_argument("--n-query", type=int, default=16, help="query examples for (c), (d)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="hash seeds averaged in (c)"
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="interleaved timing rounds (median over all)"
    )
    parser.add_argument(
        "--round-time", type=float, default=0.5, help="seconds per method per timing round"
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=300,
        help="train the toy model this many steps first (0: random init, torch.manual_seed(0))",
    )
    return parser.parse_args()


# ----------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_header() -> None:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print("== SDI sketch benchmark ==")
    launcher = os.environ.get("SDI_BENCH_COMMAND")  # set by run_sketch_bench.sh
    if launcher:
        print(f"command     : {launcher}")
        print(f"  which runs: {shlex.join(sys.orig_argv)}")
    else:
        print(f"command     : {shlex.join(sys.orig_argv)}")
    print(f"python      : {platform.python_version()} ({sys.executable})")
    print(f"torch       : {torch.__version__} (cuda: {torch.version.cuda})")
    ref_version = importlib.metadata.version("step-decomposed-influence")
    print(f"reference   : step-decomposed-influence {ref_version} ({sdi.__file__})")
    print(f"threads     : {torch.get_num_threads()} (of {os.cpu_count()} CPUs)")
    print(f"cpu         : {cpu_model()}")
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min, at start)")


# ----------------------------------------------------------------------------- model, data


def random_model() -> LoopedGPT:
    torch.manual_seed(0)
    return LoopedGPT(LoopedGPTConfig())


def trained_model(steps: int) -> tuple[LoopedGPT, int, str]:
    """Train the toy model with ``train_toy`` into a temp dir; return model, n_bits, note."""
    from sdi_pipeline.toy import train as toy_train  # may not exist yet

    sig = inspect.signature(toy_train.train_toy)
    kwargs: dict[str, Any] = {}
    for name in ("steps", "n_steps", "max_steps", "train_steps", "num_steps"):
        if name in sig.parameters:
            kwargs[name] = steps
            break
    if "progress" in sig.parameters:
        kwargs["progress"] = False
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = toy_train.train_toy(Path(tmp) / "checkpoints", **kwargs)
        last = Path(checkpoints[-1])
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        if hasattr(toy_train, "load_toy_model"):
            model = toy_train.load_toy_model(last)
        else:
            model = LoopedGPT(LoopedGPTConfig.from_dict(ckpt["model_config"]))
            model.load_state_dict(ckpt["model_state_dict"])
    n_bits = int(ckpt.get("task", {}).get("n_bits", 8))
    how = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"
    note = (
        f"trained with train_toy({how}) in {time.perf_counter() - started:.0f} s, "
        f"last of {len(checkpoints)} checkpoints"
    )
    return model, n_bits, note


def make_model(steps: int) -> tuple[LoopedGPT, int, str]:
    """The model every method uses (trained if train_toy works, else random init)."""
    if steps <= 0:
        return random_model(), 8, "random init (torch.manual_seed(0)); training skipped"
    try:
        return trained_model(steps)
    except Exception as exc:  # an unfinished / broken train_toy: fall back, say so
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        return (
            random_model(),
            8,
            f"random init (torch.manual_seed(0)); train_toy unusable ({reason})",
        )


def batches_of(n: int, n_bits: int, seed: int, batch: int) -> list[Batch]:
    data = make_parity_dataset(n, n_bits=n_bits, seed=seed)
    return [
        {"tokens": data.tokens[i : i + batch], "target": data.targets[i : i + batch]}
        for i in range(0, n, batch)
    ]


def fresh_copy(base: nn.Module) -> nn.Module:
    """A hook-free copy with identical weights (the reference hooks its model for good)."""
    model = copy.deepcopy(base)
    model.eval()
    return model


def target_param_count(model: LoopedGPT) -> int:
    return sum(1 for p in model.block.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- features


def ours_features(
    base: nn.Module, spec: SketchSpec | None, sets: Sequence[Sequence[Batch]]
) -> list[torch.Tensor]:
    """Our features (N, slots, width) of each batch list: sketched (spec) or exact (None)."""
    feat = StepFeaturizer(fresh_copy(base), TARGETS, spec)
    return [feat.featurize(b, parity_loss).values for b in sets]


def ref_concat(phi: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reference FeatureSet.phi (name -> (N, steps, ...)) concatenated over parameters in name
    order along the last dim: inner products then sum over parameters, like its contraction."""
    return torch.cat([phi[name].flatten(2).float() for name in sorted(phi)], dim=2)


def ref_sketch_features(
    base: LoopedGPT, m_ref: int, seed: int, sets: Sequence[Sequence[Batch]]
) -> tuple[list[torch.Tensor], int]:
    """Reference sketches (N, steps, n_params * m_ref) of each batch list (one estimator, so
    one hash), and its number of parameter blocks."""
    model = fresh_copy(base)
    est = sdi.ProjectedTracInSDI(
        model=model,
        target_modules=model.block,  # type: ignore[attr-defined]
        projection_size=m_ref,
        seed=seed,
        loss_reduction="sum",
    )
    try:
        phis = [est.featurize_loader(loader=b, loss_fn=parity_loss).phi for b in sets]
    finally:
        est.close()
    return [ref_concat(phi) for phi in phis], len(phis[0])


def rel_err(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    diff = (estimate.double() - exact.double()).norm()
    return float(diff / exact.double().norm())


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (elementwise ratios blow up at entries near 0)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ----------------------------------------------------------------------------- timing


@dataclass
class Timed:
    name: str
    m: int | None  # sketch size (per parameter for the reference)
    stored_bytes: int | None  # per example and loop step
    fn: Callable[[], object]
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def time_all(methods: list[Timed], repeats: int, round_time: float) -> None:
    """Warm up, then ``repeats`` rounds; in each round every method (order rotated) is called
    until about ``round_time`` s have passed (at least twice), each call timed with
    perf_counter. Time-bounded, so a loaded machine does not stretch the run."""
    for t in methods:
        for _ in range(3):
            t.fn()
    for r in range(repeats):
        shift = r % len(methods)
        for t in methods[shift:] + methods[:shift]:
            spent, calls = 0.0, 0
            while spent < round_time or calls < 2:
                start = time.perf_counter()
                t.fn()
                took = time.perf_counter() - start
                t.samples.append(took)
                spent, calls = spent + took, calls + 1


def timing_methods(base: LoopedGPT, batch: Batch, ms: list[int], n_params: int) -> list[Timed]:
    plain_model = fresh_copy(base)

    def plain() -> None:
        plain_model.zero_grad(set_to_none=True)
        parity_loss(plain_model, batch).sum().backward()

    methods = [Timed("plain fwd+bwd", None, None, plain, [])]
    for m in ms:
        feat = StepFeaturizer(fresh_copy(base), TARGETS, SketchSpec(m=m, seed=0))
        methods.append(
            Timed("ours", m, 4 * m, lambda f=feat: f.featurize([batch], parity_loss), [])
        )
    ref_sizes = [(m, "reference, same m") for m in ms]
    ref_sizes += [(max(1, m // n_params), "reference, eq. bytes") for m in ms]
    for m_ref, label in ref_sizes:
        model = fresh_copy(base)
        est = sdi.ProjectedTracInSDI(
            model=model,
            target_modules=model.block,  # type: ignore[attr-defined]
            projection_size=m_ref,
            seed=0,
            loss_reduction="sum",
        )
        methods.append(
            Timed(
                label,
                m_ref,
                4 * m_ref * n_params,
                lambda e=est: e.featurize_loader(loader=[batch], loss_fn=parity_loss),
                [],
            )
        )
    return methods


# ----------------------------------------------------------------------------- main


def fmt_opt(x: int | None) -> str:
    return "-" if x is None else str(x)


def mean_std(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f} ± {sd:.4f}"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print_header()

    base, n_bits, note = make_model(args.train_steps)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(True)
    n_params = target_param_count(base)
    train = batches_of(args.n_train, n_bits, DATA_SEED, args.batch)
    query = batches_of(args.n_query, n_bits, QUERY_SEED, args.batch)
    held_out = make_parity_dataset(512, n_bits=n_bits, seed=QUERY_SEED + 1)
    print(f"model       : {note}")
    print(
        f"              LoopedGPT {base.config.to_dict()}; parity n_bits={n_bits}, held-out "
        f"accuracy {parity_accuracy(base, held_out):.3f}"
    )
    print(
        f"targets     : {TARGETS} -> {n_params} parameter tensors, "
        f"{sum(p.numel() for p in base.block.parameters())} weights; batch {args.batch}"
    )
    for m in args.m:
        if m % n_params:
            print(
                f"note        : m={m} is not a multiple of {n_params}: equal bytes is approximate"
            )

    # ---- (a), (b): timing
    print(
        f"\n[a,b] time per batch of {args.batch}: median (min) over {args.repeats} interleaved "
        f"rounds of ~{args.round_time:g} s each, after warm-up"
    )
    methods = timing_methods(base, train[0], args.m, n_params)
    t0 = time.perf_counter()
    time_all(methods, args.repeats, args.round_time)
    plain, plain_min = methods[0].median, min(methods[0].samples)
    print(
        f"{'method':<22}{'m':>6}{'bytes/ex/step':>15}{'calls':>7}{'median ms':>11}"
        f"{'min ms':>9}{'ms/example':>12}{'x plain':>9}{'(by min)':>10}"
    )
    for t in methods:
        print(
            f"{t.name:<22}{fmt_opt(t.m):>6}{fmt_opt(t.stored_bytes):>15}{len(t.samples):>7}"
            f"{t.median * 1e3:>11.2f}{min(t.samples) * 1e3:>9.2f}"
            f"{t.median / args.batch * 1e3:>12.4f}{t.median / plain:>9.2f}"
            f"{min(t.samples) / plain_min:>10.2f}"
        )
    print(f"(timing took {time.perf_counter() - t0:.0f} s)")

    ours_t = {t.m: t.median for t in methods if t.name == "ours"}
    same_t = {t.m: t.median for t in methods if t.name == "reference, same m"}
    eq_t = {t.m: t.median for t in methods if t.name == "reference, eq. bytes"}
    print(
        f"\nratios of median times (target: ours/plain <= {SPEED_TARGET:g}, "
        f"ref/ours >= {REF_RATIO_TARGET:g} at the same m)"
    )
    print(
        f"{'m':>6}{'ours/plain':>12}{'ref/plain':>11}{'ref/ours':>10}"
        f"{'m_ref (eq. bytes)':>19}{'ref_eq/plain':>14}{'ref_eq/ours':>13}"
    )
    verdicts: list[tuple[str, bool]] = []
    for m in args.m:
        r_ours = ours_t[m] / plain
        r_ref = same_t[m] / ours_t[m]
        m_eq = max(1, m // n_params)
        print(
            f"{m:>6}{r_ours:>12.2f}{same_t[m] / plain:>11.2f}{r_ref:>10.2f}{m_eq:>19}"
            f"{eq_t[m_eq] / plain:>14.2f}{eq_t[m_eq] / ours_t[m]:>13.2f}"
        )
        verdicts.append(
            (f"[a] m={m}: ours / plain = {r_ours:.2f} <= {SPEED_TARGET:g}", r_ours <= SPEED_TARGET)
        )
        verdicts.append(
            (
                f"[b] m={m}: reference / ours = {r_ref:.2f} >= {REF_RATIO_TARGET:g}",
                r_ref >= REF_RATIO_TARGET,
            )
        )
    del methods

    # ---- exact per-step gradients (ours): the ground truth of (c), compared in (d)
    t0 = time.perf_counter()
    exact_tr, exact_q = ours_features(base, None, [train, query])
    sdi_exact = scores.query_step_sdi(exact_tr, exact_q)
    tracin_exact = scores.tracin(exact_tr, exact_q)
    print(
        f"\nexact features (ours, spec=None): train {tuple(exact_tr.shape)}, query "
        f"{tuple(exact_q.shape)} in {time.perf_counter() - t0:.1f} s"
    )

    # ---- (c): accuracy at equal stored bytes
    print(
        f"\n[c] relative Frobenius error vs exact, N_train={args.n_train}, N_query={args.n_query}, "
        f"mean ± std over hash seeds {args.seeds}"
    )
    print(
        f"{'bytes/ex/step':>14}{'ours m':>8}{'ours SDI':>20}{'ours TracIn':>20}"
        f"{'ref m':>7}{'ref SDI':>20}{'ref TracIn':>20}"
    )
    t0 = time.perf_counter()
    for m in args.m:
        m_ref = max(1, m // n_params)
        errs: dict[str, list[float]] = {k: [] for k in ("o_sdi", "o_tr", "r_sdi", "r_tr")}
        for seed in args.seeds:
            o_tr, o_q = ours_features(base, SketchSpec(m=m, seed=seed), [train, query])
            errs["o_sdi"].append(rel_err(scores.query_step_sdi(o_tr, o_q), sdi_exact))
            errs["o_tr"].append(rel_err(scores.tracin(o_tr, o_q), tracin_exact))
            (r_tr, r_q), n_blocks = ref_sketch_features(base, m_ref, seed, [train, query])
            assert n_blocks == n_params, (n_blocks, n_params)
            errs["r_sdi"].append(rel_err(scores.query_step_sdi(r_tr, r_q), sdi_exact))
            errs["r_tr"].append(rel_err(scores.tracin(r_tr, r_q), tracin_exact))
        print(
            f"{4 * m:>14}{m:>8}{mean_std(errs['o_sdi']):>20}{mean_std(errs['o_tr']):>20}"
            f"{m_ref:>7}{mean_std(errs['r_sdi']):>20}{mean_std(errs['r_tr']):>20}"
        )
        for key, what in (("sdi", "SDI"), ("tr", "TracIn")):
            ours_e, ref_e = statistics.mean(errs["o_" + key]), statistics.mean(errs["r_" + key])
            verdicts.append(
                (
                    f"[c] {4 * m} B/ex/step: {what} error ours (m={m}) {ours_e:.4f} <= "
                    f"reference (m_ref={m_ref}) {ref_e:.4f}",
                    ours_e <= ref_e,
                )
            )
    print(f"(accuracy took {time.perf_counter() - t0:.0f} s)")

    # ---- (d): the reference's exact mode vs ours
    t0 = time.perf_counter()
    model = fresh_copy(base)
    full = sdi.FullGradientTracInSDI(
        model=model,
        target_modules=model.block,  # type: ignore[attr-defined]
        loss_reduction="sum",
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ckpt.pt"
            torch.save({"model_state_dict": model.state_dict()}, path)
            out = full.influence_across_checkpoints(
                checkpoints=[sdi.CheckpointSpec(path, weight=1.0)],
                train_loader=train,
                query_loader=query,
                loss_fn=parity_loss,
                mode="sdi",
            )
        ref_exact_tr = ref_concat(full.featurize_loader(loader=train, loss_fn=parity_loss).phi)
    finally:
        full.close()
    assert out.sdi is not None
    d_sdi = max_rel_diff(out.sdi, sdi_exact)
    d_tracin = max_rel_diff(out.tracin, tracin_exact)
    same_shape = ref_exact_tr.shape == exact_tr.shape
    d_feat = max_rel_diff(ref_exact_tr, exact_tr) if same_shape else float("nan")
    print(
        f"\n[d] reference FullGradientTracInSDI (exact) vs ours (spec=None), "
        f"max|diff| / max|ours| ({time.perf_counter() - t0:.0f} s)"
    )
    print(f"{'quantity':<34}{'shape':>20}{'max rel diff':>14}{'Frob rel diff':>15}")
    rows = [("SDI (N_train, N_query, steps)", out.sdi, sdi_exact, d_sdi)]
    rows.append(("TracIn (N_train, N_query)", out.tracin, tracin_exact, d_tracin))
    for label, ref_v, ours_v, d in rows:
        print(f"{label:<34}{tuple(ours_v.shape)!s:>20}{d:>14.2e}{rel_err(ref_v, ours_v):>15.2e}")
    if same_shape:
        print(
            f"{'train per-step gradients':<34}{tuple(exact_tr.shape)!s:>20}{d_feat:>14.2e}"
            f"{rel_err(ref_exact_tr, exact_tr):>15.2e}"
        )
    else:
        shapes = f"reference {tuple(ref_exact_tr.shape)}, ours {tuple(exact_tr.shape)}"
        print(f"train per-step gradients: shapes differ: {shapes}")
    for label, d in (("SDI", d_sdi), ("TracIn", d_tracin), ("per-step gradients", d_feat)):
        verdicts.append(
            (
                f"[d] exact {label}: reference vs ours {d:.2e} <= {EXACT_TOLERANCE:g}",
                d <= EXACT_TOLERANCE,
            )
        )

    # ---- summary
    print(f"\n== targets ({time.perf_counter() - started:.0f} s in all) ==")
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    passed = sum(ok for _, ok in verdicts)
    print(f"{passed} of {len(verdicts)} targets met")


if __name__ == "__main__":
    main()
