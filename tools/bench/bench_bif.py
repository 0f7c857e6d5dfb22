"""Time per SGLD draw and BIF scoring: sdi_pipeline.engine (sgld, bif) against devinterp 2.0.1,
side by side on the same model, data and settings.

    .venv/bin/python tools/bench/bench_bif.py [--threads 2] [--chains 2] [--draws 20] [--repeats 3]
        [--pipeline-workers 1,2] [--only-pipeline]

A small causal transformer LM (2 layers, d_model 64, vocab 64, sequences of 33 tokens),
256 training sequences, batch 16, one draw per step (no burn-in), 64 observed sequences whose
per-token losses are recorded at every draw. devinterp's sample() writes its zarr store (what
its users get); ours keeps the traces in memory. Then token-wise and sequence BIF of the
observed sequences on themselves from the same traces. Timings are medians of interleaved
repeats; run it alone: other processes on the machine distort them. Needs the dev extras.

Then the pipeline's throughput: ``sdi-attribute method=bif`` on the toy parity model (its
checkpoints are trained into a temporary folder first, about a minute) with the local
launcher at each of ``--pipeline-workers`` world sizes: wall time of the whole command
(preflight, query job, workers, merge) and of the workers' units as their markers record them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
import xarray as xr
from devinterp.slt.bif import compute_bif as devinterp_compute_bif
from devinterp.slt.lm_loss import compute_per_token_loss
from devinterp.slt.sampling import sample as devinterp_sample
from torch import nn

from sdi_pipeline.engine.bif import compute_bif
from sdi_pipeline.engine.sgld import LossRecorder, SGLDConfig, sample

VOCAB, LENGTH, N_TRAIN, N_OBS, BATCH = 64, 33, 256, 64, 16


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, written out: nn.TransformerEncoderLayer takes a
    fused path in eval mode under no_grad whose rounding differs from its train-mode path,
    which would make the traces differ from devinterp's (train mode) by float rounding."""

    def __init__(self, d_model: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.out = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, -1).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        h = h + self.out(att.transpose(1, 2).reshape(b, t, d))
        return h + self.mlp(self.norm2(h))


class TinyLM(nn.Module):
    """A causal transformer LM: input_ids (B, T) -> logits (B, T, V); no dropout."""

    def __init__(self, d_model: int = 64, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(LENGTH, d_model))
        self.blocks = nn.Sequential(*[Block(d_model) for _ in range(layers)])
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) + self.pos[: input_ids.shape[1]]
        return self.head(self.blocks(h))


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return compute_per_token_loss(model, batch["input_ids"])


def elapsed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pipeline-workers", default="1,2")
    parser.add_argument("--only-pipeline", action="store_true")
    args = parser.parse_args()
    if args.only_pipeline:
        pipeline_throughput(args)
        return
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # devinterp's deprecation and temp-dir warnings

    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, VOCAB, (N_TRAIN, LENGTH), generator=torch.Generator().manual_seed(1))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    obs = data.select(range(N_OBS))
    settings = dict(lr=1e-4, n_beta=BATCH / torch.log(torch.tensor(BATCH)).item())
    config = SGLDConfig(
        **settings,
        num_chains=args.chains,
        num_draws=args.draws,
        batch_size=BATCH,
        localization=100.0,
        num_init_loss_batches=4,
        devinterp_seeding=True,
    )
    draws = args.chains * args.draws
    workdir = Path(tempfile.mkdtemp(prefix="bench_bif_"))
    trees: list[xr.DataTree] = []
    ours_traces: list[torch.Tensor] = []

    def run_devinterp() -> None:
        out = workdir / f"samples-{len(trees)}.zarr"
        trees.append(
            devinterp_sample(
                model,
                data,
                {"obs": (obs, N_OBS // BATCH)},
                **settings,
                num_chains=args.chains,
                num_draws=args.draws,
                batch_size=BATCH,
                localization=100.0,
                num_init_loss_batches=4,
                device="cpu",
                output_path=out,
            )
        )

    # devinterp observes a seeded shuffle of the observable set: record the same rows, in its
    # order, from a warm-up run (not timed).
    run_devinterp()
    rows = torch.as_tensor(trees[0].dataset["input_ids_obs"].values)
    batches = [{"input_ids": rows[i : i + BATCH]} for i in range(0, N_OBS, BATCH)]

    def run_ours() -> None:
        recorder = LossRecorder(batches, lm_loss, args.chains, args.draws)
        ours_traces.append(sample(model, data, lm_loss, config, {"obs": recorder}).traces["obs"])

    times: dict[str, list[float]] = {"devinterp": [], "sdi_pipeline": []}
    for _ in range(args.repeats):
        times["devinterp"].append(elapsed(run_devinterp))
        times["sdi_pipeline"].append(elapsed(run_ours))
    print(
        f"SGLD + recording {N_OBS} x {LENGTH - 1} token losses per draw, {args.chains} chains x "
        f"{args.draws} draws, batch {BATCH}, {args.threads} threads:"
    )
    for name, ts in times.items():
        print(f"  {name:13s} {1e3 * statistics.median(ts) / draws:8.2f} ms per draw")

    # The traces should be devinterp's exactly (same seeds; eval and train mode compute the
    # same for this dropout-free model), so BIF is timed on one input.
    theirs = torch.as_tensor(trees[-1].dataset["loss_obs"].values)
    diff = float((theirs - ours_traces[-1]).abs().max())
    print(f"  traces identical: {torch.equal(theirs, ours_traces[-1])} (max |diff| {diff:.3g})")
    for method in ("sequence", "token"):
        t_dev = [
            elapsed(
                lambda m=method: devinterp_compute_bif(
                    trees[-1], correlation_method=m, device="cpu", batch_size=32
                )
            )
            for _ in range(args.repeats)
        ]
        t_ours = [
            elapsed(lambda m=method: compute_bif(theirs, theirs, method=m))
            for _ in range(args.repeats)
        ]
        print(
            f"BIF {method:8s} {N_OBS}x{N_OBS} from {draws} samples: devinterp "
            f"{1e3 * statistics.median(t_dev):8.1f} ms, sdi_pipeline "
            f"{1e3 * statistics.median(t_ours):8.1f} ms"
        )
    pipeline_throughput(args)


def pipeline_throughput(args: argparse.Namespace) -> None:
    """``sdi-attribute method=bif`` on the toy model at each world size (see the docstring)."""
    from sdi_pipeline.launch.attribute_cli import run as attribute_main
    from sdi_pipeline.toy.checkpoints import ensure_toy_checkpoints

    root = Path(tempfile.mkdtemp(prefix="bench_bif_pipeline_"))
    ensure_toy_checkpoints(str(root / "ckpts"))
    chains, draws = args.chains, args.draws
    print(f"pipeline, toy parity model, {chains} chains x {draws} draws per checkpoint:")
    for workers in [int(w) for w in args.pipeline_workers.split(",")]:
        overrides = [
            f"checkpoints.paths=[{root / 'ckpts'}/ckpt-*.pt]",
            "checkpoints.prepare=null",
            f"run.root={root / f'runs-{workers}'}",
            "method=bif",
            f"bif.chains={chains}",
            f"bif.draws={draws}",
            "runtime.progress=false",
            "wandb=disabled",
            f"launcher.workers={workers}",
        ]
        started = time.perf_counter()
        assert attribute_main(overrides) == 0
        seconds = time.perf_counter() - started
        run = next((root / f"runs-{workers}" / "toy-parity").iterdir())
        markers = [json.loads(p.read_text()) for p in (run / "completions").glob("bif-*")]
        unit_s = sum(m["seconds"] for m in markers)
        rows = sum(m["examples"] for m in markers)
        print(
            f"  W={workers}: {seconds:6.1f} s end to end; {len(markers)} units, "
            f"{unit_s:6.1f} s of unit time ({rows / max(unit_s, 1e-9):8.1f} example-chains/s)"
        )


if __name__ == "__main__":
    main()
