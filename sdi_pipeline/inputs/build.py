"""Build what a config names: model, loss, datasets, checkpoint list, device.

Model, loss and datasets are Hydra ``_target_`` nodes, built with
``hydra.utils.instantiate`` (no Hydra app needed), so any importable factory works: the
folders of ``runtime.python_path`` (``sdi-attribute``'s working directory and config dirs)
are put on ``sys.path`` first, in every job.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sdi_pipeline.engine.featurizer import LossFn
from sdi_pipeline.errors import ConfigError, DataError, SDIError
from sdi_pipeline.inputs.checkpoints import resolve_checkpoint_paths
from sdi_pipeline.inputs.dynamics import TraceFn


def use_python_path(cfg: DictConfig) -> None:
    """Put the folders of ``runtime.python_path`` first on ``sys.path`` (once each).

    ``sdi-attribute`` records its working directory and ``--config-dir`` folders there, so
    a factory in ``./mymodels.py`` imports in the jobs too, wherever they run.
    """
    paths = [str(p) for p in OmegaConf.select(cfg, "runtime.python_path", default=None) or []]
    new = [p for p in paths if p not in sys.path]
    if new:
        sys.path[:0] = new
        importlib.invalidate_caches()  # the folders may have gained modules since start-up


# Frames of Hydra and of the import machinery: not where a user's error is.
_MACHINERY = (str(Path(hydra.__file__).parent), str(Path(importlib.__file__).parent), "<frozen")


def _is_hydra_wrapper(err: BaseException) -> bool:
    """Hydra's own wrappers around a failure: InstantiationException, and the ImportError
    its target lookup raises ("Error loading '<target>'")."""
    return isinstance(err, InstantiationException) or (
        type(err) is ImportError and str(err).startswith("Error loading '")
    )


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def _explain(err: InstantiationException, target: str) -> str:
    """The error behind Hydra's wrappers, in one line: type, message, and where it was raised
    (the last frame outside Hydra and importlib)."""
    cause: BaseException = err
    while cause.__cause__ is not None and _is_hydra_wrapper(cause):
        cause = cause.__cause__
    if cause is err:  # Hydra's own complaint, e.g. a target that is not callable
        return _first_line(err)
    missing = cause.name if isinstance(cause, ModuleNotFoundError) else None
    if missing and (target == missing or target.startswith(missing + ".")):
        # The target itself cannot be found (not an import inside the user's code).
        parent, _, attr = missing.rpartition(".")
        if parent in sys.modules:
            return f"module '{parent}' has no attribute '{attr}' (_target_: {target})"
        return (
            f"ModuleNotFoundError: No module named '{missing}' (_target_: {target}); factories "
            "are imported from installed packages, the working directory and --config-dir folders"
        )
    frames = [
        f
        for f in traceback.extract_tb(cause.__traceback__)
        if not f.filename.startswith(_MACHINERY)
    ]
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(cause).__name__}: {_first_line(cause)}{where}"


def instantiate_node(node: Any, what: str) -> Any:
    """Build a Hydra ``_target_`` node; a failure is one ConfigError line naming its cause.

    Hydra wraps a factory's error ("Error in call to target", "Error locating target");
    the message shows the error underneath instead: the user's own exception, or the
    module that failed to import.
    """
    try:
        return instantiate(node)
    except Exception as err:  # a user factory failing is a config problem, not ours
        cause: BaseException | None = err
        while cause is not None:  # an SDIError inside the factory already says the fix
            if isinstance(cause, SDIError):
                raise cause from err
            cause = cause.__cause__ or cause.__context__
        if isinstance(err, InstantiationException):
            target = str(node.get("_target_", "")) if isinstance(node, (dict, DictConfig)) else ""
            raise ConfigError(f"cannot build {what}: {_explain(err, target)}") from err
        raise ConfigError(f"cannot build {what}: {type(err).__name__}: {err}") from err


def build_model(cfg: DictConfig) -> nn.Module:
    use_python_path(cfg)
    model = instantiate_node(cfg.model, "the model (model._target_)")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_ built a {type(model).__name__}, not a torch nn.Module")
    return model


def build_loss(cfg: DictConfig) -> LossFn:
    use_python_path(cfg)
    loss: LossFn = instantiate_node(cfg.analysis.loss, "the loss (analysis.loss)")
    if not callable(loss):
        raise ConfigError(
            "analysis.loss must build a callable loss_fn(model, batch); for a plain function "
            "add `_partial_: true` to its node"
        )
    return loss


def build_loop_trace(cfg: DictConfig) -> TraceFn | None:
    """The callable of ``analysis.loop_trace``, or None when the config names none."""
    if cfg.analysis.loop_trace is None:
        return None
    use_python_path(cfg)
    trace: TraceFn = instantiate_node(
        cfg.analysis.loop_trace, "the loop trace (analysis.loop_trace)"
    )
    if not callable(trace):
        raise ConfigError(
            "analysis.loop_trace must build a callable trace(model, batch) -> LoopTrace; for a "
            "plain function add `_partial_: true` to its node"
        )
    return trace


def build_dataset(cfg: DictConfig, which: str) -> Any:
    """The train or query dataset: anything with ``__len__`` and ``__getitem__``."""
    use_python_path(cfg)
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
    use_python_path(cfg)
    collate = instantiate_node(cfg.data.collate, "the collate function (data.collate)")
    if not callable(collate):
        raise ConfigError("data.collate must build a callable collate_fn(list_of_examples)")
    return collate


# Checkpoint paths and globs are expanded in one place (sdi_pipeline.inputs.checkpoints); the run
# directory code resolves them through this name.
resolve_checkpoints = resolve_checkpoint_paths


def pick_device(cfg: DictConfig, local_rank: int = 0) -> torch.device:
    """The device of ``runtime.device``; ``auto`` is CUDA where visible, else the CPU.

    On CUDA, of the GPUs this process sees, GPU ``local_rank % count``: several tasks of one
    job on a node that all see every GPU spread over them (one visible GPU: always it).
    """
    choice = cfg.runtime.device
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device=cuda but no CUDA device is visible")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
