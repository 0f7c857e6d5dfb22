"""Looped LM shapes from the field, small and self-contained (no ``transformers``).

Each takes token ids (B, T) and returns next-token logits (B, T, vocab), like the toy model:

- :class:`GatedLoop`: a run of ``n_layers`` layers applied for ``n_loops`` passes; from pass
  2 on, each layer's gate mixes in that layer's output of the previous pass (the gates run
  in passes 2..P only, first in their layer). Each layer mixes tokens with a causal short
  convolution that calls ``F.conv1d(x, self.conv1d.weight, ...)`` without calling
  ``self.conv1d``.
- :class:`LoopedMoE`: all layers looped; each layer is a top-k mixture of experts on
  token-flattened rows (B*L, d): a Linear router and fused experts with 3-D weights. After
  every step a shared norm and an exit gate; the output mixes the steps by their exit
  probabilities.
- :class:`RecurrentDepth`: a prelude, a block of ``n_layers`` layers applied ``n_loops``
  times with the embedded input re-injected through an adapter each step, and a coda; the
  initial state is drawn from a generator seeded with ``state_seed`` (``None``: the global
  RNG, a forward that is not deterministic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PARITY_VOCAB = 3


def _causal_mean(h: torch.Tensor) -> torch.Tensor:
    """Mean of each position's prefix: parameter-free token mixing."""
    counts = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)[None, :, None]
    return h.cumsum(dim=1) / counts


class ShortConv(nn.Module):
    """Depthwise causal convolution over the sequence; reads ``conv1d.weight`` itself."""

    def __init__(self, d_model: int, kernel: int = 3) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv1d = nn.Conv1d(d_model, d_model, kernel, groups=d_model, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = F.pad(h.transpose(1, 2), (self.kernel - 1, 0))
        return F.conv1d(x, self.conv1d.weight, groups=h.shape[-1]).transpose(1, 2)


class GatedConvLayer(nn.Module):
    """Pre-norm layer: a message gate (given a message), a short convolution, an MLP."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.gate = MessageGate(d_model)
        self.norm = nn.LayerNorm(d_model)
        self.mixer = ShortConv(d_model)
        self.fc1 = nn.Linear(d_model, 2 * d_model)
        self.fc2 = nn.Linear(2 * d_model, d_model)

    def forward(self, h: torch.Tensor, message: torch.Tensor | None = None) -> torch.Tensor:
        if message is not None:
            h = self.gate(h, message)
        h = h + self.mixer(self.norm(h))
        return h + self.fc2(torch.tanh(self.fc1(h)))


class MessageGate(nn.Module):
    """``h + sigmoid(W [h; m]) * m``: mixes a message from the previous pass into ``h``."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * d_model, d_model)

    def forward(self, h: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
        return h + torch.sigmoid(self.proj(torch.cat([h, message], dim=-1))) * message


class GatedLoop(nn.Module):
    """``n_layers`` layers for ``n_loops`` passes, gated messages from the previous pass."""

    def __init__(
        self,
        vocab_size: int = PARITY_VOCAB,
        d_model: int = 16,
        n_layers: int = 2,
        n_loops: int = 3,
        max_len: int = 32,
    ) -> None:
        super().__init__()
        self.n_loops = n_loops
        self.embed = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(GatedConvLayer(d_model) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        previous: list[torch.Tensor] = []
        for p in range(self.n_loops):
            outputs = []
            for i, layer in enumerate(self.layers):
                h = layer(h, previous[i] if p > 0 else None)
                outputs.append(h)
            previous = outputs
        return self.head(self.norm(h))


class FusedExperts(nn.Module):
    """Top-k experts with 3-D weights on token-flattened rows, as fused MoE kernels hold
    them: ``forward(rows (N, d), indices (N, k), weights (N, k))``."""

    def __init__(self, d_model: int, n_experts: int, d_hidden: int) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(n_experts, d_hidden, d_model) / d_model**0.5)
        self.down = nn.Parameter(torch.randn(n_experts, d_model, d_hidden) / d_hidden**0.5)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
        up = torch.einsum("nd,nkhd->nkh", x, self.up[indices])
        out = torch.einsum("nkh,nkdh->nkd", torch.tanh(up), self.down[indices])
        return (out * weights[..., None]).sum(dim=1)


class MoELayer(nn.Module):
    """Router and experts on (B*L, d) rows; causal mean token mixing before them."""

    def __init__(self, d_model: int, n_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.top_k = top_k
        self.norm = nn.LayerNorm(d_model)
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = FusedExperts(d_model, n_experts, 2 * d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        rows = self.norm(_causal_mean(h)).reshape(b * t, d)
        scores = torch.softmax(self.router(rows), dim=-1)
        weights, indices = scores.topk(self.top_k, dim=-1)
        return h + self.experts(rows, indices, weights).reshape(b, t, d)


class LoopedMoE(nn.Module):
    """All ``n_layers`` MoE layers looped ``n_loops`` times; after every step a shared norm
    and an exit gate whose probabilities weight the steps' outputs."""

    def __init__(
        self,
        vocab_size: int = PARITY_VOCAB,
        d_model: int = 16,
        n_layers: int = 2,
        n_loops: int = 3,
        max_len: int = 32,
    ) -> None:
        super().__init__()
        self.n_loops = n_loops
        self.embed = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(MoELayer(d_model) for _ in range(n_layers))
        self.step_norm = nn.LayerNorm(d_model)
        self.exit_gate = nn.Linear(d_model, 1)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        states, exits = [], []
        for _ in range(self.n_loops):
            for layer in self.layers:
                h = layer(h)
            state = self.step_norm(h)
            states.append(state)
            exits.append(self.exit_gate(state))
        weights = torch.softmax(torch.cat(exits, dim=-1), dim=-1)  # (B, T, steps)
        mixed = (torch.stack(states, dim=-1) * weights[:, :, None]).sum(dim=-1)
        return self.head(mixed)


class MLPLayer(nn.Module):
    """Pre-norm MLP with causal mean token mixing."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 2 * d_model)
        self.fc2 = nn.Linear(2 * d_model, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(torch.tanh(self.fc1(self.norm(_causal_mean(h)))))


class RecurrentDepth(nn.Module):
    """Prelude, a block of ``n_layers`` applied ``n_loops`` times (the embedded input
    re-injected through ``adapter`` each step), coda; the initial state is random."""

    def __init__(
        self,
        vocab_size: int = PARITY_VOCAB,
        d_model: int = 16,
        n_layers: int = 2,
        n_loops: int = 3,
        max_len: int = 32,
        state_seed: int | None = 0,
    ) -> None:
        super().__init__()
        self.n_loops = n_loops
        self.state_seed = state_seed
        self.embed = nn.Embedding(vocab_size, d_model)
        self.prelude = MLPLayer(d_model)
        self.adapter = nn.Linear(2 * d_model, d_model)
        self.block = nn.ModuleList(MLPLayer(d_model) for _ in range(n_layers))
        self.coda = MLPLayer(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def initial_state(self, like: torch.Tensor) -> torch.Tensor:
        # Drawn per example position from its own seeded stream: the same for an example
        # alone and in a batch (a batch-wide draw would couple examples).
        if self.state_seed is None:
            return torch.randn_like(like)
        gen = torch.Generator(device="cpu").manual_seed(self.state_seed)
        one = torch.randn(like.shape[1:], generator=gen).to(like)
        return one.expand_as(like)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.prelude(self.embed(tokens))
        s = self.initial_state(e)
        for _ in range(self.n_loops):
            s = self.adapter(torch.cat([s, e], dim=-1))
            for layer in self.block:
                s = layer(s)
        return self.head(self.coda(s))
