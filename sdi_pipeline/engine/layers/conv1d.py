"""Hugging Face ``Conv1D`` (GPT-2's attention and MLP projections): a transposed Linear.

``y = x @ W + b`` with W stored as (d_in, d_out), so example b's weight gradient is
sum_t x[b, t] delta[b, t]^T: the Linear TensorSketch with the factors' roles swapped. Keyed
by name, so ``transformers`` is not imported unless a model uses it.
"""

from __future__ import annotations

import torch

from sdi_pipeline.engine.layers.linear import LinearHandler
from sdi_pipeline.engine.registry import register_layer


@register_layer("transformers.pytorch_utils.Conv1D")
class Conv1DHandler(LinearHandler):
    """Same kernels as nn.Linear, on the (d_in, d_out) weight."""

    def _in_features(self, weight_shape: tuple[int, ...]) -> int:
        return weight_shape[0]

    def _rows_cols(self, delta: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, delta
