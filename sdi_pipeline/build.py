"""Build what a config names: model, loss, datasets, checkpoint list, device.

Model, loss and datasets are Hydra ``_target_`` nodes, built with
``hydra.utils.instantiate`` (no Hydra app needed), so any importable factory works.
"""

from __future__ import annotations

from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from sdi_pipeline.checkpoints import resolve_checkpoint_paths
from sdi_pipeline.engine.featurizer import LossFn
from sdi_pipeline.errors import ConfigError, DataError, SDIError


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def instantiate_node(node: Any, what: str) -> Any:
    """Build a Hydra ``_target_`` node; a factory's failure is one ConfigError line (an
    SDIError raised inside the factory is passed on as it is)."""
    try:
        return instantiate(node)
    except Exception as err:  # a user factory failing is a config problem, not ours
        cause: BaseException | None = err
        while cause is not None:
            if isinstance(cause, SDIError):
                raise cause from err
            cause = cause.__cause__ or cause.__context__
        if isinstance(err, InstantiationException):
            raise ConfigError(f"cannot build {what}: {_one_line(str(err))}") from err
        raise ConfigError(
            f"cannot build {what}: {type(err).__name__}: {_one_line(str(err))}"
        ) from err


def build_model(cfg: DictConfig) -> nn.Module:
    model = instantiate_node(cfg.model, "the model (model._target_)")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_ built a {type(model).__name__}, not a torch nn.Module")
    return model


def build_loss(cfg: DictConfig) -> LossFn:
    loss: LossFn = instantiate_node(cfg.analysis.loss, "the loss (analysis.loss)")
    if not callable(loss):
        raise ConfigError(
            "analysis.loss must build a callable loss_fn(model, batch); for a plain function "
            "add `_partial_: true` to its node"
        )
    return loss


def build_dataset(cfg: DictConfig, which: str) -> Any:
    """The train or query dataset: anything with ``__len__`` and ``__getitem__``."""
    data = instantiate_node(cfg.data[which], f"the {which} dataset (data.{which})")
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise DataError(
            f"data.{which} built a {type(data).__name__}, which is not a map-style dataset "
            "(needs __len__ and __getitem__)"
        )
    if len(data) == 0:
        raise DataError(f"data.{which} is empty")
    return data


def build_collate(cfg: DictConfig) -> Any:
    """The DataLoader collate_fn of ``data.collate``, or None for torch's default."""
    if cfg.data.collate is None:
        return None
    collate = instantiate_node(cfg.data.collate, "the collate function (data.collate)")
    if not callable(collate):
        raise ConfigError("data.collate must build a callable collate_fn(list_of_examples)")
    return collate


# Checkpoint paths and globs are expanded in one place (sdi_pipeline.checkpoints); the run
# directory code resolves them through this name.
resolve_checkpoints = resolve_checkpoint_paths


def pick_device(cfg: DictConfig) -> torch.device:
    choice = cfg.runtime.device
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device=cuda but no CUDA device is visible")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
