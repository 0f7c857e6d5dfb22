"""Per-example gradient contributions of one call of one target module.

Given the inputs a module saw in one call and the gradient of the summed per-example loss
with respect to that call's output, a handler adds each example's gradient of the module's
target parameters *for that call* into a (B, width) row block: sketched into m buckets
(sketch mode) or written out exactly at the parameter's offset (exact mode, small models).

Sketches of all parameters are summed into one m-vector. Each parameter has its own
independent hash, and every hash has zero-mean random signs, so the expected inner product
of two summed sketches has no cross-parameter terms: E<S(g), S(g')> = sum_p <g_p, g'_p> =
<g, g'>. The estimate stays unbiased; only its variance grows with the number of parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sdi_pipeline.errors import SDIError
from sdi_pipeline.sketch.hashing import CountSketchHash, induced_buckets, make_count_sketch_hash
from sdi_pipeline.sketch.kernels import (
    Workspace,
    choose_linear_kernel,
    count_sketch,
    embedding_weight,
    linear_weight_dense,
    linear_weight_fft,
)
from sdi_pipeline.sketch.spec import SketchSpec
from sdi_pipeline.targets import TargetParam


def _tokens(t: torch.Tensor, width: int) -> torch.Tensor:
    """View a batch-first activation (B, ..., width) as (B, tokens, width) in float32."""
    return t.reshape(t.shape[0], -1, width).float()


class _Hashes:
    """Hash tables of one handler, made on the CPU once and cached per device."""

    def __init__(self, tables: dict[str, CountSketchHash]) -> None:
        self._cpu = tables
        self._by_device: dict[torch.device, dict[str, CountSketchHash]] = {}

    def on(self, device: torch.device) -> dict[str, CountSketchHash]:
        if device not in self._by_device:
            self._by_device[device] = {k: h.to(device) for k, h in self._cpu.items()}
        return self._by_device[device]


class ModuleHandler:
    """Adds one module call's per-example contributions into a (B, width) block."""

    def __init__(
        self,
        module: nn.Module,
        params: Sequence[TargetParam],
        spec: SketchSpec | None,
        offsets: dict[str, int] | None,
        workspace: Workspace | None = None,
    ) -> None:
        self.module = module
        self.params = {p.role: p for p in params}
        self.spec = spec
        self.offsets = offsets or {}
        self.workspace = workspace or Workspace()

    def contribute(
        self, activations: list[torch.Tensor], grad: torch.Tensor, out: torch.Tensor
    ) -> None:
        raise NotImplementedError

    def _exact_add(self, out: torch.Tensor, p: TargetParam, values: torch.Tensor) -> None:
        off = self.offsets[p.name]
        out[:, off : off + p.numel] += values.reshape(values.shape[0], -1)


class LinearHandler(ModuleHandler):
    """``nn.Linear``: weight by TensorSketch (FFT or dense kernel), bias analytically."""

    def __init__(self, module, params, spec, offsets, workspace=None) -> None:
        super().__init__(module, params, spec, offsets, workspace)
        tables: dict[str, CountSketchHash] = {}
        if spec is not None:
            if w := self.params.get("linear_weight"):
                d_out, d_in = w.shape
                tables["row"] = make_count_sketch_hash(spec.seed, w.name, "row", d_out, spec.m)
                tables["col"] = make_count_sketch_hash(spec.seed, w.name, "col", d_in, spec.m)
            if b := self.params.get("linear_bias"):
                tables["vec"] = make_count_sketch_hash(spec.seed, b.name, "vec", b.numel, spec.m)
        self._hashes = _Hashes(tables)
        self._induced: dict[torch.device, torch.Tensor] = {}

    def _induced_on(self, device: torch.device, h: dict[str, CountSketchHash]) -> torch.Tensor:
        # Built lazily: only the dense kernel needs the (d_out * d_in) table.
        if device not in self._induced:
            self._induced[device] = induced_buckets(h["row"], h["col"])
        return self._induced[device]

    def contribute(self, activations, grad, out) -> None:
        w, b = self.params.get("linear_weight"), self.params.get("linear_bias")
        d_out = grad.shape[-1]
        delta = _tokens(grad, d_out)
        if self.spec is None:
            if w is not None:
                x = _tokens(activations[0], w.shape[1])
                self._exact_add(out, w, torch.bmm(delta.transpose(1, 2), x))
            if b is not None:
                self._exact_add(out, b, delta.sum(dim=1))
            return
        h = self._hashes.on(grad.device)
        if w is not None:
            x = _tokens(activations[0], w.shape[1])
            kernel = self.spec.kernel
            if kernel == "auto":
                kernel = choose_linear_kernel(delta.shape[1], d_out, x.shape[2], self.spec.m)
            if kernel == "dense":
                induced = self._induced_on(grad.device, h)
                linear_weight_dense(delta, x, h["row"], h["col"], induced, out, self.workspace)
            else:
                out += linear_weight_fft(delta, x, h["row"], h["col"])
        if b is not None:
            out += count_sketch(delta.sum(dim=1), h["vec"])


class EmbeddingHandler(ModuleHandler):
    """``nn.Embedding``: weight by TensorSketch of (one-hot row) x (output gradient)."""

    def __init__(self, module, params, spec, offsets, workspace=None) -> None:
        super().__init__(module, params, spec, offsets, workspace)
        tables: dict[str, CountSketchHash] = {}
        w = self.params["embedding_weight"]
        if spec is not None:
            vocab, dim = w.shape
            tables["row"] = make_count_sketch_hash(spec.seed, w.name, "row", vocab, spec.m)
            tables["col"] = make_count_sketch_hash(spec.seed, w.name, "col", dim, spec.m)
        self._hashes = _Hashes(tables)
        pad = getattr(module, "padding_idx", None)
        self.padding_idx: int | None = None if pad is None else int(pad)

    def contribute(self, activations, grad, out) -> None:
        w = self.params["embedding_weight"]
        vocab, dim = w.shape
        ids = activations[0].reshape(grad.shape[0], -1)
        delta = _tokens(grad, dim)
        if self.spec is None:
            b, t = ids.shape
            rows = (torch.arange(b, device=ids.device)[:, None] * vocab + ids).reshape(-1)
            mask = torch.ones_like(rows, dtype=delta.dtype)
            if self.padding_idx is not None:
                mask = (ids.reshape(-1) != self.padding_idx).to(delta.dtype)
            full = delta.new_zeros(b * vocab, dim)
            full.index_add_(0, rows, delta.reshape(b * t, dim) * mask[:, None])
            self._exact_add(out, w, full.reshape(b, vocab * dim))
            return
        h = self._hashes.on(grad.device)
        out += embedding_weight(ids, delta, h["row"], h["col"], self.padding_idx)


class GradSamplerHandler(ModuleHandler):
    """Any module type with an Opacus grad sampler (LayerNorm, RMSNorm, ...): CountSketch."""

    def __init__(self, module, params, spec, offsets, workspace=None) -> None:
        super().__init__(module, params, spec, offsets, workspace)
        from opacus.grad_sample import GradSampleModule

        self._sampler: Any = GradSampleModule.GRAD_SAMPLERS[type(module)]
        prefix = f"{params[0].module_name}." if params[0].module_name else ""
        by_name = {tp.name: tp for tp in params}
        # Sorted by name so the float summation order does not follow registration order.
        self._own = sorted(
            (
                (p, by_name[prefix + n])
                for n, p in module.named_parameters(recurse=False)
                if prefix + n in by_name
            ),
            key=lambda pair: pair[1].name,
        )
        tables: dict[str, CountSketchHash] = {}
        if spec is not None:
            for tp in params:
                tables[tp.name] = make_count_sketch_hash(
                    spec.seed, tp.name, "vec", tp.numel, spec.m
                )
        self._hashes = _Hashes(tables)

    def contribute(self, activations, grad, out) -> None:
        # Opacus samplers skip parameters with requires_grad=False, and the capture freezes
        # all parameters so that backward computes no weight gradients: unfreeze ours here.
        saved = [p.requires_grad for p, _ in self._own]
        for p, _ in self._own:
            p.requires_grad_(True)
        try:
            samples = self._sampler(self.module, activations, grad)
        finally:
            for (p, _), flag in zip(self._own, saved, strict=True):
                p.requires_grad_(flag)
        h = self._hashes.on(grad.device) if self.spec is not None else {}
        for p, tp in self._own:
            flat = samples[p].reshape(grad.shape[0], -1).float()
            if self.spec is None:
                self._exact_add(out, tp, flat)
            else:
                out += count_sketch(flat, h[tp.name])


def make_handler(
    module: nn.Module,
    params: Sequence[TargetParam],
    spec: SketchSpec | None,
    offsets: dict[str, int] | None,
    workspace: Workspace,
) -> ModuleHandler:
    """The handler for a module's target parameters (all share one owning module)."""
    roles = {p.role for p in params}
    if roles <= {"linear_weight", "linear_bias"}:
        return LinearHandler(module, params, spec, offsets, workspace)
    if roles == {"embedding_weight"}:
        return EmbeddingHandler(module, params, spec, offsets, workspace)
    if roles == {"grad_sampler"}:
        return GradSamplerHandler(module, params, spec, offsets, workspace)
    raise SDIError(f"internal: inconsistent parameter roles {sorted(roles)} for one module")
