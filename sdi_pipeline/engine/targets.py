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

# Imported for its side effect: the built-in layer files register their handlers.
from sdi_pipeline.engine import layers as _builtin_layers  # noqa: F401
from sdi_pipeline.engine.registry import (
    HandlerClass,
    TargetParam,
    claims_subtree,
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
    """Every use of the trainable parameters under the target modules, and the modules.

    A parameter is used by the module that holds it, or by the nearest ancestor whose
    handler claims its subtree (``nn.MultiheadAttention``). A tied parameter held by
    several modules (input and output embeddings) has one use per module, wherever those
    modules are: each call's gradient is a part of the parameter's gradient. Uses are sorted
    by parameter name, then module. Raises :class:`UnsupportedModel` when the targets hold
    no trainable parameter.
    """
    named_modules = dict(model.named_modules())
    param_names = {id(p): n for n, p in model.named_parameters()}
    param_by_id = {id(p): p for p in model.parameters()}
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
    claimants = [n for n, m in named_modules.items() if claims_subtree(m)]

    def claimant_of(mname: str) -> str | None:
        inside = [c for c in claimants if not c or mname == c or mname.startswith(f"{c}.")]
        return min(inside, key=len) if inside else None

    uses: set[tuple[int, str, str]] = set()  # (parameter, using module, name there)
    for mname, module in named_modules.items():
        for attr, p in module.named_parameters(recurse=False):
            if id(p) not in wanted:
                continue
            owner = claimant_of(mname)
            if owner is None:
                uses.add((id(p), mname, attr))
            else:
                full = f"{mname}.{attr}" if mname else attr
                uses.add((id(p), owner, full[len(owner) + 1 :] if owner else full))
    params = sorted(
        (
            TargetParam(param_names[pid], mname, attr, tuple(param_by_id[pid].shape))
            for pid, mname, attr in uses
        ),
        key=lambda tp: (tp.name, tp.module_name),
    )
    owner_modules = {p.module_name: named_modules[p.module_name] for p in params}
    return params, owner_modules


def classify(
    owners: dict[str, nn.Module], params: Sequence[TargetParam]
) -> dict[str, HandlerClass]:
    """The layer handler class of each using module, by registry lookup.

    Raises :class:`UnsupportedModel` naming the first parameter no handler covers, or a
    tied parameter whose uses would be sketched by different maps.
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
                f"{supported_description()}. Register a layer handler for it "
                "(sdi_pipeline.engine.registry.register_layer), or leave the module out."
            )
        handlers[mname] = handler
    maps: dict[str, set[str]] = {}
    for p in params:
        maps.setdefault(p.name, set()).add(handlers[p.module_name].sketch_map(p.attr))
    mixed = sorted(name for name, kinds in maps.items() if len(kinds) > 1)
    if mixed:
        users = [f"'{p.module_name}'" for p in params if p.name == mixed[0]]
        raise UnsupportedModel(
            f"parameter '{mixed[0]}' is tied between modules {', '.join(users)} whose "
            "handlers sketch it differently (TensorSketch vs CountSketch), so their parts "
            "would not add up; leave one of them out of the targets or use exact mode"
        )
    return handlers


def lift_uncalled(
    params: Sequence[TargetParam],
    uncalled: set[str],
    called: set[str],
    read: set[str],
) -> tuple[list[TargetParam], dict[str, str]]:
    """Move the uses of modules that were never called to their nearest called ancestor.

    A parent that reads a child's parameter without calling the child (``F.conv1d(x,
    self.conv1d.weight)``) uses it in its own calls; the parameter is then known there by
    its path below the ancestor. Only parameters named in ``read`` (those the loss's graph
    reaches) move; unused ones stay, to be refused by name. Returns the new uses (sorted as
    :func:`collect_target_params` sorts them) and, per lifted parameter, the module it was
    lifted to. Modules with no called ancestor keep their uses.
    """
    lifted: dict[str, str] = {}
    out: list[TargetParam] = []
    for p in params:
        if p.module_name not in uncalled or p.name not in read:
            out.append(p)
            continue
        parts = p.module_name.split(".")
        ancestors = [".".join(parts[:k]) for k in range(len(parts) - 1, -1, -1)]
        holder = next((a for a in ancestors if a in called), None)
        if holder is None:
            out.append(p)
            continue
        full = f"{p.module_name}.{p.attr}"
        attr = full[len(holder) + 1 :] if holder else full
        out.append(TargetParam(p.name, holder, attr, p.shape))
        lifted[p.name] = holder
    return sorted(out, key=lambda tp: (tp.name, tp.module_name)), lifted
