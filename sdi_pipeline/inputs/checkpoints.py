"""Finding checkpoints, loading them safely and reading their TracIn weight eta.

A checkpoint is a file (``torch.save`` output or ``.safetensors``) or a directory written by
Hugging Face ``save_pretrained`` (``model.safetensors``, sharded with
``model.safetensors.index.json``, or ``pytorch_model.bin``) or by the HF Trainer
(``checkpoint-N/``, whose ``trainer_state.json`` gives eta).
"""

from __future__ import annotations

import glob
import math
import pickle
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdi_pipeline.errors import CheckpointError
from sdi_pipeline.files.digests import checkpoint_files, read_json, sha256_files
from sdi_pipeline.messages import shortened

# The weight files of a save_pretrained / Trainer directory, in the order Hugging Face
# prefers them; an ``.index.json`` lists the shards of a sharded save.
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class CheckpointSpec:
    """A checkpoint (file or directory) and its TracIn weight eta (``None``: read it from it)."""

    path: str | Path
    eta: float | None = None


def _natural_key(path: str) -> list[Any]:
    """Sort key comparing runs of digits as numbers: checkpoint-900 before checkpoint-1000."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def resolve_checkpoint_paths(patterns: Iterable[str], *, strict: bool = True) -> list[str]:
    """Expand checkpoint paths and globs in order, made absolute.

    Each glob's matches are sorted with numbers compared as numbers (``checkpoint-900``
    before ``checkpoint-1000``). Paths may name files or checkpoint directories.

    ``strict``: every glob must match and every path must be a checkpoint file or a directory
    holding model weights, else an error names it. Not strict, for callers that may run
    before the checkpoints exist: a glob that matches nothing adds nothing, and paths are
    kept whether or not they exist.
    """
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            found = sorted(glob.glob(pattern), key=_natural_key)
            if strict and not found:
                raise CheckpointError(f"checkpoint glob '{pattern}' matches no file")
        else:
            found = [pattern]
        if strict:
            for path in found:
                checkpoint_files(path)
        paths.extend(str(Path(p).resolve()) for p in found)
    return paths


def _load_safetensors(path: Path) -> dict[str, Any]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as err:
        raise CheckpointError(
            f"reading {path} needs the safetensors package: pip install safetensors (or "
            "sdi-pipeline's hf extra: pip install -e '.[hf]' in its checkout)"
        ) from err
    try:
        # safetensors holds only tensors: loading it runs no code, whatever checkpoints.trust.
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {str(err).splitlines()[0]} (a corrupt or "
            "truncated safetensors file?)"
        ) from err


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


def _load_torch(path: Path, trust: bool) -> dict[str, Any]:
    refused = _not_a_checkpoint(path)
    if refused is not None:
        raise refused
    try:
        data = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        text = str(err)
        if not trust and "Unsupported global" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f" (such as {found.group(1)})" if found else ""
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors and plain containers{what}, "
                "which weights_only loading refuses. If you trust the file, allow full "
                "unpickling: checkpoints.trust=true in the config (trust_checkpoints=True for "
                "attribute())."
            ) from err
        found = re.search(r"WeightsUnpickler error: \s*([^\n]+)", text)
        detail = found.group(1).strip() if found else text.splitlines()[0]
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch checkpoint ({detail}): it is damaged "
            "or not written by torch.save; save or copy it again"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"checkpoint {path} is truncated or damaged ({_first_line(err)[:200]}): save or copy "
            "it again"
        ) from err
    except Exception as err:  # torch.load and unpickled code raise many kinds
        raise CheckpointError(
            f"cannot load checkpoint {path} ({_first_line(err)[:200]}): is it a PyTorch "
            "checkpoint written by torch.save?"
        ) from err
    if not isinstance(data, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}, not a dict")
    return dict(data)


def _load_file(path: Path, trust: bool) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        return {"state_dict": _load_safetensors(path)}
    return _load_torch(path, trust)


def load_checkpoint(path: str | Path, *, trust: bool = False) -> dict[str, Any]:
    """Load a checkpoint file or directory onto the CPU, as a dict.

    ``.safetensors`` files hold tensors only. Other files load with
    ``torch.load(weights_only=True)`` (tensors and plain containers); pass ``trust=True``
    only for files you trust: it unpickles arbitrary objects. A directory gives
    ``{"state_dict": its weights merged over shards}``, plus ``"trainer_state"`` (the parsed
    ``trainer_state.json``) for a Trainer checkpoint.
    """
    p = Path(path)
    files = checkpoint_files(p)
    if p.is_file():
        return _load_file(p, trust)
    state: dict[str, Any] = {}
    for f in files:
        state.update(state_dict_of(_load_file(f, trust)))
    data: dict[str, Any] = {"state_dict": state}
    if (p / TRAINER_STATE).is_file():
        trainer = read_json(p / TRAINER_STATE)
        if not isinstance(trainer, Mapping):
            raise CheckpointError(
                f"{p / TRAINER_STATE} holds a {type(trainer).__name__}, not a dict"
            )
        data["trainer_state"] = trainer
    return data


def state_dict_of(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The model state dict: ``model_state_dict``, ``state_dict`` or the checkpoint itself."""
    for key in ("model_state_dict", "state_dict"):
        if key in checkpoint:
            return checkpoint[key]
    return checkpoint


def _trainer_lr(state: Mapping[str, Any]) -> tuple[float, str]:
    """The learning rate a Trainer logged at its checkpoint's step, and where it was read.

    That is the ``log_history`` entry with a ``learning_rate`` and the largest ``step`` not
    after ``global_step`` (later entries of the same step win).
    """
    step = state.get("global_step")
    if not isinstance(step, int):
        raise CheckpointError(f"{TRAINER_STATE} has no integer global_step")
    logged = [
        entry
        for entry in state.get("log_history") or []
        if isinstance(entry, Mapping)
        and isinstance(entry.get("learning_rate"), (int, float))
        and isinstance(entry.get("step"), int)
        and entry["step"] <= step
    ]
    if not logged:
        raise CheckpointError(
            f"{TRAINER_STATE} logs no learning_rate at or before global_step {step} (the "
            "Trainer logs every logging_steps): give checkpoints.etas, one per checkpoint"
        )
    # max() keeps the first of equal steps: scanning backwards, the last one logged.
    best = max(reversed(logged), key=lambda entry: entry["step"])
    where = f"{TRAINER_STATE}: learning_rate logged at step {best['step']}"
    return float(best["learning_rate"]), where + (
        f" (global_step {step})" if best["step"] != step else ""
    )


def _eta_in(checkpoint: Mapping[str, Any], default: float) -> tuple[float, str]:
    """eta read from a loaded checkpoint, and where it was read."""
    trainer = checkpoint.get("trainer_state")
    if isinstance(trainer, Mapping):
        return _trainer_lr(trainer)
    opt = checkpoint.get("optimizer_state_dict")
    if isinstance(opt, Mapping):
        groups = opt.get("param_groups")
        if isinstance(groups, (list, tuple)) and groups and isinstance(groups[0], Mapping):
            lr = groups[0].get("lr")
            if isinstance(lr, (int, float, torch.Tensor)):
                return float(lr), "the optimizer's first learning rate"
    lr = checkpoint.get("lr")
    if isinstance(lr, (int, float)):
        return float(lr), "the checkpoint's lr"
    return float(default), "the default: the checkpoint records no learning rate"


def eta_of(checkpoint: Mapping[str, Any], default: float = 1.0) -> float:
    """eta from a loaded checkpoint.

    A Trainer checkpoint's learning rate from ``trainer_state.json``; else the optimizer's
    first learning rate, else ``lr``, else ``default``.
    """
    return _eta_in(checkpoint, default)[0]


def resolve_eta_and_source(
    spec: CheckpointSpec, checkpoint: Mapping[str, Any], given_by: str = "the given eta"
) -> tuple[float, str]:
    """The spec's eta if set (its source is ``given_by``), else the checkpoint's; finite."""
    if spec.eta is not None:
        eta, source = float(spec.eta), given_by
    else:
        try:
            eta, source = _eta_in(checkpoint, 1.0)
        except CheckpointError as err:
            raise CheckpointError(f"checkpoint {spec.path}: {err}") from err
    if not math.isfinite(eta):
        raise CheckpointError(f"checkpoint {spec.path}: eta must be finite, got {eta}")
    return eta, source


def resolve_eta(spec: CheckpointSpec, checkpoint: Mapping[str, Any]) -> float:
    """The spec's eta if set, else the checkpoint's; must be finite."""
    return resolve_eta_and_source(spec, checkpoint)[0]


def _with_tied(model: nn.Module, state: Mapping[str, Any], source: str | Path) -> dict[str, Any]:
    """``state`` with each missing key of a tied parameter filled from a key tied to it.

    ``save_pretrained`` leaves out tied copies (``lm_head.weight`` when it is
    ``transformer.wte.weight``). Ties are the model's own: names that share one parameter
    object. Tied keys the checkpoint holds must agree, else the checkpoint was not saved
    from a model with these ties.
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    filled = dict(state)
    for tied in names.values():
        present = [n for n in tied if n in state]
        if len(tied) < 2 or not present:
            continue
        first = state[present[0]]
        for name in tied:
            if name not in state:
                filled[name] = first
            elif (
                isinstance(first, torch.Tensor)
                and isinstance(state[name], torch.Tensor)
                and first.shape == state[name].shape
                and not torch.equal(first, state[name])
            ):
                raise CheckpointError(
                    f"checkpoint {source} does not fit the model: {present[0]} and {name} are "
                    "one tied parameter in the model but differ in the checkpoint"
                )
    return filled


def load_into(
    model: nn.Module, checkpoint: Mapping[str, Any], source: str | Path, *, trust: bool = False
) -> None:
    """Load the checkpoint's state dict into ``model``; a mismatch is one clear error.

    Keys of tied parameters the checkpoint leaves out are filled from the parameter they
    are tied to. A ``save_pretrained`` / Trainer folder whose keys do not fit a
    ``transformers`` model as they are (transformers 5 saves some models in their original
    layout: renamed prefixes, unfused experts) is read by the model class's own loader,
    ``from_pretrained``, which applies its conversion mappings. Any other mismatch is
    refused by name.
    """
    state = _with_tied(model, state_dict_of(checkpoint), source)
    problem = _fit_problem(model, state)
    if problem and _is_hf_folder(model, source):
        state = _hf_state(model, Path(source), trust)
        problem = _fit_problem(model, state)
    if problem:
        raise CheckpointError(f"checkpoint {source} does not fit the model: {problem}")
    model.load_state_dict(state)


def _fit_problem(model: nn.Module, state: Mapping[str, Any]) -> str:
    """Why ``state`` does not fit ``model`` key for key and shape for shape ("" if it does)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {shortened(missing, 5)}")
    if unexpected:
        parts.append(f"unexpected keys {shortened(unexpected, 5)}")
    if shapes:
        parts.append(f"shape mismatches {shortened(shapes, 3)}")
    return "; ".join(parts)


def _is_hf_folder(model: nn.Module, source: str | Path) -> bool:
    """A transformers model and a folder with its config.json (save_pretrained, Trainer)."""
    transformers = sys.modules.get("transformers")  # a transformers model means it is loaded
    return (
        transformers is not None
        and isinstance(model, transformers.PreTrainedModel)
        and (Path(source) / "config.json").is_file()
    )


def _hf_state(model: nn.Module, folder: Path, trust: bool) -> dict[str, Any]:
    """The folder's weights in the model's own layout, through its class's ``from_pretrained``
    (with the model's config, so the architecture is the user's, on the CPU)."""
    pickled = not any(folder.glob("*.safetensors"))
    if pickled and not trust:
        raise CheckpointError(
            f"checkpoint {folder} does not fit the model key for key, and reading it in the "
            "model's layout goes through transformers' loader, which would unpickle its .bin "
            "files: save it with safetensors (save_pretrained's default), or set "
            "checkpoints.trust=true if you trust it"
        )
    cls: Any = type(model)
    try:
        loaded = cls.from_pretrained(folder, config=model.config, use_safetensors=not pickled)
    except Exception as err:  # transformers raises many kinds; one line names the folder
        raise CheckpointError(
            f"checkpoint {folder} cannot be read by {cls.__name__}.from_pretrained: "
            f"{_first_line(err)}"
        ) from err
    return _with_tied(model, loaded.state_dict(), folder)


def checkpoint_size(path: str | Path) -> int:
    """Bytes of a checkpoint's weight files (:func:`checkpoint_files`)."""
    return sum(f.stat().st_size for f in checkpoint_files(path))


def file_digest(path: str | Path) -> str:
    """sha256 of a checkpoint (uncached; jobs use the run's :class:`digests.DigestCache`).

    A file's is that of its bytes. A directory's covers its weight files
    (:func:`checkpoint_files`) in sorted order, each name then its bytes.
    """
    return sha256_files(Path(path), checkpoint_files(path))
