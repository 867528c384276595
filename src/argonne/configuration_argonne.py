"""Configuration and presets for the Argonne model family.

This file, like `modeling_argonne.py` and `loss_argonne.py`, imports nothing else from the `argonne` package: all
three are copied beside saved weights so that `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
works without Argonne installed.
"""

from __future__ import annotations

import difflib
import inspect

from transformers import PretrainedConfig

NORM_TYPES = ("rmsnorm", "layernorm")
MLP_TYPES = ("swiglu", "gelu")
POSITION_EMBEDDINGS = ("rope", "learned")
ATTENTION_SCOPES = ("causal", "document")

# Qwen2.5 tokenizer: 151,643 BPE tokens + 22 added tokens. <|endoftext|> (151643) ends every document.
QWEN_VOCAB_SIZE = 151_665
QWEN_END_OF_TEXT_ID = 151_643

_ARGONNE_2_STYLE = dict(
    norm_type="rmsnorm",
    norm_eps=1e-6,
    mlp_type="swiglu",
    position_embedding="rope",
    rope_theta=10_000.0,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=True,
)

_ARGONNE_1_STYLE = dict(
    # GPT-2 layout: LayerNorm with bias, learned absolute positions, exact (erf) GELU MLP 4x, biases everywhere,
    # and an untied output head. Argonne 1.x used a 12k byte-level BPE.
    vocab_size=12_000,
    hidden_size=1296,
    intermediate_size=4 * 1296,
    head_dim=1296 // 16,
    max_position_embeddings=2048,
    norm_type="layernorm",
    norm_eps=1e-5,
    mlp_type="gelu",
    position_embedding="learned",
    attention_bias=True,
    mlp_bias=True,
    tie_word_embeddings=False,
)

# name -> field values. Parameter counts are asserted in tests/test_model.py.
PRESETS: dict[str, dict] = {
    # 4,918,072,800 parameters: the original Argonne 2.0 run.
    "argonne-2.0": dict(
        _ARGONNE_2_STYLE,
        vocab_size=QWEN_VOCAB_SIZE,
        hidden_size=4080,
        num_hidden_layers=24,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=170,
        intermediate_size=11008,
        max_position_embeddings=4096,
        eos_token_id=QWEN_END_OF_TEXT_ID,
    ),
    # 356,516,640 parameters.
    "argonne-1.5": dict(_ARGONNE_1_STYLE, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16),
    # 275,827,680 parameters: as 1.5 with 12 layers and 12 heads (head_dim 108).
    "argonne-1.0": dict(
        _ARGONNE_1_STYLE,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        head_dim=1296 // 12,
    ),
    # 493,762,304 parameters: the Qwen2.5-0.5B shape in Argonne 2.0 style, trains on one GPU (the "0.5B shape" of
    # the benchmarks).
    "small": dict(
        _ARGONNE_2_STYLE,
        vocab_size=QWEN_VOCAB_SIZE,
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=4864,
        max_position_embeddings=4096,
        eos_token_id=QWEN_END_OF_TEXT_ID,
    ),
    # 4,999,424 parameters, for CPU tests and the quickstart. The vocabulary is the 8,192-token byte-level BPE trained
    # on the bundled sample text (data/tokenizers/sample-bpe-8k): with Qwen's 151,665 tokens the output layer alone
    # would be ~13x the blocks' matmul work per token (training measured 11x slower; docs/model.md, "Choosing the
    # tiny vocabulary").
    "tiny": dict(
        _ARGONNE_2_STYLE,
        vocab_size=8192,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=688,
        max_position_embeddings=1024,
        eos_token_id=0,
    ),
}
# The recipe ablation's winner (benchmarks/RESULTS.md, "Recipe ablation"): the architecture part, QK-norm, on the
# tiny and small shapes; the training part, Muon, is in configs/tiny-plus.toml and configs/small-plus.toml.
PRESETS["tiny-plus"] = dict(PRESETS["tiny"], qk_norm=True)  # 4,999,936 parameters
PRESETS["small-plus"] = dict(PRESETS["small"], qk_norm=True)  # 493,765,376 parameters


class ArgonneConfig(PretrainedConfig):
    """Every architectural choice of the Argonne family is a field here, so one model class serves all presets.

    Args:
        vocab_size: rows of the token embedding (and of the output head).
        hidden_size: width of the residual stream.
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads; fewer than query heads gives grouped-query attention.
        head_dim: width of one head; independent of hidden_size / num_attention_heads (Argonne 2.0: 24 x 170 = 4080).
        intermediate_size: hidden width of the MLP.
        max_position_embeddings: longest sequence; the size of the learned position table when there is one.
        attention_scope: "causal" (a token attends to every earlier token of its window) or "document" (only to
            earlier tokens of its own document: packed training windows hold several, each closed by the boundary
            token, `eos_token_id`). Document scope applies to forwards over whole windows (no cache holding earlier
            tokens, no padding mask); generation attends causally, a prompt being one document.
        restart_positions: with attention_scope "document", each document's positions count from 0 as if it were
            alone. With RoPE this changes only rounding (rotary attention depends on distances alone); with learned
            positions it is what makes a packed document equal to the document alone.
        norm_type: "rmsnorm" or "layernorm" (LayerNorm has a bias).
        norm_eps: epsilon of every norm.
        mlp_type: "swiglu" (gate/up/down) or "gelu" (up/down with exact erf GELU).
        position_embedding: "rope" (rotary, with rope_theta) or "learned" (absolute position table).
        rope_theta: RoPE base.
        attention_bias: biases on the q/k/v projections (and on o_proj unless attention_out_bias says otherwise).
        attention_out_bias: bias on the o projection; None follows attention_bias (Qwen2: q/k/v biases, none on o).
        mlp_bias: biases on the MLP projections.
        qk_norm: an RMSNorm (weight of head_dim, norm_eps) on each query and key head before RoPE, as OLMo 2 and
            Qwen3 have (`self_attn.q_norm` / `self_attn.k_norm`); it bounds the attention logits. Always an RMSNorm,
            whatever norm_type says. False (the default, and what a config.json without the field means): none.
        tie_word_embeddings: the output head reuses the token embedding.
        initializer_range: std of the normal initialisation; residual output projections (o_proj, down_proj) use
            initializer_range / sqrt(2 * num_hidden_layers), as GPT-2 does.
    """

    model_type = "argonne"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = QWEN_VOCAB_SIZE,
        hidden_size: int = 4080,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 24,
        num_key_value_heads: int | None = 8,
        head_dim: int | None = 170,
        intermediate_size: int = 11008,
        max_position_embeddings: int = 4096,
        attention_scope: str = "causal",
        restart_positions: bool = False,
        norm_type: str = "rmsnorm",
        norm_eps: float = 1e-6,
        mlp_type: str = "swiglu",
        position_embedding: str = "rope",
        rope_theta: float = 10_000.0,
        attention_bias: bool = False,
        attention_out_bias: bool | None = None,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.attention_scope = attention_scope
        self.restart_positions = restart_positions
        self.norm_type = norm_type
        self.norm_eps = norm_eps
        self.mlp_type = mlp_type
        self.position_embedding = position_embedding
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_bias if attention_out_bias is None else attention_out_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.tie_word_embeddings = tie_word_embeddings
        self._validate_fields()

    def _validate_fields(self) -> None:
        problems = []
        for name, allowed in (
            ("norm_type", NORM_TYPES),
            ("mlp_type", MLP_TYPES),
            ("position_embedding", POSITION_EMBEDDINGS),
            ("attention_scope", ATTENTION_SCOPES),
        ):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} is {getattr(self, name)!r}; expected one of {allowed}")
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        # A string such as "false" would be truthy: switches must be real booleans.
        for name in ("attention_bias", "attention_out_bias", "mlp_bias", "qk_norm", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not problems and self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.attention_scope == "document" and self.eos_token_id is None:
            problems.append('attention_scope "document" needs eos_token_id, the token that closes each document')
        if self.restart_positions and self.attention_scope != "document":
            problems.append('restart_positions needs attention_scope "document"')
        if not problems and self.position_embedding == "rope" and self.head_dim % 2:
            problems.append(f"RoPE needs an even head_dim, got {self.head_dim}")
        if problems:
            raise ValueError("invalid ArgonneConfig: " + "; ".join(problems))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ArgonneConfig":
        """The named preset (see PRESETS), with any field overridden, e.g. `from_preset("tiny", vocab_size=151665)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
        # transformers keeps any unknown keyword as an attribute, so a misspelt field would silently leave the
        # preset's value in place.
        own, inherited = cls.field_names()
        unknown = [key for key in overrides if key not in own | inherited]
        if unknown:
            raise ValueError("; ".join(_unknown_field(key, own, inherited) for key in unknown))
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def field_names(cls) -> tuple[set[str], set[str]]:
        """The fields the constructor takes: Argonne's own, and PretrainedConfig's (dtype, output_hidden_states...)."""
        own = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        inherited = set(inspect.signature(PretrainedConfig.__init__).parameters) - {"self", "kwargs"}
        # PretrainedConfig also takes these through its **kwargs.
        inherited |= {"torch_dtype", "attn_implementation", "output_attentions", "name_or_path"}
        return own, inherited


def _unknown_field(name: str, own: set[str], inherited: set[str]) -> str:
    """The message for a misspelt field, suggesting the closest of Argonne's own fields first."""
    match = (difflib.get_close_matches(name, sorted(own), n=1)
             or difflib.get_close_matches(name, sorted(inherited), n=1))
    return f"unknown model field {name!r}" + (f" (did you mean {match[0]!r}?)" if match else "")
