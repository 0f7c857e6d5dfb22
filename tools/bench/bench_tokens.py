"""Cost of per-token query sketches against per-step ones: query featurization time and the
query file's bytes, for query_tokens=None (per step only), "last" and "all".

    .venv/bin/python tools/bench/bench_tokens.py [--threads 2] [--repeats 3]

The toy looped GPT (d_model 64, d_mlp 256, 4 loop steps, vocabulary 64), the loop block as
target, m = 1024, 16 queries of L random tokens in one batch, next_token_loss with
per_token=True (L - 1 per-token losses: "all" sketches each of them, "last" the answer).
Time: medians of interleaved repeats of StepFeaturizer.featurize in one process. Bytes: the
query job's HDF5 file (store.write_sketch_file) for one checkpoint. Run it alone: other
processes on the machine distort the times (not the bytes).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sdi_pipeline.engine.featurizer import StepFeatures, StepFeaturizer, TokenChoice
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.formats.sketches import write_sketch_file
from sdi_pipeline.inputs.losses import next_token_loss
from sdi_pipeline.toy.model import LoopedGPT, LoopedGPTConfig

CHOICES: dict[str, TokenChoice | None] = {"per step": None, "last": "last", "all": "all"}


def per_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return next_token_loss(model, batch, per_token=True)


def file_bytes(feats: StepFeatures, folder: Path) -> int:
    """Size of the query file the query job would write for these features."""
    extra = {}
    if feats.tokens is not None and feats.positions is not None:
        extra = {"token_sketch": feats.tokens, "token_positions": feats.positions}
    path = folder / "query.h5"
    n = len(feats)
    write_sketch_file(path, torch.arange(n), feats.values, feats.loss, {}, extra=extra)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LoopedGPTConfig(vocab_size=64, d_model=64, n_heads=4, d_mlp=256, n_loops=4,
                             max_len=max(args.lengths))  # fmt: skip
    model = LoopedGPT(config)
    featurizer = StepFeaturizer(model, ["block"], SketchSpec(m=args.m))
    print(
        f"torch {torch.__version__}, {args.threads} threads, m={args.m}, {args.queries} queries, "
        f"toy looped GPT d_model 64, 4 loop steps; medians of {args.repeats}"
    )
    header = "".join(f"{name + ' ms':>12}" for name in CHOICES)
    header += "".join(f"{name + ' MiB':>13}" for name in CHOICES)
    print(f"{'L':>5}{header}{'last/step':>11}{'all/step':>10}")
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for length in args.lengths:
            ids = torch.randint(0, config.vocab_size, (args.queries, length), generator=gen)
            batch = {"input_ids": ids}
            times: dict[str, list[float]] = {name: [] for name in CHOICES}
            sizes: dict[str, int] = {}
            for _ in range(args.repeats):  # interleaved, so drift hits every choice alike
                for name, choice in CHOICES.items():
                    started = time.perf_counter()
                    feats = featurizer.featurize([batch], per_token_loss, tokens=choice)
                    times[name].append(time.perf_counter() - started)
                    sizes[name] = file_bytes(feats, Path(tmp))
            ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
            row = "".join(f"{ms[name]:12.1f}" for name in CHOICES)
            row += "".join(f"{sizes[name] / 2**20:13.3f}" for name in CHOICES)
            ratio_last = ms["last"] / ms["per step"]
            ratio_all = ms["all"] / ms["per step"]
            print(f"{length:>5}{row}{ratio_last:11.2f}{ratio_all:10.1f}", flush=True)


if __name__ == "__main__":
    main()
