"""Time the dense and FFT Linear-weight sketch kernels over shapes; check the cost model.

Prints the cost constants measured on this machine (what kernel="auto" caches per host,
see sdi_pipeline/engine/calibration.py) and, per shape, the measured time of each kernel,
which one is faster, and which one `choose_linear_kernel` picks with the measured and with
the default constants. Run alone (other processes distort timings):

    python tools/bench/calibrate_kernels.py [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils import benchmark

from sdi_pipeline.engine.calibration import DEFAULT_COSTS, measure_costs
from sdi_pipeline.engine.hashing import induced_buckets, make_count_sketch_hash
from sdi_pipeline.engine.kernels import (
    Workspace,
    choose_linear_kernel,
    linear_weight_dense,
    linear_weight_fft,
)

SHAPES = [  # (batch, tokens, d_out, d_in, m)
    (32, 9, 64, 64, 1024),
    (32, 9, 256, 64, 4096),
    (32, 64, 64, 64, 1024),
    (32, 128, 256, 256, 1024),
    (32, 128, 256, 256, 4096),
    (16, 256, 512, 512, 1024),
    (16, 256, 512, 512, 4096),
    (8, 512, 1024, 1024, 4096),
    (8, 512, 2048, 512, 2048),
    (8, 1, 1024, 1024, 1024),
    (8, 2, 1024, 1024, 4096),
    (8, 4, 1024, 1024, 1024),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    measured = measure_costs(torch.device("cpu"))
    print(f"torch {torch.__version__}, {args.threads} threads")
    print(f"constants: measured {measured}, default {DEFAULT_COSTS}")
    head = f"{'B':>3} {'T':>4} {'d_out':>5} {'d_in':>5} {'m':>5}  dense_ms  fft_ms  faster"
    print(f"{head}  measured  default")
    for b, t, d_out, d_in, m in SHAPES:
        h_out = make_count_sketch_hash(0, "w", "out", d_out, m)
        h_in = make_count_sketch_hash(0, "w", "in", d_in, m)
        buckets = induced_buckets(h_out, h_in)
        delta, x = torch.randn(b, t, d_out), torch.randn(b, t, d_in)
        env = dict(dense=linear_weight_dense, fft=linear_weight_fft, delta=delta, x=x)
        env.update(buckets=buckets, h_out=h_out, h_in=h_in, ws=Workspace())
        env.update(out=torch.zeros(b, m))
        stmt = "dense(delta, x, h_out, h_in, buckets, out, ws)"
        dense = benchmark.Timer(stmt, globals=env).blocked_autorange(min_run_time=0.3)
        fft = benchmark.Timer("fft(delta, x, h_out, h_in)", globals=env).blocked_autorange(
            min_run_time=0.3
        )
        faster = "dense" if dense.median < fft.median else "fft"
        picked = choose_linear_kernel(t, d_out, d_in, m, measured)
        default = choose_linear_kernel(t, d_out, d_in, m, DEFAULT_COSTS)
        print(
            f"{b:>3} {t:>4} {d_out:>5} {d_in:>5} {m:>5}  {dense.median * 1e3:8.2f} "
            f"{fft.median * 1e3:7.2f}  {faster:>6}  {picked:>8}  {default:>7}"
        )


if __name__ == "__main__":
    main()
