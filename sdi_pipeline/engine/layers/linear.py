"""``nn.Linear``: weight by TensorSketch (FFT or dense kernel), bias analytically.

For one call with inputs x (B, T, d_in) and output gradients delta (B, T, d_out), example
b's weight gradient is sum_t delta[b, t] x[b, t]^T and its bias gradient sum_t delta[b, t].
A call on token-flattened rows (B*L, d_in), as MoE routers take them, is viewed as
(B, L, d_in): the sum runs over each example's rows.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from sdi_pipeline.engine.calibration import kernel_costs
from sdi_pipeline.engine.hashing import CountSketchHash, induced_buckets, make_count_sketch_hash
from sdi_pipeline.engine.kernels import (
    choose_linear_kernel,
    count_sketch_add,
    linear_weight_dense,
    linear_weight_fft,
)
from sdi_pipeline.engine.registry import LayerHandler, SketchMap, register_layer, tokens
from sdi_pipeline.engine.spec import SketchSpec


@register_layer(nn.Linear)
class LinearHandler(LayerHandler):
    """Exact: one batched matmul per call. Sketch: TensorSketch, never forming d_out x d_in
    per example unless the dense kernel is the cheaper way to the same sketch."""

    param_attrs = ("weight", "bias")
    sketch_maps: ClassVar[dict[str, SketchMap]] = {"weight": "tensor"}
    flattened_rows = True

    def __init__(self, module, params, spec, offsets, workspace=None) -> None:
        super().__init__(module, params, spec, offsets, workspace)
        # Built lazily, once per device: only the dense kernel needs the d_out*d_in table.
        self._induced: dict[torch.device, torch.Tensor] = {}

    def _in_features(self, weight_shape: tuple[int, ...]) -> int:
        return weight_shape[1]

    def _rows_cols(self, delta: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors whose outer products sum to the weight's gradient, as it is stored
        (rows x cols): (delta, x) for nn.Linear's (d_out, d_in) weight."""
        return delta, x

    def per_example(self, call, grad):
        w, b = self.by_attr.get("weight"), self.by_attr.get("bias")
        delta = tokens(call.by_example(grad), grad.shape[-1])
        out: dict[str, torch.Tensor] = {}
        if w is not None:
            x = tokens(call.by_example(call.input()), self._in_features(w.shape))
            rows, cols = self._rows_cols(delta, x)
            out[w.name] = torch.bmm(rows.transpose(1, 2), cols)
        if b is not None:
            out[b.name] = delta.sum(dim=1)
        return out

    def hash_tables(self, spec: SketchSpec) -> dict[str, CountSketchHash]:
        tables: dict[str, CountSketchHash] = {}
        if w := self.by_attr.get("weight"):
            n_rows, n_cols = w.shape
            tables["row"] = make_count_sketch_hash(spec.seed, w.name, "row", n_rows, spec.m)
            tables["col"] = make_count_sketch_hash(spec.seed, w.name, "col", n_cols, spec.m)
        if b := self.by_attr.get("bias"):
            tables["vec"] = make_count_sketch_hash(spec.seed, b.name, "vec", b.numel, spec.m)
        return tables

    def _induced_on(self, device: torch.device, h: dict[str, CountSketchHash]) -> torch.Tensor:
        if device not in self._induced:
            self._induced[device] = induced_buckets(h["row"], h["col"])
        return self._induced[device]

    def sketch(self, call, grad, out, hashes) -> None:
        assert self.spec is not None
        w, b = self.by_attr.get("weight"), self.by_attr.get("bias")
        delta = tokens(call.by_example(grad), grad.shape[-1])
        if w is not None:
            x = tokens(call.by_example(call.input()), self._in_features(w.shape))
            rows, cols = self._rows_cols(delta, x)
            kernel = self.spec.kernel
            if kernel == "auto":
                shape = (rows.shape[1], rows.shape[2], cols.shape[2], self.spec.m)
                kernel = choose_linear_kernel(*shape, kernel_costs(grad.device))
            if kernel == "dense":
                induced = self._induced_on(grad.device, hashes)
                linear_weight_dense(
                    rows, cols, hashes["row"], hashes["col"], induced, out, self.workspace
                )
            else:
                out += linear_weight_fft(rows, cols, hashes["row"], hashes["col"])
        if b is not None:
            count_sketch_add(out, delta.sum(dim=1), hashes["vec"])
