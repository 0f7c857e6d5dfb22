"""A tiny looped (weight-tied) GPT used by tests, the demo and the benchmarks.

One shared pre-LayerNorm transformer block is applied ``n_loops`` times. Every
module sees tensors whose dim 0 is the batch, which the per-example gradient
machinery relies on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "LoopBlock", "LoopedGPT", "LoopedGPTConfig", "Mlp"]


@dataclass
class LoopedGPTConfig:
    """Hyper-parameters of :class:`LoopedGPT`.

    Attributes:
        vocab_size: Number of token ids (parity task: 0, 1 and the ``=`` marker 2).
        d_model: Residual stream width.
        n_heads: Number of attention heads; must divide ``d_model``.
        d_mlp: Hidden width of the MLP.
        n_loops: Default number of times the shared block is applied (the loop count τ).
        max_len: Maximum sequence length (size of the position embedding table).
    """

    vocab_size: int = 3
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    n_loops: int = 4
    max_len: int = 32

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.n_loops < 0:
            raise ValueError(f"n_loops must be >= 0, got {self.n_loops}")

    def to_dict(self) -> dict[str, int]:
        """Return the config as a plain dict (safe for ``torch.load(weights_only=True)``)."""
        return {k: int(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopedGPTConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are rejected."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LoopedGPTConfig keys: {sorted(unknown)}")
        return cls(**{k: int(v) for k, v in d.items()})


class Attention(nn.Module):
    """Causal multi-head self-attention with separate ``q``/``k``/``v``/``o`` projections."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        # Separate Linear layers (rather than one fused qkv) so each projection is
        # its own module with its own per-example gradient hooks.
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend causally over ``x`` of shape (B, T, d_model); returns (B, T, d_model)."""
        b, t, d = x.shape

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.n_heads, self.d_head).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True
        )
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """Two-layer GELU MLP: ``fc_out(gelu(fc_in(x)))``."""

    def __init__(self, d_model: int, d_mlp: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_mlp)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(d_mlp, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to ``x`` of shape (B, T, d_model)."""
        return self.fc_out(self.act(self.fc_in(x)))


class LoopBlock(nn.Module):
    """GPT-style pre-LayerNorm transformer block (the weight-tied loop body)."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = Mlp(d_model, d_mlp)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """One loop step on ``h`` of shape (B, T, d_model); returns the same shape."""
        # Out-of-place residual adds: hooks may keep references to module outputs.
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class LoopedGPT(nn.Module):
    """Looped GPT: embeddings, one shared :class:`LoopBlock` applied τ times, readout.

    ``forward(tokens) == readout(block^τ(embed(tokens)))``.
    """

    def __init__(self, config: LoopedGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)
        self.block = LoopBlock(config.d_model, config.n_heads, config.d_mlp)
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Small GPT-2 style init; RNG comes from the caller's (seeded) global generator.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings: (B, T) int64 -> (B, T, d_model)."""
        b, t = tokens.shape
        if t > self.config.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len {self.config.max_len}")
        # Expand positions to (B, T) so pos_emb's input/output carry a batch dim 0,
        # as required for per-example gradients of the position table.
        pos = torch.arange(t, device=tokens.device).unsqueeze(0).expand(b, t)
        return self.tok_emb(tokens) + self.pos_emb(pos)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and unembedding: (B, T, d_model) -> logits (B, T, vocab)."""
        return self.head(self.ln_f(h))

    def forward(self, tokens: torch.Tensor, n_loops: int | None = None) -> torch.Tensor:
        """Compute logits (B, T, vocab) for ``tokens`` (B, T).

        Args:
            tokens: Integer token ids of shape (B, T).
            n_loops: Number of block applications; defaults to ``config.n_loops``.
                Overriding it allows test-time looping with a different depth.
        """
        loops = self._loops(n_loops)
        h = self.embed(tokens)
        for _ in range(loops):
            h = self.block(h)
        return self.readout(h)

    def loop_states(self, tokens: torch.Tensor, n_loops: int | None = None) -> torch.Tensor:
        """The residual stream after each loop step: (B, τ, T, d_model) for ``tokens`` (B, T).

        ``readout(loop_states(tokens)[:, t])`` is what the model would predict had it stopped
        after step t + 1; the last one is ``forward(tokens)``'s input to the readout.
        """
        loops = self._loops(n_loops)
        h = self.embed(tokens)
        states = []
        for _ in range(loops):
            h = self.block(h)
            states.append(h)
        if not states:
            return h.new_zeros((h.shape[0], 0, *h.shape[1:]))
        return torch.stack(states, dim=1)

    def _loops(self, n_loops: int | None) -> int:
        loops = self.config.n_loops if n_loops is None else n_loops
        if loops < 0:
            raise ValueError(f"n_loops must be >= 0, got {loops}")
        return loops
