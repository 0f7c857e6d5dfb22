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
that accepts the module. The registry imports no handler: importing
:mod:`sdi_pipeline.engine.layers` registers the built-in ones (:mod:`.targets` does).

Sketches of all parameters are summed into one m-vector. Each parameter has its own
independent hash, and every hash has zero-mean random signs, so the expected inner product
of two summed sketches has no cross-parameter terms: E<S(g), S(g')> = sum_p <g_p, g'_p> =
<g, g'>. The estimate stays unbiased; only its variance grows with the number of parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from sdi_pipeline.engine.hashing import CountSketchHash, make_count_sketch_hash
from sdi_pipeline.engine.kernels import Workspace, count_sketch_add
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.errors import UnsupportedModel


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


@dataclass
class Call:
    """One call of a module during a forward pass: its inputs (tensors detached).

    ``start``: when the call started, counting the starts of all observed calls of the
    forward pass. ``rows``: for a call on token-flattened rows -- an output of
    ``examples * rows`` rows, each example's rows contiguous, as MoE routers and experts
    take them -- the rows per example; None when the batch is on dim 0. ``output``: which
    of a tuple of outputs the gradient being handled is of (0 for a single tensor).
    """

    module_name: str
    use: int
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    start: int = 0
    rows: int | None = None
    examples: int = 0
    #: Which of the module's tuple of outputs the gradient being handled is of.
    output: int = 0

    def by_example(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` with the examples on dim 0: token-flattened (B*L, ...) rows as (B, L, ...)."""
        if self.rows is None or t.dim() == 0 or t.shape[0] != self.examples * self.rows:
            return t
        return t.reshape(self.examples, self.rows, *t.shape[1:])

    def input(self) -> torch.Tensor:
        """The call's main input: its first positional tensor, else its first tensor kwarg."""
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, torch.Tensor):
                return value
        raise UnsupportedModel(f"module '{self.module_name}' was called without a tensor input")

    def free(self) -> None:
        """Drop the inputs once the call's gradient is done."""
        self.args, self.kwargs = (), {}


# How a parameter's gradient is sketched: "tensor" is the TensorSketch of the weight matrix as
# stored (rows x cols, induced hash of a row and a column hash), "count" the CountSketch of the
# flattened gradient. Tied uses of one parameter must agree, so their sketches add up.
SketchMap = Literal["tensor", "count"]


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
    #: The sketch map of each parameter (by its name in the module); default "count".
    sketch_maps: ClassVar[dict[str, SketchMap]] = {}
    #: Whether the handler maps token-flattened rows (``Call.rows``) to examples itself;
    #: otherwise each row is taken as an example and the rows of each example are summed.
    flattened_rows: ClassVar[bool] = False
    #: Whether the handler takes the gradient of any of a tuple's tensor outputs
    #: (``Call.output``); otherwise only the first output may carry gradient.
    all_outputs: ClassVar[bool] = False

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

    @classmethod
    def sketch_map(cls, attr: str) -> SketchMap:
        return cls.sketch_maps.get(attr, "count")

    def on_forward(self, call: Call, output: torch.Tensor) -> None:
        """Called once per call in the forward pass, with the call's (batched) output."""

    def per_example(self, call: Call, grad: torch.Tensor) -> dict[str, torch.Tensor]:
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
        call: Call,
        grad: torch.Tensor,
        out: torch.Tensor,
        hashes: dict[str, CountSketchHash],
    ) -> None:
        """Add this call's per-example sketch into ``out`` (B, m)."""
        grads = self.per_example(call, grad)
        for p in self.params:  # by name: the float summation order is fixed
            count_sketch_add(out, grads[p.name].reshape(out.shape[0], -1).float(), hashes[p.name])

    def contribute(self, call: Call, grad: torch.Tensor, out: torch.Tensor) -> None:
        """Add this call's per-example contributions into ``out`` (B, width)."""
        if call.rows is not None and not self.flattened_rows:
            # Per-row contributions, then each example's rows summed: the gradient of a
            # parameter is the sum over the rows that used it.
            per_row = out.new_zeros(grad.shape[0], out.shape[1])
            self._contribute(call, grad, per_row)
            out += per_row.reshape(out.shape[0], call.rows, -1).sum(dim=1)
            return
        self._contribute(call, grad, out)

    def _contribute(self, call: Call, grad: torch.Tensor, out: torch.Tensor) -> None:
        if self.spec is not None:
            self.sketch(call, grad, out, self._hashes.on(grad.device))
            return
        for name, values in self.per_example(call, grad).items():
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
    # The module's forward uses its submodules' parameters without calling them (as
    # nn.MultiheadAttention does with out_proj): the handler owns its whole subtree.
    claims_subtree: bool = False


@dataclass(frozen=True)
class _Fallback:
    handler: HandlerClass
    accepts: Callable[[nn.Module], bool]
    describe: Callable[[], str]
    priority: int


# Keyed by type, or by "module.QualName" for types of optional packages (not imported here).
_LAYERS: dict[type[nn.Module] | str, _Registration] = {}
_FALLBACKS: list[_Fallback] = []


def register_layer(
    *module_types: type[nn.Module] | str, same_forward: bool = True, claims_subtree: bool = False
) -> Callable[[HandlerClass], HandlerClass]:
    """Class decorator: the handler computes the gradients of these module types.

    A type may be given as ``"package.module.ClassName"`` so that its package need not be
    installed. Subclasses of a registered type use its handler as long as they keep its
    ``forward`` (``same_forward=False`` also accepts overridden forwards).
    ``claims_subtree``: the module's forward uses its submodules' parameters directly, so
    all parameters under it are its handler's.
    """

    def decorate(handler: HandlerClass) -> HandlerClass:
        for t in module_types:
            _LAYERS[t] = _Registration(handler, same_forward, claims_subtree)
        return handler

    return decorate


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _registration(module: nn.Module) -> tuple[type, _Registration] | None:
    """The nearest registered base of the module's type, and its registration."""
    for base in type(module).__mro__:
        reg = _LAYERS.get(base) or _LAYERS.get(_qualified(base))
        if reg is not None:
            return base, reg
    return None


def claims_subtree(module: nn.Module) -> bool:
    """Whether the module's handler owns every parameter under the module."""
    found = _registration(module)
    return found is not None and found[1].claims_subtree


def register_fallback(
    accepts: Callable[[nn.Module], bool], describe: Callable[[], str], priority: int = 0
) -> Callable[[HandlerClass], HandlerClass]:
    """Class decorator: the handler takes any module ``accepts`` says yes to.

    Fallbacks are tried after the dedicated handlers, lowest ``priority`` first; ``describe``
    says in an error message which module types the fallback covers.
    """

    def decorate(handler: HandlerClass) -> HandlerClass:
        _FALLBACKS.append(_Fallback(handler, accepts, describe, priority))
        _FALLBACKS.sort(key=lambda f: f.priority)
        return handler

    return decorate


def handler_for(module: nn.Module, attrs: Sequence[str]) -> HandlerClass | None:
    """The handler class for ``module``'s parameters ``attrs``, or None if none fits."""

    def covers(handler: HandlerClass) -> bool:
        return handler.param_attrs is None or set(attrs) <= set(handler.param_attrs)

    found = _registration(module)
    if found is not None:
        base, reg = found
        # The nearest registered base decides; if its math does not hold, fall back.
        if (not reg.same_forward or type(module).forward is base.forward) and covers(reg.handler):
            return reg.handler
    for fallback in _FALLBACKS:
        if fallback.accepts(module) and covers(fallback.handler):
            return fallback.handler
    return None


def supported_description() -> str:
    """Which module types can be sketched, for error messages."""

    def name(t: type | str) -> str:
        if isinstance(t, str):
            return t
        return f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else _qualified(t)

    names = ", ".join(name(t) for t in _LAYERS)
    return " and ".join([names, *(f.describe() for f in _FALLBACKS)])
