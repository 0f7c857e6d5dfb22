"""Demo: train a looped transformer on parity, then ask which training examples shaped which
loop step of its answers.

    python tools/demo.py [--out runs/demo] [--n-attr 384] [--n-query 6] [--m 2048]

Trains the toy model on the CPU (about a minute, three checkpoints), computes Step-Decomposed
Influence with gradient sketches for a few hundred training examples against a handful of
held-out queries, prints the most influential training examples per query (overall and at the
loop step where influence peaks) and writes a plot of influence across loop steps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from sdi_pipeline.toy.train import load_toy_model, train_toy
from torch.utils.data import DataLoader, Subset

from sdi_pipeline.attribute import attribute
from sdi_pipeline.report import plot_step_profiles, step_energy, top_table
from sdi_pipeline.sketch.spec import SketchSpec
from sdi_pipeline.toy.model import LoopedGPT, LoopedGPTConfig
from sdi_pipeline.toy.parity import make_parity_dataset, parity_loss

TARGETS = ["tok_emb", "pos_emb", "block", "ln_f", "head"]


def bits(tokens: torch.Tensor) -> str:
    return "".join("=" if int(t) == 2 else str(int(t)) for t in tokens)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--n-attr", type=int, default=384, help="training examples to attribute")
    parser.add_argument("--n-query", type=int, default=6, help="held-out queries")
    parser.add_argument("--m", type=int, default=2048, help="sketch size")
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    print("== 1/3  training a looped transformer on parity (CPU) ==")
    checkpoints = train_toy(args.out / "checkpoints", progress=True)
    ckpt = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)
    task = ckpt["task"]
    model: LoopedGPT = load_toy_model(checkpoints[-1])
    config = LoopedGPTConfig.from_dict(ckpt["model_config"])
    train_set = make_parity_dataset(task["n_train"], n_bits=task["n_bits"], seed=task["seed"])
    queries = make_parity_dataset(args.n_query, n_bits=task["n_bits"], seed=task["seed"] + 10_000)
    attributed = Subset(train_set, range(min(args.n_attr, len(train_set))))
    where = args.out / "checkpoints"
    print(f"   {len(checkpoints)} checkpoints in {where}; loop steps τ = {config.n_loops}")

    print(f"\n== 2/3  sketching per-step gradients (m = {args.m}) and contracting ==")
    result = attribute(
        model,
        TARGETS,
        checkpoints,
        DataLoader(attributed, batch_size=64),
        DataLoader(queries, batch_size=64),
        parity_loss,
        spec=SketchSpec(m=args.m),
        progress=True,
    )
    names = result.query_layout.slot_names()

    def describe(i: int) -> str:
        ex = train_set[i]
        return f"{bits(ex['tokens'])} parity {int(ex['target'])}"

    print("\n== 3/3  most influential training examples per query ==")
    energy = step_energy(result.sdi)
    with torch.no_grad():
        preds = model(queries.tokens)[:, -1].argmax(-1)
    for j in range(len(queries)):
        peak = int(energy[j].argmax())
        print(
            f"\nquery {j}: {bits(queries.tokens[j])}  parity {int(queries.targets[j])}"
            f"  (model says {int(preds[j])})  influence peaks at {names[peak]}"
        )
        print(" overall (TracIn = Σ_t SDI):")
        print("\n".join(top_table(result.tracin, j, args.top, describe)))
        print(f" at {names[peak]}:")
        print("\n".join(top_table(result.sdi[:, :, peak], j, args.top, describe)))
    plot = plot_step_profiles(
        result.sdi, names, args.out / "sdi_steps.png", title="SDI across loop steps (parity)"
    )
    print(f"\nplot written to {plot}")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
