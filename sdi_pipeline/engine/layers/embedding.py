"""``nn.Embedding``: weight by TensorSketch of (one-hot row) x (output gradient).

Example b's gradient is sum_t e_{id[b, t]} delta[b, t]^T; rows of ``padding_idx`` get none.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from sdi_pipeline.engine.hashing import CountSketchHash, make_count_sketch_hash
from sdi_pipeline.engine.kernels import embedding_weight
from sdi_pipeline.engine.registry import LayerHandler, SketchMap, register_layer, tokens
from sdi_pipeline.engine.spec import SketchSpec


@register_layer(nn.Embedding)
class EmbeddingHandler(LayerHandler):
    """Exact: a per-example (vocab x dim) scatter. Sketch: a signed shift per token, no FFT."""

    param_attrs = ("weight",)
    sketch_maps: ClassVar[dict[str, SketchMap]] = {"weight": "tensor"}

    @property
    def padding_idx(self) -> int | None:
        pad = getattr(self.module, "padding_idx", None)
        return None if pad is None else int(pad)

    def per_example(self, call, grad):
        w = self.by_attr["weight"]
        vocab, dim = w.shape
        ids = call.input().reshape(grad.shape[0], -1)
        delta = tokens(grad, dim)
        b, t = ids.shape
        rows = (torch.arange(b, device=ids.device)[:, None] * vocab + ids).reshape(-1)
        mask = torch.ones_like(rows, dtype=delta.dtype)
        if self.padding_idx is not None:
            mask = (ids.reshape(-1) != self.padding_idx).to(delta.dtype)
        full = delta.new_zeros(b * vocab, dim)
        full.index_add_(0, rows, delta.reshape(b * t, dim) * mask[:, None])
        return {w.name: full.reshape(b, vocab, dim)}

    def hash_tables(self, spec: SketchSpec) -> dict[str, CountSketchHash]:
        w = self.by_attr["weight"]
        vocab, dim = w.shape
        return {
            "row": make_count_sketch_hash(spec.seed, w.name, "row", vocab, spec.m),
            "col": make_count_sketch_hash(spec.seed, w.name, "col", dim, spec.m),
        }

    def sketch(self, call, grad, out, hashes) -> None:
        dim = self.by_attr["weight"].shape[1]
        ids = call.input().reshape(grad.shape[0], -1)
        delta = tokens(grad, dim)
        embedding_weight(ids, delta, hashes["row"], hashes["col"], self.padding_idx, out)
