"""Model cost figures: exact parameter counts and training FLOPs per token (for tokens/s -> MFU)."""

from __future__ import annotations

import torch

from .configuration_argonne import ArgonneConfig
from .modeling_argonne import ArgonneForCausalLM


def count_parameters(config: ArgonneConfig) -> int:
    """Exact parameter count, from the model built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = ArgonneForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def matmul_parameters(config: ArgonneConfig) -> int:
    """Parameters that take part in a matmul per token: all but the embedding lookups, plus the output head.

    With tied embeddings the token embedding is also the head, so it counts once; untied, the lookup table is
    excluded and `lm_head` counts. Learned position tables are lookups and never count.
    """
    total = count_parameters(config)
    embeddings = config.vocab_size * config.hidden_size
    if config.position_embedding == "learned":
        embeddings += config.max_position_embeddings * config.hidden_size
    head = config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0
    return total - embeddings + head


def training_flops_per_token(config: ArgonneConfig, seq_len: int) -> int:
    """6 N + 12 L H hd S: forward + backward matmuls (2 + 4 FLOPs per matmul parameter, the PaLM appendix B
    convention) plus causal attention scores and values (QK^T and AV: 2 matmuls x 2 FLOPs x S keys, x3 for the
    backward, counted over all S keys as PaLM and nanoGPT do)."""
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * matmul_parameters(config) + attention
