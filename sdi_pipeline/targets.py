"""Resolve the user's target modules and classify the parameters they hold.

Targets are module names or glob patterns over ``model.named_modules()`` (or the module
objects themselves). Every trainable parameter under a target is analysed; each is owned by
exactly one module, whose calls the capture hooks observe.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from sdi_pipeline.errors import SDIError

ParamRole = Literal["linear_weight", "linear_bias", "embedding_weight", "grad_sampler"]


@dataclass(frozen=True)
class TargetParam:
    """One analysed parameter: its full name, its owning module and how it is sketched."""

    name: str
    module_name: str
    role: ParamRole
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


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
        raise SDIError("no target modules given: name the looped block (e.g. targets=['block'])")
    named = dict(model.named_modules())
    by_id = {id(m): n for n, m in named.items()}
    chosen: set[str] = set()
    for target in targets:
        if isinstance(target, nn.Module):
            if id(target) not in by_id:
                raise SDIError(
                    f"target module {type(target).__name__} is not a submodule of the model"
                )
            chosen.add(by_id[id(target)])
            continue
        matches = [n for n in named if n == target or fnmatch.fnmatchcase(n, target)]
        if not matches:
            near = difflib.get_close_matches(target, [n for n in named if n], n=5, cutoff=0.4)
            hint = f" Nearest module names: {', '.join(near)}." if near else ""
            raise SDIError(f"target pattern '{target}' matches no module of the model.{hint}")
        chosen.update(matches)
    return [n for n in named if n in chosen]


def _grad_sampler_types() -> dict[type, Any]:
    # Opacus is slow to import; only models with such modules in their targets pay for it.
    from opacus.grad_sample import GradSampleModule

    return dict(GradSampleModule.GRAD_SAMPLERS)


def _plain(module: nn.Module, base: type[nn.Module]) -> bool:
    """An instance of ``base`` whose forward is ``base``'s own (so its gradient math holds)."""
    return isinstance(module, base) and type(module).forward is base.forward


def collect_target_params(
    model: nn.Module, module_names: Sequence[str]
) -> tuple[list[TargetParam], dict[str, nn.Module]]:
    """Trainable parameters under the target modules, sorted by name, and their owners.

    Raises :class:`SDIError` for a parameter whose module type cannot be sketched, for tied
    parameters owned by two modules, and when the targets hold no trainable parameter.
    """
    named_modules = dict(model.named_modules())
    param_names = {id(p): n for n, p in model.named_parameters()}
    wanted: set[int] = set()
    for name in module_names:
        for p in named_modules[name].parameters():
            if p.requires_grad:
                wanted.add(id(p))
    if not wanted:
        raise SDIError(
            f"the target modules {list(module_names)} hold no trainable parameters "
            "(requires_grad=True)"
        )
    owners: dict[int, str] = {}
    for mname, module in named_modules.items():
        for p in module.parameters(recurse=False):
            if id(p) not in wanted:
                continue
            if id(p) in owners and owners[id(p)] != mname:
                raise SDIError(
                    f"parameter '{param_names[id(p)]}' is shared by modules '{owners[id(p)]}' "
                    f"and '{mname}' (tied weights): its uses cannot be told apart by module. "
                    "Leave one of the two modules out of the targets."
                )
            owners[id(p)] = mname
    samplers: dict[type, Any] | None = None
    params: list[TargetParam] = []
    owner_modules: dict[str, nn.Module] = {}
    for pid, mname in owners.items():
        module = named_modules[mname]
        p = next(q for q in module.parameters(recurse=False) if id(q) == pid)
        full = param_names[pid]
        role: ParamRole
        if _plain(module, nn.Linear) and p is module.weight:
            role = "linear_weight"
        elif _plain(module, nn.Linear) and p is module.bias:
            role = "linear_bias"
        elif _plain(module, nn.Embedding) and p is module.weight:
            role = "embedding_weight"
        else:
            samplers = _grad_sampler_types() if samplers is None else samplers
            if type(module) not in samplers:
                raise SDIError(
                    f"target parameter '{full}' {tuple(p.shape)} belongs to module '{mname}' of "
                    f"type {type(module).__name__}, which cannot be sketched: supported are "
                    "nn.Linear, nn.Embedding and module types with an Opacus grad sampler "
                    f"({', '.join(sorted(t.__name__ for t in samplers))}). Register one with "
                    "opacus.grad_sample.register_grad_sampler, or leave the module out."
                )
            role = "grad_sampler"
        params.append(TargetParam(full, mname, role, tuple(p.shape)))
        owner_modules[mname] = module
    params.sort(key=lambda tp: tp.name)
    return params, owner_modules
