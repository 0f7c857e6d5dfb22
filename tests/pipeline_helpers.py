"""Toy run configs and checkpoints for the pipeline tests."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import torch
from conftest import make_model
from torch.utils.data import Dataset

from sdi_pipeline.jobs.merge import run_merge
from sdi_pipeline.jobs.query import run_query
from sdi_pipeline.jobs.worker import run_worker
from sdi_pipeline.run.rundir import RunDir, prepare_run
from sdi_pipeline.toy.checkpoints import parity_from_checkpoints
from sdi_pipeline.toy.parity import parity_loss

MODEL = {
    "_target_": "sdi_pipeline.toy.model.LoopedGPT",
    "config": {
        "_target_": "sdi_pipeline.toy.model.LoopedGPTConfig",
        "d_model": 32,
        "n_heads": 4,
        "d_mlp": 64,
        "n_loops": 4,
    },
}


def parity(n: int, seed: int) -> dict[str, Any]:
    return {
        "_target_": "sdi_pipeline.toy.parity.make_parity_dataset",
        "n": n,
        "n_bits": 6,
        "seed": seed,
    }


def toy_config(tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A complete run config over toy checkpoints in ``tmp_path``; ``sections`` override."""
    write_toy_checkpoints(tmp_path / "ckpts")
    cfg: dict[str, Any] = {
        "model": copy.deepcopy(MODEL),
        "checkpoints": {"paths": [str(tmp_path / "ckpts" / "ckpt-*.pt")]},
        "data": {"train": parity(40, 1), "query": parity(5, 2), "batch_size": 8, "block_size": 16},
        "analysis": {
            "targets": ["block"],
            "loss": {"_target_": "sdi_pipeline.toy.parity.parity_loss", "_partial_": True},
        },
        "sketch": {"m": 128},
        "run": {"root": str(tmp_path / "runs"), "name": "toy"},
        "runtime": {"progress": False, "threads": 1},
        "wandb": {"mode": "disabled"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def run_all(cfg: dict[str, Any], workers: int = 1) -> RunDir:
    """Prepare a run of ``cfg``, run its query job, ``workers`` workers and the merge."""
    run = prepare_run(cfg)
    assert run_query(run.path) == 0
    for rank in range(workers):
        assert run_worker(run.path, rank, workers) == 0
    assert run_merge(run.path) == 0
    return run


def slow_parity_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The parity loss, slowed down so a test can kill a worker in the middle of a unit."""
    time.sleep(float(os.environ.get("SDI_TEST_BATCH_SECONDS", "0.3")))
    return parity_loss(model, batch)


class CorruptibleData(Dataset):
    """A data set whose example ``bad_index`` cannot be read while the file ``flag`` exists.

    Stands for a corrupted input in one block: the worker that reads it fails, the others
    do not, and removing ``flag`` is the fix. ``only_in_jobs``: only inside a SLURM job
    (the corruption appears after sdi-attribute's preflight has read every example).
    """

    def __init__(self, data: Dataset, bad_index: int, flag: str, only_in_jobs: bool = False):
        self.data, self.bad_index, self.flag = data, bad_index, Path(flag)
        self.only_in_jobs = only_in_jobs

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        active = not self.only_in_jobs or "SLURM_JOB_ID" in os.environ
        if i == self.bad_index and active and self.flag.exists():
            raise ValueError(f"example {i} is corrupted ({self.flag} exists)")
        return self.data[i]


def corruptible_parity(
    paths: list[str] | str,
    bad_index: int,
    flag: str,
    split: str = "train",
    limit: int = 40,
    only_in_jobs: bool = False,
) -> CorruptibleData:
    """The toy's parity training set with one corruptible example (see CorruptibleData)."""
    data = parity_from_checkpoints(paths, split, limit)
    return CorruptibleData(data, bad_index, flag, only_in_jobs)


def write_toy_checkpoints(folder: Path, n: int = 2, n_train: int = 40) -> list[Path]:
    """Checkpoints in the toy training script's format (model_config and task included)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        model = make_model(seed=i)
        opt = torch.optim.SGD(model.parameters(), lr=0.1 * (i + 1))
        path = folder / f"ckpt-{i:06d}.pt"
        torch.save(
            {
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": opt.state_dict(),
                "step": i,
                "lr": 0.1 * (i + 1),
                "model_config": model.config.to_dict(),
                "task": {"name": "parity", "n_bits": 6, "seed": 1, "n_train": n_train},
            },
            path,
        )
        paths.append(path)
    return paths


def cli_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """sdi-attribute overrides running the default (toy) config small and fast in tmp_path."""
    write_toy_checkpoints(tmp_path / "ckpts")
    return [
        f"checkpoints.paths=[{tmp_path / 'ckpts'}/ckpt-*.pt]",
        "checkpoints.prepare=null",
        f"run.root={tmp_path / 'runs'}",
        "data.train.limit=40",
        "data.query.limit=5",
        "data.block_size=16",
        "data.batch_size=8",
        "sketch.m=128",
        "runtime.progress=false",
        "wandb=disabled",
        *extra,
    ]


def token_overrides(tmp_path: Path, train: Path, query: Path, *extra: str) -> list[str]:
    """:func:`cli_overrides` with ``data=tokens`` on these files, every example of each."""
    return cli_overrides(
        tmp_path, "data=tokens", f"data.train.path={train}", f"data.query.path={query}",
        "data.train.limit=null", "data.query.limit=null", *extra,
    )  # fmt: skip


class NoisyData(Dataset):
    """A data set whose examples change every time they are read (random augmentation)."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        item = dict(self.data[i])
        item["tokens"] = item["tokens"].clone()
        item["tokens"][0] = int(torch.randint(0, 2, ()))
        item["noise"] = torch.rand(())
        return item


def noisy_parity(paths: list[str] | str, split: str = "train", limit: int = 40) -> NoisyData:
    """The toy's parity data with random noise in every read (see NoisyData)."""
    return NoisyData(parity_from_checkpoints(paths, split, limit))


def buggy_parity_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The parity loss, with a bug (an IndexError) while the file $SDI_TEST_BUG exists."""
    flag = os.environ.get("SDI_TEST_BUG")
    if flag and Path(flag).exists():
        raise IndexError("index out of range in self")
    return parity_loss(model, batch)


def worker_bug_parity_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The parity loss, with a bug (an IndexError) in batches of 8 examples while the file
    $SDI_TEST_BUG exists: the workers' batches (data.batch_size=8) fail, the preflight's and
    the query job's (the toy's 5 queries) do not."""
    flag = os.environ.get("SDI_TEST_BUG")
    if flag and Path(flag).exists() and len(batch["tokens"]) == 8:
        raise IndexError("index out of range in self")
    return parity_loss(model, batch)


def short_trace(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    """A loop trace that forgets the last loop step: a user mistake the preflight refuses."""
    from sdi_pipeline.examples.parity_dynamics import parity_loop_trace

    full = parity_loop_trace(model, batch)
    return type(full)(full.states[:, :-1], full.margins[:, :-1])
