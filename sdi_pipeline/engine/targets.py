"""Resolve the user's target modules and classify the parameters they hold.

Targets are module names or glob patterns over ``model.named_modules()`` (or the module
objects themselves). Every trainable parameter under a target is analysed; each is owned by
exactly one module, whose calls the capture hooks observe, and is handled by the layer
handler the registry finds for that module's type.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence

from torch import nn

from sdi_pipeline.engine.registry import (
    HandlerClass,
    TargetParam,
    handler_for,
    supported_description,
)
from sdi_pipeline.errors import UnsupportedModel


def resolve_target_modules(
    model: nn.Module, targets: Sequence[str | nn.Module] | str | nn.Module
) -> list[str]:
    """Names (in ``named_modules`` order) of the modules the targets select.

    Strings are exact names or glob patterns (``"block"``, ``"block.*"``, ``"layers.*.mlp"``);
    a pattern that matches nothing is an error listing the nearest module names.
    """
    if isinstance(targets, (str, nn.Module)):
        targets = [targets]
    if len(targets) == 0:
        raise UnsupportedModel(
            "no target modules given: name the looped block (e.g. targets=['block'])"
        )
    named = dict(model.named_modules())
    by_id = {id(m): n for n, m in named.items()}
    chosen: set[str] = set()
    for target in targets:
        if isinstance(target, nn.Module):
            if id(target) not in by_id:
                raise UnsupportedModel(
                    f"target module {type(target).__name__} is not a submodule of the model"
                )
            chosen.add(by_id[id(target)])
            continue
        matches = [n for n in named if n == target or fnmatch.fnmatchcase(n, target)]
        if not matches:
            near = difflib.get_close_matches(target, [n for n in named if n], n=5, cutoff=0.4)
            hint = f" Nearest module names: {', '.join(near)}." if near else ""
            raise UnsupportedModel(
                f"target pattern '{target}' matches no module of the model.{hint}"
            )
        chosen.update(matches)
    return [n for n in named if n in chosen]


def collect_target_params(
    model: nn.Module, module_names: Sequence[str]
) -> tuple[list[TargetParam], dict[str, nn.Module]]:
    """Trainable parameters under the target modules, sorted by name, and their owners.

    Raises :class:`UnsupportedModel` for a parameter whose module type no layer handler
    covers, for tied parameters owned by two modules, and when the targets hold no
    trainable parameter.
    """
    named_modules = dict(model.named_modules())
    param_names = {id(p): n for n, p in model.named_parameters()}
    module_params = {id(p): p for p in model.parameters()}
    wanted: set[int] = set()
    for name in module_names:
        for p in named_modules[name].parameters():
            if p.requires_grad:
                wanted.add(id(p))
    if not wanted:
        raise UnsupportedModel(
            f"the target modules {list(module_names)} hold no trainable parameters "
            "(requires_grad=True)"
        )
    owners: dict[int, tuple[str, str]] = {}  # parameter -> (owning module, its name there)
    for mname, module in named_modules.items():
        for attr, p in module.named_parameters(recurse=False):
            if id(p) not in wanted:
                continue
            if id(p) in owners and owners[id(p)][0] != mname:
                raise UnsupportedModel(
                    f"parameter '{param_names[id(p)]}' is shared by modules '{owners[id(p)][0]}' "
                    f"and '{mname}' (tied weights): its uses cannot be told apart by module. "
                    "Leave one of the two modules out of the targets."
                )
            owners[id(p)] = (mname, attr)
    params = sorted(
        (
            TargetParam(param_names[pid], mname, attr, tuple(module_params[pid].shape))
            for pid, (mname, attr) in owners.items()
        ),
        key=lambda tp: tp.name,
    )
    owner_modules = {p.module_name: named_modules[p.module_name] for p in params}
    return params, owner_modules


def classify(
    owners: dict[str, nn.Module], params: Sequence[TargetParam]
) -> dict[str, HandlerClass]:
    """The layer handler class of each owning module, by registry lookup.

    Raises :class:`UnsupportedModel` naming the first parameter no handler covers.
    """
    by_module: dict[str, list[TargetParam]] = {}
    for p in params:
        by_module.setdefault(p.module_name, []).append(p)
    handlers: dict[str, HandlerClass] = {}
    for mname, ps in by_module.items():
        module = owners[mname]
        handler = handler_for(module, [p.attr for p in ps])
        if handler is None:
            p = ps[0]
            raise UnsupportedModel(
                f"target parameter '{p.name}' {p.shape} belongs to module '{mname}' of "
                f"type {type(module).__name__}, which cannot be sketched: supported are "
                f"{supported_description()}. Register one with "
                "opacus.grad_sample.register_grad_sampler, or leave the module out."
            )
        handlers[mname] = handler
    return handlers
