"""Looped models built from the blocks researchers loop, for the ready-made example configs.

Each takes token ids (B, T) and returns next-token logits (B, T, vocab), like the toy
model, so the parity task, loss and data of :mod:`sdi_pipeline.toy` apply unchanged. Each
applies one shared module ``n_loops`` times:

- ``looped_gpt2``: Hugging Face ``GPT2Block`` (``Conv1D`` projections) as prelude, shared
  core and coda, with input and output embeddings tied as in GPT-2;
- ``looped_llama``: a ``LlamaDecoderLayer`` (``LlamaRMSNorm``, rotary position embeddings
  passed as a keyword argument) looped;
- ``albert``: ``AlbertForMaskedLM`` with one hidden group, i.e. one layer applied
  ``n_loops`` times (ALBERT's weight sharing is a looped transformer);
- ``looped_encoder``: a ``torch.nn.TransformerEncoderLayer`` (``nn.MultiheadAttention``)
  looped.

- ``inkling2_loop``: transformers' own looped LM, ``Inkling2LoopForCausalLM`` (a run of
  decoder layers applied for several passes, gates from pass 2, short convolutions, MoE);

and, from :mod:`.looped`, ``gated_loop``, ``looped_moe`` and ``recurrent_depth`` (layers
that run in some passes only, parameters read without a call, token-flattened MoE rows, a
re-injecting recurrent-depth block).

The Hugging Face ones need ``transformers`` (``pip install -e .[hf]``). Their dropout is off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sdi_pipeline.errors import ConfigError
from sdi_pipeline.examples.looped import GatedLoop, LoopedMoE, RecurrentDepth

PARITY_VOCAB = 3  # bits 0 and 1, and the "=" marker


def _hf(name: str) -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ConfigError(
            f"the {name} example needs Hugging Face transformers: pip install -e .[hf]"
        ) from err
    return transformers


def _hf_config_kwargs() -> dict[str, Any]:
    # No special tokens in the parity vocabulary; SDPA attention, no dropout.
    return {
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "attn_implementation": "sdpa",
    }


class LoopedGPT2(nn.Module):
    """GPT-2 blocks: ``prelude_layers`` once, the shared ``core`` ``n_loops`` times, then
    ``coda_layers`` once; ``lm_head`` tied to ``wte``."""

    def __init__(
        self,
        vocab_size: int = PARITY_VOCAB,
        d_model: int = 32,
        n_heads: int = 4,
        n_loops: int = 6,
        max_len: int = 32,
        prelude_layers: int = 1,
        coda_layers: int = 1,
    ) -> None:
        super().__init__()
        transformers = _hf("looped_gpt2")
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        config = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_len,
            n_embd=d_model,
            n_layer=prelude_layers + 1 + coda_layers,
            n_head=n_heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **_hf_config_kwargs(),
        )
        self.n_loops = n_loops
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_len, d_model)
        self.prelude = nn.ModuleList(GPT2Block(config, layer_idx=i) for i in range(prelude_layers))
        self.core = GPT2Block(config, layer_idx=prelude_layers)
        self.coda = nn.ModuleList(
            GPT2Block(config, layer_idx=prelude_layers + 1 + i) for i in range(coda_layers)
        )
        self.ln_f = nn.LayerNorm(d_model, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]  # (1, T)
        h = self.wte(tokens) + self.wpe(positions)
        for block in self.prelude:
            h = block(h)
        for _ in range(self.n_loops):
            h = self.core(h)
        for block in self.coda:
            h = block(h)
        return self.lm_head(self.ln_f(h))


class LoopedLlama(nn.Module):
    """One ``LlamaDecoderLayer`` applied ``n_loops`` times between embedding and head."""

    def __init__(
        self,
        vocab_size: int = PARITY_VOCAB,
        d_model: int = 32,
        n_heads: int = 4,
        n_loops: int = 6,
        max_len: int = 32,
    ) -> None:
        super().__init__()
        transformers = _hf("looped_llama")
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRMSNorm,
            LlamaRotaryEmbedding,
        )

        config = transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_attention_heads=n_heads,
            num_key_value_heads=n_heads,
            num_hidden_layers=1,
            max_position_embeddings=max_len,
            **_hf_config_kwargs(),
        )
        self.n_loops = n_loops
        self.embed = nn.Embedding(vocab_size, d_model)
        self.rotary = LlamaRotaryEmbedding(config)
        self.core = LlamaDecoderLayer(config, layer_idx=0)
        self.norm = LlamaRMSNorm(d_model, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        rope = self.rotary(h, positions)  # (cos, sin), each (1, T, head_dim)
        for _ in range(self.n_loops):
            h = self.core(h, position_embeddings=rope)
        return self.lm_head(self.norm(h))


class Albert(nn.Module):
    """``AlbertForMaskedLM`` returning its logits; ``n_groups=1`` shares one layer across
    all ``n_loops`` layers (the looped case)."""

    def __init__(
        self,
        vocab_size: int = PARITY_VOCAB,
        d_model: int = 32,
        n_heads: int = 4,
        n_loops: int = 6,
        max_len: int = 32,
        embedding_size: int = 16,
        n_groups: int = 1,
    ) -> None:
        super().__init__()
        transformers = _hf("albert")
        config = transformers.AlbertConfig(
            vocab_size=vocab_size,
            embedding_size=embedding_size,
            hidden_size=d_model,
            num_hidden_layers=n_loops,
            num_hidden_groups=n_groups,
            num_attention_heads=n_heads,
            intermediate_size=2 * d_model,
            max_position_embeddings=max_len,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            classifier_dropout_prob=0.0,
            **_hf_config_kwargs(),
        )
        self.mlm = transformers.AlbertForMaskedLM(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlm(input_ids=tokens).logits


class LoopedEncoder(nn.Module):
    """One ``nn.TransformerEncoderLayer`` (batch first) applied ``n_loops`` times."""

    def __init__(
        self,
        vocab_size: int = PARITY_VOCAB,
        d_model: int = 32,
        n_heads: int = 4,
        n_loops: int = 6,
        max_len: int = 32,
    ) -> None:
        super().__init__()
        self.n_loops = n_loops
        self.emb = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.core = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        h = self.emb(tokens) + self.pos(positions)
        for _ in range(self.n_loops):
            h = self.core(h)
        return self.head(h)


class LoopedInkling(nn.Module):
    """Hugging Face ``Inkling2LoopForCausalLM`` (transformers' looped LM): decoder layers
    ``loop_start..loop_end-1`` applied for ``n_loops`` passes, gates mixing in the previous
    pass's messages from pass 2 on, short causal convolutions that read their weight, and a
    top-k MoE on token-flattened rows. ``lm.model.layers.<loop_start>`` is the loop body."""

    def __init__(
        self,
        vocab_size: int = PARITY_VOCAB,
        d_model: int = 16,
        n_heads: int = 2,
        n_loops: int = 3,
        max_len: int = 32,
        n_experts: int = 4,
    ) -> None:
        super().__init__()
        _hf("inkling2_loop")
        try:
            from transformers.models.inkling2_loop import modeling_inkling2_loop as inkling
            from transformers.models.inkling2_loop.configuration_inkling2_loop import (
                Inkling2LoopTextConfig,
            )
        except ImportError as err:
            raise ConfigError(
                "the inkling2_loop example needs a transformers release that ships "
                "Inkling2LoopForCausalLM (5.25 or later): pip install -U 'transformers>=5.25'"
            ) from err
        head_dim = d_model // n_heads
        config = Inkling2LoopTextConfig(
            vocab_size=vocab_size, unpadded_vocab_size=vocab_size, hidden_size=d_model,
            num_hidden_layers=3, num_attention_heads=n_heads, num_key_value_heads=n_heads,
            head_dim=head_dim, swa_num_attention_heads=n_heads, swa_num_key_value_heads=n_heads,
            swa_head_dim=head_dim, sliding_window_size=max_len, d_rel=4, rel_extent=max_len,
            n_layers_per_attn_res_block=1, moe_intermediate_size=d_model,
            layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"],
            n_routed_experts=n_experts, num_experts_per_tok=2, loop_layer_index_start=1,
            loop_layer_index_end=2, loop_num_passes=n_loops, loop_gate_rank=4,
            max_position_embeddings=max_len, eos_token_id=None, use_cache=False,
        )  # fmt: skip
        config._attn_implementation = "eager"
        self.lm = inkling.Inkling2LoopForCausalLM(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=tokens).logits


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "looped_gpt2": LoopedGPT2,
    "looped_llama": LoopedLlama,
    "albert": Albert,
    "looped_encoder": LoopedEncoder,
    "gated_loop": GatedLoop,
    "looped_moe": LoopedMoE,
    "recurrent_depth": RecurrentDepth,
    "inkling2_loop": LoopedInkling,
}


def build_example(architecture: str, **kwargs: Any) -> nn.Module:
    """One of :data:`ARCHITECTURES` with its keyword arguments."""
    if architecture not in ARCHITECTURES:
        raise ConfigError(
            f"unknown example architecture {architecture!r}: one of {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[architecture](**kwargs)
