"""Sketching cost against model size: ours and the reference package, relative to a plain
forward+backward of the same batch, on looped GPTs from the toy size up to d_model=512.

    bash tools/bench/run_sketch_bench.sh   # sets up .bench-venv with the reference
    .bench-venv/bin/python tools/bench/bench_scaling.py [--threads 2] [--repeats 5]

Targets the loop block only, next-token loss over random tokens. Run it alone.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from sdi_pipeline.engine.featurizer import StepFeaturizer
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.toy.model import LoopedGPT, LoopedGPTConfig

# (d_model, d_mlp, seq_len, batch, vocab)
SIZES = [(64, 256, 9, 32, 3), (256, 1024, 128, 16, 256), (512, 2048, 256, 8, 256)]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--m", type=int, nargs="+", default=[1024, 4096])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import sdi  # the reference package, installed only in .bench-venv
    except ImportError:
        sdi = None
    found = "yes" if sdi else "not installed"
    print(f"torch {torch.__version__}, {args.threads} threads; reference: {found}")
    header = f"{'d_model':>7} {'T':>4} {'B':>3} {'m':>5} {'plain ms':>9} {'ours ms':>8}"
    header += f" {'ours/plain':>10}"
    print(header + (f" {'ref ms':>8} {'ref/ours':>8}" if sdi else ""))
    for size in SIZES:
        for line in measure(size, args.m, args.repeats, sdi):
            print(line, flush=True)


def measure(size: tuple[int, ...], ms: list[int], repeats: int, sdi: Any) -> list[str]:
    """Table rows for one model size: plain, ours and (if installed) the reference."""
    d, d_mlp, seq, batch, vocab = size
    torch.manual_seed(0)
    heads = 4 if d == 64 else 8
    cfg = LoopedGPTConfig(vocab_size=vocab, d_model=d, n_heads=heads, d_mlp=d_mlp, max_len=seq)
    model = LoopedGPT(cfg)
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))

    def loss_fn(m: torch.nn.Module, b: torch.Tensor) -> torch.Tensor:
        logits = m(b)[:, :-1]
        flat = F.cross_entropy(logits.reshape(-1, vocab), b[:, 1:].reshape(-1), reduction="none")
        return flat.view(b.shape[0], -1).mean(dim=1)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model, tokens).sum().backward()

    t_plain = median_ms(plain, repeats)
    rows = []
    for m in ms:
        ours = StepFeaturizer(model, ["block"], SketchSpec(m=m))
        t_ours = median_ms(lambda: ours.featurize([tokens], loss_fn), repeats)  # noqa: B023
        row = f"{d:>7} {seq:>4} {batch:>3} {m:>5} {t_plain:>9.1f} {t_ours:>8.1f}"
        row += f" {t_ours / t_plain:>10.2f}"
        if sdi is not None:
            ref_model = copy.deepcopy(model)  # the reference leaves hooks on its model
            ref = sdi.ProjectedTracInSDI(
                model=ref_model, target_modules=ref_model.block, projection_size=m
            )
            run_ref = lambda: ref.featurize_loader(loader=[tokens], loss_fn=loss_fn)  # noqa: B023, E731
            t_ref = median_ms(run_ref, repeats)
            row += f" {t_ref:>8.1f} {t_ref / t_ours:>8.2f}"
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
