"""Cost of sketching a whole looped block, per architecture, against a plain forward+backward:
with the dedicated layer handlers (Linear, Conv1D, Embedding, Opacus samplers) and with every
module forced through the generic torch.func fallback.

    .venv/bin/python tools/bench/bench_architectures.py [--threads 2] [--repeats 5] [--only ...]

Each architecture of sdi_pipeline.examples.models, 6 loop steps, d_model 128, batch 32,
sequence length 33, next-token-at-the-end loss over random tokens; the core block is the
target. The looped-LM bodies of sdi_pipeline.examples.looped (gated multi-layer loop with
short convolutions read without a call, looped top-k MoE on token-flattened rows, recurrent
depth) are targeted whole, with their steps as passes. Timings are medians of interleaved
repeats in one process. Run it alone: other processes on the machine distort the figures.
Needs transformers (pip install -e .[hf]).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from sdi_pipeline.engine import registry
from sdi_pipeline.engine.featurizer import StepFeaturizer
from sdi_pipeline.engine.layers.generic import GenericHandler
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.examples.models import build_example

ARCHS = {
    "looped_gpt2": "core",
    "looped_llama": "core",
    "albert": "mlm.albert.encoder.albert_layer_groups.0",
    "looped_encoder": "core",
    "gated_loop": "layers",
    "looped_moe": "layers",
    "recurrent_depth": "block",
}


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["tokens"])[:, -1, :]
    return F.cross_entropy(logits, batch["target"], reduction="none")


@contextmanager
def generic_only() -> Iterator[None]:
    """Every module type goes to the generic fallback (nn.MultiheadAttention keeps its
    subtree), as a model with no dedicated handler at all would."""
    import sdi_pipeline.engine.layers  # noqa: F401  (the built-in registrations)

    saved = dict(registry._LAYERS)
    registry._LAYERS.clear()
    registry.register_layer(nn.MultiheadAttention, claims_subtree=True)(GenericHandler)
    registry.register_layer(nn.Module, same_forward=False)(GenericHandler)
    try:
        yield
    finally:
        registry._LAYERS.clear()
        registry._LAYERS.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=33)
    parser.add_argument("--only", nargs="*", choices=sorted(ARCHS), help="these architectures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, m={args.m}, d_model={args.d_model},"
        f" batch {args.batch}, T={args.seq}, 6 loop steps; medians of {args.repeats}"
    )
    print(
        f"{'architecture':>15} {'plain ms':>9} {'dedicated ms':>13} {'ded/plain':>9} "
        f"{'generic ms':>11} {'gen/plain':>9} {'handlers (dedicated)'}"
    )
    gen = torch.Generator().manual_seed(0)
    for arch, core in ARCHS.items():
        if not args.only or arch in args.only:
            print(measure(arch, core, args, gen), flush=True)


def measure(arch: str, core: str, args: argparse.Namespace, gen: torch.Generator) -> str:
    """One architecture's line: plain, dedicated and generic medians and their ratios."""
    torch.manual_seed(0)
    model = build_example(arch, n_loops=6, d_model=args.d_model, vocab_size=64,
                          max_len=args.seq)  # fmt: skip
    model.eval()
    batch = {
        "tokens": torch.randint(0, 64, (args.batch, args.seq), generator=gen),
        "target": torch.randint(0, 64, (args.batch,), generator=gen),
    }
    spec = SketchSpec(m=args.m)
    dedicated = StepFeaturizer(model, [core], spec)
    with generic_only():
        generic = StepFeaturizer(model, [core], spec)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).sum().backward()

    runs: dict[str, Callable[[], object]] = {
        "plain": plain,
        "dedicated": lambda: dedicated.featurize([batch], loss_fn),
        "generic": lambda: generic.featurize([batch], loss_fn),
    }
    for fn in runs.values():  # warm up (functorch, kernels, hash tables)
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():  # interleaved: drift hits all three alike
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    kinds = sorted({type(h).__name__.removesuffix("Handler") for h in dedicated.handlers.values()})
    return (
        f"{arch:>15} {med['plain']:9.1f} {med['dedicated']:13.1f} "
        f"{med['dedicated'] / med['plain']:9.2f} {med['generic']:11.1f} "
        f"{med['generic'] / med['plain']:9.2f} {', '.join(kinds)}"
    )


if __name__ == "__main__":
    main()
