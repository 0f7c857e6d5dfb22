"""Train the example architectures on parity, and rebuild them from their checkpoints.

Checkpoints have the toy model's format (``model_state_dict``, ``optimizer_state_dict``,
``lr``, ``task``), with ``model_config = {"architecture": name, **kwargs}``, so the toy's
parity data factories (:mod:`sdi_pipeline.toy.checkpoints`) read their task too.

    python -m sdi_pipeline.examples.train looped_gpt2 --out runs/examples/looped_gpt2
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdi_pipeline.errors import CheckpointError
from sdi_pipeline.examples.models import ARCHITECTURES, build_example
from sdi_pipeline.toy.checkpoints import first_checkpoint
from sdi_pipeline.toy.train import train_parity

# Small enough for well under a minute per architecture on 2 CPU cores.
DEFAULT_STEPS = 600


def train_example(
    architecture: str,
    out_dir: str | Path,
    *,
    steps: int = DEFAULT_STEPS,
    n_checkpoints: int = 3,
    seed: int = 0,
    progress: bool = True,
    **model_kwargs: Any,
) -> list[Path]:
    """Train ``architecture`` (built with ``model_kwargs``) on 4-bit parity; checkpoints."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_example(architecture, **model_kwargs)
    config = {"architecture": architecture, **model_kwargs}
    return train_parity(
        model,
        config,
        out_dir,
        steps=steps,
        n_checkpoints=n_checkpoints,
        seed=seed,
        progress=progress,
        desc=f"train {architecture}",
    )


def ensure_example_checkpoints(architecture: str, out_dir: str, **model_kwargs: Any) -> None:
    """The configs' ``checkpoints.prepare`` hook: train unless checkpoints are there."""
    if sorted(Path(out_dir).glob("ckpt-*.pt")):
        return
    print(f"[sdi] no {architecture} checkpoints in {out_dir}: training it first (under a minute)")
    train_example(architecture, out_dir, **model_kwargs)


def model_from_checkpoints(paths: list[str] | str) -> nn.Module:
    """The example model recorded in the (first) checkpoint's ``model_config``."""
    config = dict(first_checkpoint(paths)["model_config"])
    if "architecture" not in config:
        raise CheckpointError(
            f"the checkpoints {paths} were not written by sdi_pipeline.examples.train (their "
            "model_config names no architecture): point checkpoints.paths at an example's"
        )
    return build_example(config.pop("architecture"), **config)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: train one example architecture."""
    parser = argparse.ArgumentParser(
        prog="python -m sdi_pipeline.examples.train",
        description="Train an example looped architecture on parity and write checkpoints.",
    )
    parser.add_argument("architecture", choices=sorted(ARCHITECTURES))
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--n-loops", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in train_example(
        args.architecture, args.out, steps=args.steps, seed=args.seed, n_loops=args.n_loops
    ):
        print(path)


if __name__ == "__main__":
    main()
