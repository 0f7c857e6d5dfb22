"""Layer handlers: how one module type's per-example gradients are computed and sketched.

Given the inputs a module saw in one call and the gradient of the summed per-example loss
with respect to that call's output, a handler adds each example's gradient of the module's
target parameters *for that call* into a (B, width) row block: sketched into m buckets
(sketch mode) or written out exactly at the parameter's offset (exact mode, small models).

Each layer type is one file under :mod:`sdi_pipeline.engine.layers` holding its exact
per-example gradient (:meth:`LayerHandler.per_example`) and, where a faster path exists, its
sketch (:meth:`LayerHandler.sketch`) side by side, registered for its module type with
:func:`register_layer`. Modules are classified by :func:`handler_for`: the nearest registered
base class in the module type's MRO, else the first fallback (:func:`register_fallback`)
that accepts the module.

Sketches of all parameters are summed into one m-vector. Each parameter has its own
independent hash, and every hash has zero-mean random signs, so the expected inner product
of two summed sketches has no cross-parameter terms: E<S(g), S(g')> = sum_p <g_p, g'_p> =
<g, g'>. The estimate stays unbiased; only its variance grows with the number of parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sdi_pipeline.engine.hashing import CountSketchHash, make_count_sketch_hash
from sdi_pipeline.engine.kernels import Workspace, count_sketch
from sdi_pipeline.engine.spec import SketchSpec


@dataclass(frozen=True)
class TargetParam:
    """One analysed parameter: its full name, its owning module and its name there."""

    name: str
    module_name: str
    attr: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def tokens(t: torch.Tensor, width: int) -> torch.Tensor:
    """View a batch-first activation (B, ..., width) as (B, tokens, width) in float32."""
    return t.reshape(t.shape[0], -1, width).float()


class HashTables:
    """Hash tables of one handler, made on the CPU once and cached per device."""

    def __init__(self, tables: dict[str, CountSketchHash]) -> None:
        self._cpu = tables
        self._by_device: dict[torch.device, dict[str, CountSketchHash]] = {}

    def on(self, device: torch.device) -> dict[str, CountSketchHash]:
        if device not in self._by_device:
            self._by_device[device] = {k: h.to(device) for k, h in self._cpu.items()}
        return self._by_device[device]


class LayerHandler:
    """Adds one module call's per-example contributions into a (B, width) block.

    Subclasses implement :meth:`per_example` (the exact per-example gradient of each target
    parameter for one call). The default sketch CountSketches those gradients, one hash per
    parameter; layer types with a cheaper sketch (TensorSketch of a Linear weight) override
    :meth:`hash_tables` and :meth:`sketch`.

    ``params`` are the module's target parameters sorted by name; ``offsets`` their column
    offsets in exact mode (``spec is None``).
    """

    #: Names of the module's own parameters this handler knows the gradient of; ``None``:
    #: any parameter.
    param_attrs: tuple[str, ...] | None = None

    def __init__(
        self,
        module: nn.Module,
        params: Sequence[TargetParam],
        spec: SketchSpec | None,
        offsets: dict[str, int] | None,
        workspace: Workspace | None = None,
    ) -> None:
        self.module = module
        self.params = sorted(params, key=lambda p: p.name)
        self.by_attr = {p.attr: p for p in self.params}
        self.spec = spec
        self.offsets = offsets or {}
        self.workspace = workspace or Workspace()
        self._hashes = HashTables(self.hash_tables(spec) if spec is not None else {})

    def per_example(
        self, activations: list[torch.Tensor], grad: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Each target parameter's per-example gradient for this call: name -> (B, *shape)."""
        raise NotImplementedError

    def hash_tables(self, spec: SketchSpec) -> dict[str, CountSketchHash]:
        """The CountSketch of every target parameter, keyed by its full name."""
        return {
            p.name: make_count_sketch_hash(spec.seed, p.name, "vec", p.numel, spec.m)
            for p in self.params
        }

    def sketch(
        self,
        activations: list[torch.Tensor],
        grad: torch.Tensor,
        out: torch.Tensor,
        hashes: dict[str, CountSketchHash],
    ) -> None:
        """Add this call's per-example sketch into ``out`` (B, m)."""
        grads = self.per_example(activations, grad)
        for p in self.params:  # by name: the float summation order is fixed
            out += count_sketch(grads[p.name].reshape(grad.shape[0], -1).float(), hashes[p.name])

    def contribute(
        self, activations: list[torch.Tensor], grad: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Add this call's per-example contributions into ``out`` (B, width)."""
        if self.spec is not None:
            self.sketch(activations, grad, out, self._hashes.on(grad.device))
            return
        for name, values in self.per_example(activations, grad).items():
            off = self.offsets[name]
            numel = values[0].numel()
            out[:, off : off + numel] += values.reshape(values.shape[0], -1)


HandlerClass = type[LayerHandler]


@dataclass(frozen=True)
class _Registration:
    handler: HandlerClass
    # The gradient math holds for the base class's forward; a subclass that overrides it
    # is not covered by the registration.
    same_forward: bool


@dataclass(frozen=True)
class _Fallback:
    handler: HandlerClass
    accepts: Callable[[nn.Module], bool]
    describe: Callable[[], str]


_LAYERS: dict[type[nn.Module], _Registration] = {}
_FALLBACKS: list[_Fallback] = []


def register_layer(
    *module_types: type[nn.Module], same_forward: bool = True
) -> Callable[[HandlerClass], HandlerClass]:
    """Class decorator: the handler computes the gradients of these module types.

    Subclasses of a registered type use its handler as long as they keep its ``forward``
    (``same_forward=False`` also accepts overridden forwards).
    """

    def decorate(handler: HandlerClass) -> HandlerClass:
        for t in module_types:
            _LAYERS[t] = _Registration(handler, same_forward)
        return handler

    return decorate


def register_fallback(
    accepts: Callable[[nn.Module], bool], describe: Callable[[], str]
) -> Callable[[HandlerClass], HandlerClass]:
    """Class decorator: the handler takes any module ``accepts`` says yes to.

    Fallbacks are tried in registration order after the dedicated handlers; ``describe``
    says in an error message which module types the fallback covers.
    """

    def decorate(handler: HandlerClass) -> HandlerClass:
        _FALLBACKS.append(_Fallback(handler, accepts, describe))
        return handler

    return decorate


def _load_builtin_layers() -> None:
    # The built-in layer files register themselves on import.
    import sdi_pipeline.engine.layers  # noqa: F401


def handler_for(module: nn.Module, attrs: Sequence[str]) -> HandlerClass | None:
    """The handler class for ``module``'s parameters ``attrs``, or None if none fits."""
    _load_builtin_layers()

    def covers(handler: HandlerClass) -> bool:
        return handler.param_attrs is None or set(attrs) <= set(handler.param_attrs)

    for base in type(module).__mro__:
        reg = _LAYERS.get(base)
        if reg is None:
            continue
        if (not reg.same_forward or type(module).forward is base.forward) and covers(reg.handler):
            return reg.handler
        break  # the nearest registered base decides; its math does not hold here
    for fallback in _FALLBACKS:
        if fallback.accepts(module) and covers(fallback.handler):
            return fallback.handler
    return None


def supported_description() -> str:
    """Which module types can be sketched, for error messages."""
    _load_builtin_layers()
    names = ", ".join(f"nn.{t.__name__}" for t in _LAYERS)
    return " and ".join([names, *(f.describe() for f in _FALLBACKS)])
