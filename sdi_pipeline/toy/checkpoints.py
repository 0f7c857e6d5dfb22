"""Config factories for the toy model: everything is read from its checkpoints.

The toy checkpoints record the model architecture (``model_config``) and the parity task
they were trained on (``task``), so the model and the data a run attributes always match
them. ``ensure_toy_checkpoints`` is the launcher's ``checkpoints.prepare`` hook.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdi_pipeline.errors import CheckpointError, ConfigError
from sdi_pipeline.inputs.checkpoints import load_checkpoint, resolve_checkpoint_paths
from sdi_pipeline.toy.model import LoopedGPT, LoopedGPTConfig
from sdi_pipeline.toy.parity import ParityData, make_parity_dataset


def first_checkpoint(paths: list[str] | str) -> dict[str, Any]:
    """The first checkpoint of ``paths`` (a toy-format one: with model_config and task)."""
    patterns = [paths] if isinstance(paths, str) else list(paths)
    # Not strict: building the toy model or data before its checkpoints exist is this error.
    files = sorted(resolve_checkpoint_paths(patterns, strict=False))
    if not files or not Path(files[0]).is_file():
        raise CheckpointError(f"no toy checkpoint found at {patterns}: run sdi-train-toy first")
    data = load_checkpoint(files[0])
    if "model_config" not in data or "task" not in data:
        raise CheckpointError(f"{files[0]} is not a toy checkpoint (no model_config / task)")
    return data


def model_from_checkpoints(paths: list[str] | str) -> LoopedGPT:
    """A LoopedGPT with the architecture recorded in the (first) checkpoint."""
    return LoopedGPT(LoopedGPTConfig.from_dict(first_checkpoint(paths)["model_config"]))


def parity_from_checkpoints(
    paths: list[str] | str, split: str = "train", limit: int | None = None
) -> ParityData:
    """The parity data of the checkpoints' task: its training set or held-out queries.

    ``limit`` keeps the first examples (the training set's first ``limit``; for queries,
    ``limit`` is the number of queries, default 16).
    """
    task = first_checkpoint(paths)["task"]
    if split == "train":
        data = make_parity_dataset(
            int(task["n_train"]), n_bits=int(task["n_bits"]), seed=int(task["seed"])
        )
        if limit is not None:
            data = ParityData(data.tokens[:limit], data.targets[:limit])
        return data
    if split == "query":
        from sdi_pipeline.toy.train import HELD_OUT_SEED_OFFSET

        seed = int(task["seed"]) + HELD_OUT_SEED_OFFSET
        return make_parity_dataset(limit or 16, n_bits=int(task["n_bits"]), seed=seed)
    raise ConfigError(f"split must be 'train' or 'query', got {split!r}")


def ensure_toy_checkpoints(out_dir: str) -> None:
    """Train the toy model into ``out_dir`` unless its checkpoints are already there."""
    from sdi_pipeline.toy.train import train_toy

    if sorted(Path(out_dir).glob("ckpt-*.pt")):
        return
    print(f"[sdi] no toy checkpoints in {out_dir}: training the toy model first (about a minute)")
    train_toy(Path(out_dir), progress=True)
