"""Finding checkpoint files, loading them safely and reading their TracIn weight eta."""

from __future__ import annotations

import glob
import math
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdi_pipeline.digests import sha256_file
from sdi_pipeline.errors import CheckpointError
from sdi_pipeline.messages import shortened


@dataclass(frozen=True)
class CheckpointSpec:
    """A checkpoint file and its TracIn weight eta (``None``: read it from the file)."""

    path: str | Path
    eta: float | None = None


def resolve_checkpoint_paths(patterns: Iterable[str], *, strict: bool = True) -> list[str]:
    """Expand checkpoint paths and globs in order (each glob's matches sorted), made absolute.

    ``strict``: every glob must match and every path must be a file, else an error names
    the pattern. Not strict, for callers that may run before the checkpoints exist: a glob
    that matches nothing adds nothing, and paths are kept whether or not they exist.
    """
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            found = sorted(glob.glob(pattern))
            if strict and not found:
                raise CheckpointError(f"checkpoint glob '{pattern}' matches no file")
        else:
            if strict and not Path(pattern).is_file():
                raise CheckpointError(f"checkpoint not found: {pattern}")
            found = [pattern]
        paths.extend(str(Path(p).resolve()) for p in found)
    return paths


def _first_line(err: BaseException) -> str:
    """``Type: first sentence`` of an exception's message."""
    text = " ".join(str(err).split())
    text = text.split(". ")[0].rstrip(".")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _not_a_checkpoint(p: Path) -> CheckpointError | None:
    """A clear error for a file that cannot be a torch.save file (by its first bytes)."""
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as err:
        return CheckpointError(f"cannot read checkpoint {p} ({err})")
    if not head:
        return CheckpointError(
            f"checkpoint {p} is empty (0 bytes): it was not written completely; save it again "
            "or remove it from checkpoints.paths"
        )
    # torch.save writes a zip archive (PK..); the legacy format and plain pickles start with
    # the pickle protocol opcode 0x80.
    if head.startswith(b"PK") or head[0] == 0x80:
        return None
    return CheckpointError(
        f"checkpoint {p} is not a PyTorch checkpoint (it starts with {head[:4]!r}, not a "
        "torch.save archive): point checkpoints.paths at files written by torch.save"
    )


def load_checkpoint(path: str | Path, *, trust: bool = False) -> dict[str, Any]:
    """Load a checkpoint onto the CPU.

    By default with ``weights_only=True`` (tensors and plain containers only). Pass
    ``trust=True`` only for files you trust: it unpickles arbitrary objects. Any file that
    cannot be loaded is one CheckpointError saying why and what to do.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    refused = _not_a_checkpoint(p)
    if refused is not None:
        raise refused
    try:
        data = torch.load(p, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        text = str(err)
        if not trust and "Unsupported global" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f" (such as {found.group(1)})" if found else ""
            raise CheckpointError(
                f"checkpoint {p} holds objects other than tensors and plain containers{what}, "
                "which weights_only loading refuses. If you trust the file, allow full "
                "unpickling: checkpoints.trust=true in the config (trust_checkpoints=True for "
                "attribute())."
            ) from err
        found = re.search(r"WeightsUnpickler error: \s*([^\n]+)", text)
        detail = found.group(1).strip() if found else text.splitlines()[0]
        raise CheckpointError(
            f"checkpoint {p} is not a readable PyTorch checkpoint ({detail}): it is damaged or "
            "not written by torch.save; save or copy it again"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"checkpoint {p} is truncated or damaged ({_first_line(err)[:200]}): save or copy "
            "it again"
        ) from err
    except Exception as err:  # torch.load and unpickled code raise many kinds
        raise CheckpointError(
            f"cannot load checkpoint {p} ({_first_line(err)[:200]}): is it a PyTorch checkpoint "
            "written by torch.save?"
        ) from err
    if not isinstance(data, Mapping):
        raise CheckpointError(f"checkpoint {p} holds a {type(data).__name__}, not a dict")
    return dict(data)


def state_dict_of(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The model state dict: ``model_state_dict``, ``state_dict`` or the checkpoint itself."""
    for key in ("model_state_dict", "state_dict"):
        if key in checkpoint:
            return checkpoint[key]
    return checkpoint


def eta_of(checkpoint: Mapping[str, Any], default: float = 1.0) -> float:
    """eta from the checkpoint: the optimizer's first learning rate, else ``lr``, else default."""
    opt = checkpoint.get("optimizer_state_dict")
    if isinstance(opt, Mapping):
        groups = opt.get("param_groups")
        if isinstance(groups, (list, tuple)) and groups and isinstance(groups[0], Mapping):
            lr = groups[0].get("lr")
            if isinstance(lr, (int, float, torch.Tensor)):
                return float(lr)
    lr = checkpoint.get("lr")
    if isinstance(lr, (int, float)):
        return float(lr)
    return float(default)


def load_into(model: nn.Module, checkpoint: Mapping[str, Any], source: str | Path) -> None:
    """Load the checkpoint's state dict into ``model``; a mismatch is one clear error."""
    state = state_dict_of(checkpoint)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {shortened(missing, 5)}")
        if unexpected:
            parts.append(f"unexpected keys {shortened(unexpected, 5)}")
        if shapes:
            parts.append(f"shape mismatches {shortened(shapes, 3)}")
        raise CheckpointError(f"checkpoint {source} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state)


def resolve_eta(spec: CheckpointSpec, checkpoint: Mapping[str, Any]) -> float:
    """The spec's eta if set, else the checkpoint's; must be finite."""
    eta = spec.eta if spec.eta is not None else eta_of(checkpoint)
    if not math.isfinite(eta):
        raise CheckpointError(f"checkpoint {spec.path}: eta must be finite, got {eta}")
    return float(eta)


def file_digest(path: str | Path) -> str:
    """sha256 of a file (uncached; jobs use the run's :class:`digests.DigestCache`)."""
    return sha256_file(path)
