"""Parity task: predict the XOR of ``n_bits`` random bits at an ``=`` marker.

Vocabulary: ``0`` and ``1`` are bits, ``2`` is the answer marker. A sequence is
``b_1 ... b_n =`` and the target (token 0 or 1) is predicted at the last position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

__all__ = [
    "MARKER",
    "ParityData",
    "make_parity_dataset",
    "parity_accuracy",
    "parity_loss",
]

MARKER: int = 2
"""Token id of the ``=`` answer marker."""


@dataclass(eq=False)  # tensors have no boolean equality
class ParityData(Dataset[dict[str, torch.Tensor]]):
    """A parity data set: a map-style ``torch.utils.data.Dataset`` of dict items.

    Attributes:
        tokens: (N, n_bits + 1) int64 sequences, bits followed by the marker.
        targets: (N,) int64 parity of each sequence's bits.
    """

    tokens: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens[i], "target": self.targets[i]}


def make_parity_dataset(n: int, n_bits: int = 8, seed: int = 0) -> ParityData:
    """Generate ``n`` random parity examples of ``n_bits`` bits.

    Uses a local ``torch.Generator`` seeded with ``seed``, so the caller's global
    RNG state is untouched and equal seeds give identical data.
    """
    if n < 0 or n_bits < 1:
        raise ValueError(f"need n >= 0 and n_bits >= 1, got n={n}, n_bits={n_bits}")
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (n, n_bits), generator=gen, dtype=torch.int64)
    marker = torch.full((n, 1), MARKER, dtype=torch.int64)
    tokens = torch.cat([bits, marker], dim=1)
    targets = bits.sum(dim=1).remainder(2)
    return ParityData(tokens=tokens, targets=targets)


def parity_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], per_token: bool = False
) -> torch.Tensor:
    """Per-example cross-entropy at the marker position; returns shape (B,).

    This follows the tool's ``loss_fn(model, batch) -> (B,)`` convention. ``per_token=True``
    returns per-token losses (B, T) instead: the marker's loss at the last position and
    zeros elsewhere, so rows sum to the per-example loss (for ``analysis.query_tokens``).
    """
    logits = model(batch["tokens"])
    loss = F.cross_entropy(logits[:, -1, :], batch["target"], reduction="none")
    if not per_token:
        return loss
    # Only the answer position carries a loss; the bits before it are inputs, not targets.
    return F.pad(loss[:, None], (logits.shape[1] - 1, 0))


def parity_accuracy(model: nn.Module, data: ParityData, batch_size: int = 256) -> float:
    """Fraction of ``data`` whose parity the model predicts correctly (argmax at marker)."""
    if len(data) == 0:
        return float("nan")
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            tokens = data.tokens[start : start + batch_size].to(device)
            targets = data.targets[start : start + batch_size].to(device)
            pred = model(tokens)[:, -1, :].argmax(dim=-1)
            correct += int((pred == targets).sum().item())
    return correct / len(data)
