"""The Argonne decoder-only transformer: one config-driven model for Argonne 1.0, 1.5, 2.0 and the small presets.

Read top to bottom:
- norms (RMSNorm, LayerNorm), MergedLinear (inference's merged projections) and the MLPs (SwiGLU, GELU);
- rotary embedding, attention (SDPA, with optional QK-norm) and the block;
- the new tokens' positions and attention mask (`positions_and_mask`), and the initialisation;
- the decoder (ArgonneModel: embeddings, blocks, final norm), the output head (OutputHead) and the causal-LM model
  (ArgonneForCausalLM), then the default cache.
Architecture variants are small classes chosen by name from the config. Parameter names follow transformers' Llama
(`model.layers.N.self_attn.q_proj`, ...), and QK-norm's Qwen3's (`self_attn.q_norm`, `self_attn.k_norm`), so weights
map one to one.

The training loss, the chunked linear + cross-entropy behind OutputHead, is in `loss_argonne.py`. The model works
with any cache that has a transformers Cache's `update` and `get_seq_length`; the generator's static cache and its
masks are in `kv_cache.py`, outside the model: a caller that passes position_ids and a 4D mask is taken at its word.

Single-device code only: no torch.distributed here (nor in loss_argonne.py). Tensor parallelism and FSDP are applied
from outside (parallel.py); the model only tolerates sharding (shapes are read as `view(B, T, -1, head_dim)`, never
from a global head count).

This file, `loss_argonne.py` and `configuration_argonne.py` import nothing else from the `argonne` package; the
loss is imported relatively, so `save_pretrained` copies all three beside saved weights for
`trust_remote_code=True` loading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_argonne import ArgonneConfig
from .loss_argonne import linear_cross_entropy

@dataclass
class ArgonneCausalLMOutput(CausalLMOutputWithPast):
    """transformers' causal-LM output, plus the mean z (squared log-partition) when the loss was asked for with a
    z-loss coefficient (training logs it apart from the loss)."""

    z_loss: torch.Tensor | None = None


# transformers 5.x renamed the model output's `past_key_values` to `cache`; write whichever the installed version has.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back before the weight (as transformers' Llama does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def build_norm(config: ArgonneConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=True)


class MergedLinear(nn.Module):
    """Linears that read the same input, run as one matmul returning their outputs (inference: see
    ArgonneForCausalLM.merge_projections). The linears' own parameters are re-pointed to slices of the merged weight
    and bias, so nothing is stored twice and the state dict is unchanged (the merged tensors are plain attributes,
    neither parameters nor buffers); an in-place update of either is seen by both, but a re-assignment of `.data` or
    a `.to()` is not, which is why merging is the last step before inference."""

    @torch.no_grad()
    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.weight = torch.cat([linear.weight for linear in linears])
        self.bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
        self.sizes = [linear.out_features for linear in linears]
        start = 0
        for linear in linears:
            rows = slice(start, start + linear.out_features)
            linear.weight.data = self.weight[rows]
            if self.bias is not None:
                linear.bias.data = self.bias[rows]
            start += linear.out_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


class SwiGLUMLP(nn.Module):
    def __init__(self, config: ArgonneConfig):
        super().__init__()
        d, h, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, h, bias=bias)
        self.up_proj = nn.Linear(d, h, bias=bias)
        self.down_proj = nn.Linear(h, d, bias=bias)
        self.down_proj.writes_residual = True  # see init_module
        self.gate_up: MergedLinear | None = None  # see merge_projections

    def merge_projections(self) -> None:
        self.gate_up = self.gate_up or MergedLinear([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """GPT-2's MLP with the exact (erf) GELU."""

    def __init__(self, config: ArgonneConfig):
        super().__init__()
        d, h, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.up_proj = nn.Linear(d, h, bias=bias)
        self.down_proj = nn.Linear(h, d, bias=bias)
        self.down_proj.writes_residual = True  # see init_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


MLP_CLASSES = {"swiglu": SwiGLUMLP, "gelu": GeluMLP}


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, 1, T, head_dim) for `position_ids` (B, T).

    Computed per forward from the positions (a few kFLOPs) rather than kept in a buffer, so a model built on the meta
    device needs no buffer re-initialisation. Angles are computed in float32 before casting.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    )
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, hd) by RoPE in the half-split layout transformers' Llama uses."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads through scaled_dot_product_attention.

    K/V heads are not repeated in memory: SDPA's `enable_gqa` broadcasts them over the query groups.
    """

    def __init__(self, config: ArgonneConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(d, config.num_attention_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, d, bias=config.attention_out_bias)
        self.o_proj.writes_residual = True  # see init_module
        # QK-norm (config.qk_norm): one RMSNorm over head_dim, shared by every query head, and one by every key head.
        self.q_norm = RMSNorm(hd, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.norm_eps) if config.qk_norm else None
        self.qkv: MergedLinear | None = None  # see merge_projections

    def merge_projections(self) -> None:
        self.qkv = self.qkv or MergedLinear([self.q_proj, self.k_proj, self.v_proj])

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attn_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        if self.qkv is not None:
            q, k, v = self.qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(self.attend(q, k, v, rope, attn_mask, cache))

    def heads(self, q, k, v, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The projections q (B, T, nh * hd), k and v (B, T, n_kv * hd) as heads (B, heads, T, hd), q and k normed
        (QK-norm, Qwen3's order: per head, before RoPE) and rotated."""
        B, T, _ = q.shape
        q = q.view(B, T, -1, self.head_dim)  # (B, T, nh, hd)
        k = k.view(B, T, -1, self.head_dim)  # (B, T, n_kv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        if rope is not None:  # None: no RoPE in this model, or q and k come rotated
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def attend(self, q, k, v, rope, attn_mask, cache) -> torch.Tensor:
        """The attention between the projections: q (B, T, nh * hd), k and v (B, T, n_kv * hd) -> (B, T, nh * hd),
        through QK-norm, RoPE, the cache and SDPA."""
        B, T, _ = q.shape
        q, k, v = self.heads(q, k, v, rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, n_kv, S, hd): every key the cache returns
        # Training on a GPU: pad head_dim to a multiple of 8 (cuDNN's requirement). Not with a cache, where padding
        # would copy the whole cache at every decoding step.
        pad_to = ATTENTION_HEAD_DIM_MULTIPLE if cache is None and q.is_cuda else 1
        y = attention(q, k, v, attn_mask, pad_to)  # (B, nh, T, hd)
        return y.transpose(1, 2).reshape(B, T, -1)


# cuDNN's fused attention needs head_dim % 8 == 0. Argonne 2.0's head_dim 170 otherwise gets only the slower flash
# kernel; q/k/v are zero-padded to 176 instead (the measurement is in benchmarks/RESULTS.md).
ATTENTION_HEAD_DIM_MULTIPLE = 8


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | BlockMask | None, pad_to: int = 1
) -> torch.Tensor:
    """SDPA over q (B, nh, T, hd) and k, v (B, n_kv, S, hd); causal when attn_mask is None, flex attention when it
    is a BlockMask (see document_mask).

    With `pad_to` > 1, q, k and v are zero-padded along head_dim to a multiple of it and the softmax scale stays
    1/sqrt(hd): the zeros add nothing to q.k, and the padded value columns (zeros) are cut off again, so the result
    is the same math, computed by whichever kernel the padded shape unlocks.
    """
    head_dim = q.shape[-1]
    if isinstance(attn_mask, BlockMask):  # document attention on a GPU: flex attention skips the masked blocks
        return _flex_attention(q, k, v, block_mask=attn_mask, scale=1.0 / math.sqrt(head_dim),
                               enable_gqa=q.shape[1] != k.shape[1])
    pad = -head_dim % pad_to
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, scale=1.0 / math.sqrt(head_dim),
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return y[..., :head_dim] if pad else y


def _flex_attention(q, k, v, **kwargs) -> torch.Tensor:
    """flex_attention, compiled once on first use: uncompiled it runs a reference implementation that materialises
    the whole score matrix."""
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention(q, k, v, **kwargs)


_compiled_flex_attention = None


class Block(nn.Module):
    def __init__(self, config: ArgonneConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = build_norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = build_norm(config)
        self.mlp = MLP_CLASSES[config.mlp_type](config)

    def forward(self, x, rope=None, attn_mask=None, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), rope, attn_mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def build_attention_mask(
    attention_mask: torch.Tensor | None, query_len: int, past_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, S) for SDPA, True where a query may attend; None means plain causal attention.

    `attention_mask` (B, S) is the usual 1-for-token / 0-for-padding mask over past and current positions.
    A query that is itself padding would see no key at all and SDPA would return NaN there, which then leaks into
    later layers through 0 * NaN; every query may therefore always see itself. Real tokens are unaffected.
    """
    if attention_mask is None and past_len == 0:
        return None
    key_len = past_len + query_len
    query_pos = torch.arange(past_len, key_len, device=device)[:, None]
    key_pos = torch.arange(key_len, device=device)[None, :]
    mask = (key_pos <= query_pos)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        keep = attention_mask[:, None, None, -key_len:].bool()  # (B, 1, 1, S)
        mask = (mask & keep) | (key_pos == query_pos)[None, None]
    return mask


def positions_from_mask(
    attention_mask: torch.Tensor | None, query_len: int, past_len: int, device: torch.device
) -> torch.Tensor:
    """Positions (B or 1, T) of the current tokens; with a padding mask, counting only real tokens (left padding)."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + query_len, device=device)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -query_len:]


def document_ids(input_ids: torch.Tensor, boundary: int) -> torch.Tensor:
    """(B, T) -> (B, T): the index of each token's document within its window. The boundary token closes a
    document, so it belongs to the one it ends."""
    ends = (input_ids == boundary).int()
    return ends.cumsum(-1) - ends


def positions_in_documents(documents: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> each token's position counted from its document's first token."""
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return index - torch.where(starts, index, 0).cummax(-1).values


def same_document_causal(documents: torch.Tensor):
    """flex attention's mask_mod for document attention: query q of row b may see key k of the same document."""
    def mask_mod(b, h, q, k):
        return (q >= k) & (documents[b, q] == documents[b, k])

    return mask_mod


def document_mask(documents: torch.Tensor) -> torch.Tensor | BlockMask:
    """Causal attention within each document: a (B, 1, T, T) boolean mask for SDPA, or on GPUs a flex attention
    BlockMask, which never builds the T x T mask and lets the kernel skip blocks no query may see."""
    B, T = documents.shape
    if documents.is_cuda:
        return create_block_mask(same_document_causal(documents), B, None, T, T, device=documents.device,
                                 _compile=True)
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    return (causal & (documents[:, :, None] == documents[:, None, :]))[:, None]


def cached_tokens(cache: Cache | None) -> int:
    return 0 if cache is None else cache.get_seq_length()


def positions_and_mask(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: Cache | None,
    query_len: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Position ids (B or 1, T) and the SDPA mask (None: causal) for T new tokens.

    What the caller passes is used as given: position_ids, and a 4D mask (B, 1, T, S), boolean (True: may attend) or
    float and added to the scores (0 or -inf, as transformers' 4D masks are). What it does not pass is derived from
    a 2D padding mask (B, S) and the number of tokens the cache already holds, and only then is the cache asked
    for that number: a caller that passes both depends on nothing the cache counts.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        attn_mask = attention_mask if attention_mask.is_floating_point() else attention_mask.bool()
        if position_ids is None:  # the tokens follow those the cache holds
            position_ids = positions_from_mask(None, query_len, cached_tokens(cache), device)
        return position_ids, attn_mask
    past_len = cached_tokens(cache)
    if position_ids is None:
        position_ids = positions_from_mask(attention_mask, query_len, past_len, device)
    return position_ids, build_attention_mask(attention_mask, query_len, past_len, device)


class ArgonnePreTrainedModel(PreTrainedModel):
    config_class = ArgonneConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Called by transformers for freshly built (not loaded) modules; `reset_parameters` is the explicit version.
        init_module(module, self.config)


def init_module(module: nn.Module, config: ArgonneConfig) -> None:
    """The documented initialisation, applied to one module (not its children).

    Linear and embedding weights ~ N(0, initializer_range); residual-stream output projections (attention o_proj
    and MLP down_proj) use initializer_range / sqrt(2 * num_hidden_layers) so the residual variance does not grow
    with depth (GPT-2). Biases are zero, norm weights one.
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        std = config.initializer_range
        if getattr(module, "writes_residual", False):
            std /= math.sqrt(2 * config.num_hidden_layers)
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (RMSNorm, nn.LayerNorm)):
        nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class ArgonneModel(nn.Module):
    """Embeddings, the stack of blocks and the final norm; returns hidden states."""

    def __init__(self, config: ArgonneConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(config)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) or inputs_embeds (B, T, D) -> hidden states (B, T, D)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        # The whole sequence's length, read from the inputs: x may hold only a shard of it (sequence parallel).
        T = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        if self.config.attention_scope == "document" and input_ids is not None and attention_mask is None \
                and cached_tokens(cache) == 0:
            documents = document_ids(input_ids, self.config.eos_token_id)
            attn_mask = document_mask(documents)
            if position_ids is None:
                position_ids = (positions_in_documents(documents) if self.config.restart_positions
                                else positions_from_mask(None, T, 0, x.device))
        else:
            position_ids, attn_mask = positions_and_mask(attention_mask, position_ids, cache, T, x.device)
        rope = None
        if self.config.position_embedding == "rope":
            rope = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        else:
            x = x + self.embed_positions(position_ids)
        for block in self.layers:
            x = block(x, rope, attn_mask, cache)
        return self.norm(x)


class OutputHead(nn.Module):
    """Hidden states (..., D) and the (V, D) head matrix -> logits (..., V), or with targets -> the training loss
    (loss_argonne.linear_cross_entropy, no logits). It holds no weights; under tensor parallelism parallel.py swaps in a
    vocabulary-parallel head for the sharded matrix."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None = None,
                z_loss: float | None = None):
        if targets is None:
            return F.linear(hidden, weight)
        return linear_cross_entropy(hidden, weight, targets, z_loss=z_loss)


class ArgonneForCausalLM(ArgonnePreTrainedModel, GenerationMixin):
    """The Argonne language model. With tied embeddings the head reuses `model.embed_tokens.weight` and there is no
    separate `lm_head` parameter; untied presets (Argonne 1.x) have `lm_head`."""

    def __init__(self, config: ArgonneConfig):
        super().__init__(config)
        self.model = ArgonneModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.output_head = OutputHead()
        self.post_init()

    @property
    def output_weight(self) -> torch.Tensor:
        """The (vocab, hidden) matrix that maps hidden states to logits."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return None if self.config.tie_word_embeddings else self.lm_head

    def merge_projections(self) -> None:
        """For inference: q/k/v and (SwiGLU) gate/up each become one matmul — fewer, larger kernels per decoded
        token. No memory is added (see MergedLinear); call it once the model is on its device and in its dtype, and
        not on a model that is trained or sharded afterwards. Merging twice changes nothing."""
        for module in list(self.modules()):
            if module is not self and hasattr(module, "merge_projections"):
                module.merge_projections()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter from scratch (e.g. after building on the meta device and `to_empty`)."""
        for module in self.modules():
            init_module(module, self.config)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        targets: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        z_loss: float | None = None,
        **kwargs,
    ) -> ArgonneCausalLMOutput:
        """Logits (B, T, V) and, with `labels` (B, T), the next-token cross-entropy: position t predicts labels[t+1],
        positions labelled -100 are ignored. A non-finite loss is returned as it is.

        `targets` (B, T) are labels already shifted (position t predicts targets[t]), as training windows of T + 1
        tokens give them. With targets only the loss is returned (logits None): it is computed by
        `linear_cross_entropy` without ever holding the (B * T, V) logits.

        `z_loss` (a coefficient, with `targets` only) adds the z-loss to the returned loss and returns the mean z
        itself as `z_loss` (see loss_argonne.linear_cross_entropy).

        `cache` (`past_key_values` before transformers 5) is a transformers `Cache`; with `use_cache` and none
        given, a `DynamicCache` is created. `logits_to_keep=k` computes logits for the last k positions only.
        """
        for unsupported in ("output_attentions", "output_hidden_states"):
            if kwargs.get(unsupported):
                raise NotImplementedError(f"ArgonneForCausalLM does not support {unsupported}=True")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if labels is not None and targets is not None:
            raise ValueError("pass labels (shifted inside) or targets (already shifted), not both")
        if z_loss is not None and targets is None:
            raise ValueError("z_loss is a term of the training loss: pass it with targets")
        if labels is not None:
            targets = labels[:, 1:]
        if use_cache and cache is None and targets is None:
            cache = _new_dynamic_cache(self.config)
        if not use_cache:
            cache = None
        hidden = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        if labels is None and targets is not None:
            # The training path: the loss straight from the hidden states, chunk by chunk; no logits are returned.
            loss = self.output_head(hidden[:, : targets.shape[1]], self.output_weight, targets.to(hidden.device),
                                    z_loss=z_loss)
            loss, z = loss if z_loss is not None else (loss, None)
            return ArgonneCausalLMOutput(loss=loss, logits=None, z_loss=z, **{_CACHE_FIELD: cache})
        logits = self.output_head(hidden, self.output_weight)  # (B, T, V)
        loss = None
        if targets is not None:
            predicting = logits[:, : targets.shape[1]]  # with labels, the last position predicts nothing
            loss = F.cross_entropy(
                predicting.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device), ignore_index=-100
            )
        return ArgonneCausalLMOutput(loss=loss, logits=logits, **{_CACHE_FIELD: cache})


def _new_dynamic_cache(config: ArgonneConfig) -> DynamicCache:
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers < 4.56 takes no config
        return DynamicCache()
