"""The GPU path in one prepared check: tests, CPU-vs-device agreement, timing, the pipeline.

    bash tools/bench/device_check.sh            # a CUDA machine: installs, then this
    python tools/bench/device_check.py --cpu    # CPU only, small sizes (CI runs --cpu --quick)

Each step runs in its own process under a time box (a hung or crashed step is reported and
the others still run), within ``--budget`` seconds in all (default 450: the whole check in
under 8 minutes of wall time):

  tests     the test suite's CUDA subset (``pytest -m cuda``: the tests over the ``device``
            fixture, run on CUDA; skipped with their reason without a GPU)
  agree     the bench models' features and SDI on the CPU and on the device: float32 (to
            1e-5 relative), and bf16 / fp16 autocast runs with their error against float32
  time      side by side in one process, interleaved rounds: a plain forward+backward, our
            sketch at m = 4096 / 16384 (equal bytes to the reference at m = 1024) / 65536,
            exact mode, and the reference's estimators where ``sdi`` is installed; median ms
            and peak device memory (d_model 768, 12 heads, T 512, tau 8, batch 16 on CUDA)
  pipeline  ``sdi-attribute`` with the local launcher on the device: query, 2 workers
            sharing it, merge; examples per second per GPU in the workers' phase
  profile   torch.profiler over one sketch call at the timing size: the top kernels by self
            device time (printed after the table)

It prints one table (step, what, result, verdict) and writes it with the profile to
``$OUT/device_check.txt`` when OUT is set (and to ``--out DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
STEPS = ("tests", "agree", "time", "pipeline", "profile")
# Each step's share of the budget, in seconds at the default budget (scaled to others).
BOXES = {"tests": 90, "agree": 60, "time": 150, "pipeline": 110, "profile": 40}
AGREE_TOL = 1e-5  # float32 CPU vs device, relative Frobenius


def sizes(cpu: bool, quick: bool) -> dict[str, Any]:
    """Model and run sizes: the realistic ones on a GPU, small ones for the CPU form."""
    if not cpu:
        return {
            "agree": {"toy": (64, 4, 256, 9, 4, 32), "d256": (256, 8, 1024, 128, 4, 16)},
            "time": (768, 12, 3072, 512, 8, 16),  # d_model, heads, d_mlp, T, tau, batch
            "ms": [4096, 16384, 65536],
            "pipeline": {"d": 256, "T": 128, "tau": 4, "n_train": 4096, "batch": 64},
            "rounds": 5,
        }
    return {
        "agree": {"toy": (32, 4, 64, 9, 4, 8)},
        "time": (64, 4, 256, 16, 4, 8) if quick else (128, 4, 512, 32, 4, 8),
        "ms": [1024, 4096] if quick else [4096, 16384],
        "pipeline": {"d": 32, "T": 9, "tau": 2, "n_train": 32 if quick else 256, "batch": 16},
        "rounds": 2 if quick else 5,
    }


# ----------------------------------------------------------------------------- the parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU, small sizes")
    parser.add_argument("--quick", action="store_true", help="with --cpu: smallest sizes (CI)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all steps")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--out", type=Path, help="also write device_check.txt here")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # one step, internal
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        run_step(args)
        return
    started = time.monotonic()
    rows: list[list[str]] = []
    texts: list[str] = []
    scale = args.budget / sum(BOXES.values())
    with tempfile.TemporaryDirectory() as tmp:
        for step in args.steps:
            left = args.budget - (time.monotonic() - started)
            box = min(BOXES[step] * scale, left)
            if box < 5:
                rows.append([step, "-", "not run: the budget was spent", "SKIP"])
                continue
            rows += child(step, args, Path(tmp) / f"{step}.json", box, texts)
    table = render(header(args), rows, time.monotonic() - started)
    report = table + "".join(f"\n{t}\n" for t in texts)
    print("\n" + report, flush=True)
    folders = [Path(os.environ["OUT"])] if os.environ.get("OUT") else []
    folders += [args.out] if args.out else []
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "device_check.txt").write_text(report)
        print(f"written: {folder / 'device_check.txt'}")


def child(
    step: str, args: argparse.Namespace, out: Path, box: float, texts: list[str]
) -> list[list[str]]:
    """Run one step in its own process, killed after ``box`` seconds; its rows."""
    cmd = [sys.executable, __file__, "--step", step, "--json", str(out)]
    cmd += ["--cpu"] * args.cpu + ["--quick"] * args.quick
    print(f"[device-check] {step} (up to {box:.0f} s) ...", flush=True)
    began = time.monotonic()
    try:
        proc = subprocess.run(cmd, timeout=box, capture_output=True, text=True, cwd=REPO)
        code: int | str = proc.returncode
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired as err:
        code, tail = "timeout", [f"killed after {box:.0f} s"]
        del err
    spent = time.monotonic() - began
    done = json.loads(out.read_text()) if out.exists() else {"rows": [], "text": ""}
    rows = done["rows"]
    if done.get("text"):
        texts.append(done["text"])
    if code != 0:
        why = "; ".join(line.strip() for line in tail)[-300:]
        rows.append([step, "step failed", f"{code}: {why}", "FAIL"])
    print(f"[device-check] {step}: {spent:.0f} s, {len(rows)} rows", flush=True)
    return rows


def header(args: argparse.Namespace) -> list[str]:
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    gpu = "none"
    if cuda:
        props = torch.cuda.get_device_properties(0)
        gpu = (
            f"{torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB, "
            f"{props.multi_processor_count} SMs)"
        )
    ref = "installed" if _reference() is not None else "not installed"
    lines = [
        f"command   : {' '.join([Path(sys.executable).name, *sys.argv])}",
        f"host      : {platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        f"torch     : {torch.__version__} (CUDA build {torch.version.cuda}), "
        f"device {'cuda' if cuda else 'cpu'}",
        f"GPU       : {gpu}",
        f"reference : step-decomposed-influence {ref}",
    ]
    if setup := os.environ.get("SDI_DEVICE_SETUP"):
        lines.append(f"setup     : {setup}")
    if not cuda:
        lines.append("note      : no CUDA here: CPU sizes; GPU figures pending a GPU session")
    return lines


def render(head: list[str], rows: list[list[str]], seconds: float) -> str:
    widths = [
        max(len(r[i]) for r in [["step", "what", "result", "verdict"], *rows]) for i in range(4)
    ]
    widths[2] = min(widths[2], 90)
    lines = ["== sdi-pipeline device check ==", *head, ""]
    for row in [["step", "what", "result", "verdict"], ["-" * w for w in widths], *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    fails = sum(r[3] == "FAIL" for r in rows)
    lines.append(f"\n{len(rows)} rows, {fails} FAIL, {seconds:.0f} s in all")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the steps


class Rows:
    """A step's rows, saved after each one so that a step killed by its time box keeps them."""

    def __init__(self, step: str, path: Path) -> None:
        self.step, self.path, self.rows, self.text = step, path, [], ""

    def add(self, what: str, result: str, verdict: str = "") -> None:
        self.rows.append([self.step, what, result, verdict])
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps({"rows": self.rows, "text": self.text}))


def run_step(args: argparse.Namespace) -> None:
    import torch

    torch.set_float32_matmul_precision("highest")  # float32 agreement: no TF32
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = Rows(args.step, args.json)
    rows.save()
    size = sizes(device.type == "cpu", args.quick)
    {
        "tests": step_tests,
        "agree": step_agree,
        "time": step_time,
        "pipeline": step_pipeline,
        "profile": step_profile,
    }[args.step](rows, device, size)


def step_tests(rows: Rows, device: Any, size: dict[str, Any]) -> None:
    """``pytest -m cuda`` over the test files that use the ``device`` fixture."""
    uses = re.compile(r"def test_\w+\([^)]*\bdevice\b", re.S)
    files = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tests").glob("test_*.py")
        if uses.search(p.read_text())
    )
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd + files, capture_output=True, text=True, cwd=REPO)
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1].strip("= ") if lines else proc.stderr.strip()[-200:]
    reasons = sorted(
        {m.group(1) for m in re.finditer(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", proc.stdout)}
    )
    failed = [line for line in lines if line.startswith("FAILED")]
    # Exit 5 = nothing selected; with no GPU every CUDA test skips (exit 0).
    verdict = (
        "PASS"
        if proc.returncode == 0 and device.type == "cuda"
        else ("FAIL" if proc.returncode not in (0, 5) else "SKIP")
    )
    rows.add(f"pytest -m cuda ({len(files)} files)", summary, verdict)
    for reason in reasons:
        rows.add("skipped because", reason)
    for line in failed[:10]:
        rows.add("failed", line.removeprefix("FAILED ")[:120], "FAIL")


def looped_gpt(spec: tuple[int, ...], vocab: int = 256) -> Any:
    import torch

    from sdi_pipeline.toy.model import LoopedGPT, LoopedGPTConfig

    d, heads, d_mlp, seq, tau, _batch = spec
    torch.manual_seed(0)
    return LoopedGPT(LoopedGPTConfig(vocab, d, heads, d_mlp, n_loops=tau, max_len=seq))


def lm_loss(model: Any, tokens: Any) -> Any:
    import torch.nn.functional as F

    logits = model(tokens)[:, :-1]
    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1), reduction="none"
    )
    return flat.view(tokens.shape[0], -1).mean(dim=1)


def token_batch(spec: tuple[int, ...], seed: int, vocab: int = 256) -> Any:
    import torch

    _d, _heads, _d_mlp, seq, _tau, batch = spec
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def rel(a: Any, b: Any) -> float:
    """||a - b|| / ||b||, in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def step_agree(rows: Rows, device: Any, size: dict[str, Any]) -> None:
    import copy

    import torch

    from sdi_pipeline.engine.featurizer import StepFeaturizer
    from sdi_pipeline.engine.spec import SketchSpec
    from sdi_pipeline.jobs import scores

    cpu = torch.device("cpu")
    where = "cpu vs cuda" if device.type == "cuda" else "cpu vs cpu (no CUDA: code path only)"
    for name, spec in size["agree"].items():
        base = looped_gpt(spec)
        train, query = token_batch(spec, 1), token_batch(spec, 2)
        n_weights = sum(p.numel() for p in base.block.parameters())
        modes = [("sketch m=4096", SketchSpec(m=4096, seed=0))]
        if spec[5] * spec[4] * n_weights * 4 < 2**30:  # exact features under 1 GiB
            modes.append(("exact", None))

        pair = (train, query)

        def features(
            dev: Any, sketch: Any, autocast: Any = None, base: Any = base, data: Any = pair
        ) -> Any:
            model = copy.deepcopy(base).to(dev)
            feat = StepFeaturizer(model, ["block"], sketch)
            out = []
            for batch in data:
                with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
                    out.append(feat.featurize([batch.to(dev)], lm_loss).values.float())
            return out

        for label, sketch in modes:
            (t_ref, q_ref), (t_dev, q_dev) = features(cpu, sketch), features(device, sketch)
            sdi_ref = scores.query_step_sdi(t_ref, q_ref)
            sdi_dev = scores.query_step_sdi(t_dev, q_dev)
            err_f, err_s = rel(t_dev, t_ref), rel(sdi_dev, sdi_ref)
            ok = "PASS" if max(err_f, err_s) <= AGREE_TOL else "FAIL"
            rows.add(
                f"{name} {label} float32, {where}",
                f"features {err_f:.1e}, SDI {err_s:.1e} relative (<= {AGREE_TOL:g})",
                ok,
            )
            if label != "sketch m=4096":
                continue
            for dtype in (torch.bfloat16, torch.float16):
                short = str(dtype).removeprefix("torch.")
                try:
                    t_low, q_low = features(device, sketch, dtype)
                except Exception as err:  # an op without a low-precision kernel: say which
                    rows.add(
                        f"{name} {label} {short} autocast",
                        f"{type(err).__name__}: {err}"[:90],
                        "INFO",
                    )
                    continue
                err_s = rel(scores.query_step_sdi(t_low, q_low), sdi_dev)
                rows.add(
                    f"{name} {label} {short} autocast on {device.type}",
                    f"features {rel(t_low, t_dev):.1e}, SDI {err_s:.1e} relative to float32",
                    "INFO",
                )


def _reference() -> Any:
    try:
        import sdi  # the reference package, where it installed
    except ImportError:
        return None
    return sdi


def step_time(rows: Rows, device: Any, size: dict[str, Any]) -> None:
    import copy

    import torch

    from sdi_pipeline.engine.featurizer import StepFeaturizer
    from sdi_pipeline.engine.spec import SketchSpec

    spec = size["time"]
    d, heads, d_mlp, seq, tau, batch = spec
    base = looped_gpt(spec).to(device)
    tokens = token_batch(spec, 1).to(device)
    n_params = len(list(base.block.parameters()))
    n_weights = sum(p.numel() for p in base.block.parameters())
    rows.add(
        "model",
        f"d_model {d}, {heads} heads, d_mlp {d_mlp}, T {seq}, tau {tau}, batch {batch}; "
        f"{n_params} tensors, {n_weights:,} weights in the block",
    )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def plain() -> None:
        base.zero_grad(set_to_none=True)
        lm_loss(base, tokens).sum().backward()

    def ours(sketch: Any) -> Callable[[], object]:
        feat = StepFeaturizer(copy.deepcopy(base), ["block"], sketch)
        return lambda: feat.featurize([tokens], lm_loss).values

    methods: dict[str, Callable[[], object]] = {"plain fwd+bwd": plain}
    for m in size["ms"]:
        note = " (= reference m=1024 bytes)" if m == 1024 * n_params else ""
        methods[f"ours m={m}{note}"] = ours(SketchSpec(m=m, seed=0))
    if batch * tau * n_weights * 4 < 0.5 * _memory(device):
        methods["ours exact"] = ours(None)
    sdi = _reference()
    if sdi is not None:
        ref_model = copy.deepcopy(base)
        ref = sdi.ProjectedTracInSDI(
            model=ref_model, target_modules=ref_model.block, projection_size=1024
        )
        methods["reference m=1024"] = lambda: ref.featurize_loader(loader=[tokens], loss_fn=lm_loss)
        full_model = copy.deepcopy(base)
        full = sdi.FullGradientTracInSDI(
            model=full_model, target_modules=full_model.block, loss_reduction="sum"
        )
        methods["reference exact"] = lambda: full.featurize_loader(loader=[tokens], loss_fn=lm_loss)
    # Peak memory of each method alone, then the timing in interleaved rounds.
    peaks: dict[str, str] = {}
    for name, fn in list(methods.items()):
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            fn()
            sync()
            peaks[name] = (
                f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB"
                if device.type == "cuda"
                else "n/a (CPU)"
            )
        except torch.cuda.OutOfMemoryError:
            rows.add(name, "out of device memory", "INFO")
            del methods[name]
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(size["rounds"]):
        for name, fn in methods.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
        plain_ms = statistics.median(times["plain fwd+bwd"]) * 1e3
        summary = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.rows = [r for r in rows.rows if not r[1].startswith(tuple(methods))]
        for name, ms in summary.items():
            rows.add(
                name,
                f"{ms:9.1f} ms  x{ms / plain_ms:5.2f} plain  {batch / ms * 1e3:8.1f} ex/s  "
                f"peak {peaks[name]}  ({len(times[name])} rounds)",
            )


def _memory(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def step_pipeline(rows: Rows, device: Any, size: dict[str, Any]) -> None:
    import numpy as np
    import torch

    from sdi_pipeline.toy.model import LoopedGPT, LoopedGPTConfig

    p = size["pipeline"]
    vocab = 256
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cfg = LoopedGPTConfig(vocab, p["d"], 4, 4 * p["d"], n_loops=p["tau"], max_len=p["T"])
        paths = []
        for i in range(2):  # two checkpoints, random weights
            torch.manual_seed(i)
            paths.append(tmp / f"ckpt-{i}.pt")
            model = LoopedGPT(cfg)
            torch.save(
                {
                    "model_state_dict": model.state_dict(),
                    "model_config": cfg.to_dict(),
                    "task": {"name": "tokens"},
                    "lr": 1e-3,
                },
                paths[-1],
            )
        gen = np.random.default_rng(0)
        np.save(tmp / "train.npy", gen.integers(1, vocab, (p["n_train"], p["T"])))
        np.save(tmp / "query.npy", gen.integers(1, vocab, (16, p["T"])))
        cmd = [
            # sdi-attribute of this checkout, whichever is on PATH
            sys.executable, "-c", "from sdi_pipeline.launch.attribute_cli import "
            "main; main()",
            "checkpoints=files", f"checkpoints.paths=[{paths[0]},{paths[1]}]",
            "data=tokens", f"data.train.path={tmp}/train.npy", f"data.query.path={tmp}/query.npy",
            f"data.batch_size={p['batch']}", f"data.block_size={max(p['n_train'] // 8, 16)}",
            "sketch.m=4096", "launcher.workers=2", f"runtime.device={device.type}",
            f"run.root={tmp}/runs", "wandb=disabled", "runtime.progress=false",
        ]  # fmt: skip
        env = os.environ | {"SDI_PROGRESS": "0", "PYTHONPATH": str(REPO)}
        started = time.monotonic()
        marks: dict[str, float] = {}
        proc = subprocess.Popen(
            cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        output = []
        for line in proc.stdout:
            output.append(line)
            if re.match(r"\[sdi\] \d+ workers", line):
                marks["workers"] = time.monotonic()
            elif line.startswith("[sdi] merging"):
                marks["merge"] = time.monotonic()
        code = proc.wait()
        total = time.monotonic() - started
        if code != 0 or len(marks) < 2:
            tail = " | ".join(x.strip() for x in output[-3:])[-200:]
            rows.add("sdi-attribute, local, 2 workers", f"exit {code}: {tail}", "FAIL")
            return
        phase = marks["merge"] - marks["workers"]
        gpus = 1 if device.type == "cuda" else 0
        examples = p["n_train"] * len(paths)
        per = f"{examples / phase:,.0f} examples x checkpoints / s" + (
            " per GPU (2 workers sharing it)" if gpus else " on the CPU"
        )
        rows.add(
            f"d_model {p['d']}, T {p['T']}, tau {p['tau']}, N_train {p['n_train']}, m 4096",
            f"{per}; workers {phase:.1f} s, whole command {total:.1f} s",
            "PASS",
        )


def step_profile(rows: Rows, device: Any, size: dict[str, Any]) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from sdi_pipeline.engine.featurizer import StepFeaturizer
    from sdi_pipeline.engine.spec import SketchSpec

    spec = size["time"]
    model = looped_gpt(spec).to(device)
    tokens = token_batch(spec, 1).to(device)
    m = size["ms"][0]
    feat = StepFeaturizer(model, ["block"], SketchSpec(m=m, seed=0))
    feat.featurize([tokens], lm_loss)  # warm-up: kernel costs, the native build
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device.type == "cuda")
    with profile(activities=activities) as prof:
        feat.featurize([tokens], lm_loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=15)
    rows.text = f"== profile: one sketch call (m = {m}) at the timing size, by {key} ==\n{table}"
    rows.add(f"torch.profiler, sketch m={m}", "top 15 kernels printed below the table", "INFO")


if __name__ == "__main__":
    main()
