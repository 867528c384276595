"""`argonne export` and `argonne import`: Argonne models to and from the formats the ecosystem reads.

Export sources are Hugging Face folders or training checkpoints of any parallel layout (DCP consolidates them on the
CPU). Targets: an Argonne folder (`hf`: loads with trust_remote_code=True); `llama`: a plain `LlamaForCausalLM`
folder for presets whose architecture Llama can express (RMSNorm, SwiGLU, RoPE) — so vLLM, lm-eval and llama.cpp's
converters accept it (parameter names are already Llama's); `qwen3`: a plain `Qwen3ForCausalLM` folder for the same
architecture with QK-norm (`qk_norm`, which Llama lacks); and `gguf`: a llama-architecture GGUF file with the
tokenizer, through the `gguf` package.

Imports read transformers Llama, Qwen2 and Qwen3 folders and the original Argonne code's folders: 1.x (model_type
"argonne", GPT-2-style names, including 1.0's `pipeline_stages.<stage>.<block>` layout) and 2.0 (model_type
"argonne2"). Loading third-party files never runs their code: safetensors, or
`torch.load(weights_only=True)` for .bin/.pth files; a file that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .configuration_argonne import ArgonneConfig
from .files import read_json
from .loading import ModelError, check_finite_weights, read_weights, weight_mismatch
from .modeling_argonne import ArgonneForCausalLM

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ConversionError(ModelError):
    """The source cannot be converted; the message says what differs."""


# ------------------------------------------------------------------------------------------------------- export


def _decoder_incompatibilities(config: ArgonneConfig, architecture: str) -> list[str]:
    """What a Llama-like decoder (RMSNorm, SwiGLU, RoPE, one bias setting for q/k/v/o) cannot hold."""
    problems = []
    if config.norm_type != "rmsnorm":
        problems.append(f"norm_type is {config.norm_type!r} ({architecture}: rmsnorm)")
    if config.mlp_type != "swiglu":
        problems.append(f"mlp_type is {config.mlp_type!r} ({architecture}: swiglu)")
    if config.position_embedding != "rope":
        problems.append(f"position_embedding is {config.position_embedding!r} ({architecture}: rope)")
    if config.attention_out_bias != config.attention_bias:
        problems.append(f"o_proj bias differs from q/k/v bias ({architecture} has one attention_bias for all four)")
    return problems


def llama_incompatibilities(config: ArgonneConfig) -> list[str]:
    problems = _decoder_incompatibilities(config, "Llama")
    if config.qk_norm:
        problems.append("qk_norm is True (Llama has no query/key norms; export it --to qwen3)")
    return problems


def qwen3_incompatibilities(config: ArgonneConfig) -> list[str]:
    problems = _decoder_incompatibilities(config, "Qwen3")
    if config.mlp_bias:
        problems.append("mlp_bias is True (Qwen3's MLP has no biases)")
    # Norms of weight one would not make the model exact: they still divide each head by its RMS.
    if not config.qk_norm:
        problems.append("qk_norm is False (Qwen3 always normalises queries and keys; export it --to llama)")
    return problems


def _decoder_fields(config: ArgonneConfig) -> dict:
    """The fields transformers' Llama-family configs share with ours (shape, norm, RoPE, tokens)."""
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta, attention_bias=config.attention_bias,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )


def to_llama_config(config: ArgonneConfig):
    from transformers import LlamaConfig

    problems = llama_incompatibilities(config)
    if problems:
        raise ConversionError("this model does not fit the Llama architecture: " + "; ".join(problems))
    return LlamaConfig(**_decoder_fields(config), mlp_bias=config.mlp_bias)


def to_qwen3_config(config: ArgonneConfig):
    from transformers import Qwen3Config

    problems = qwen3_incompatibilities(config)
    if problems:
        raise ConversionError("this model does not fit the Qwen3 architecture: " + "; ".join(problems))
    return Qwen3Config(**_decoder_fields(config), hidden_act="silu", use_sliding_window=False)


# Plain transformers targets: (model class, its config from ours). Parameter names are the same as ours.
TRANSFORMERS_TARGETS = {"llama": ("LlamaForCausalLM", to_llama_config), "qwen3": ("Qwen3ForCausalLM", to_qwen3_config)}
EXPORT_TARGETS = ("hf", "llama", "qwen3", "gguf")


def refuse_unfit(config: ArgonneConfig, target: str) -> None:
    """Raise ConversionError, naming every difference, for a model the target's architecture cannot hold."""
    if target in TRANSFORMERS_TARGETS:
        TRANSFORMERS_TARGETS[target][1](config)
    elif target == "gguf":
        problems = llama_incompatibilities(config)
        if problems:
            raise ConversionError("GGUF export needs the Llama architecture: " + "; ".join(problems))


def export_model(source: str | Path, target: str, output: str | Path, dtype: str = "bf16",
                 tokenizer: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write `source` (a model folder or checkpoint) as `target` into `output` through the output policy
    (outputs.py): an existing output is refused unless `overwrite`, everything is written into staging beside it and
    renamed into place at the end, so a failed or killed export leaves the earlier output as it was."""
    from .loading import open_model
    from .outputs import FILE, FOLDER, Output

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if target not in EXPORT_TARGETS:
        raise ConversionError(f"unknown export target {target!r}; use one of {', '.join(EXPORT_TARGETS)}")
    output = Output(gguf_path(output), FILE, overwrite) if target == "gguf" else Output(output, FOLDER, overwrite)
    model, tokenizer = open_model(source, "cpu", "float32", tokenizer)  # read whole: the output may be the source
    model.to(DTYPES[dtype])
    if dtype == "fp16":  # finite when opened (open_model checks), a weight can still overflow fp16 (max 65,504)
        check_finite_weights(model, f"{source} cast to {dtype}",
                             advice=f"{dtype} cannot hold them: export with --dtype bf16 or fp32")
    refuse_unfit(model.config, target)  # before anything is written
    with output.staged() as staging:
        _write_export(model, tokenizer, target, staging, name=output.path.stem)
    return output.path


def gguf_path(output: str | Path) -> Path:
    """A GGUF export's file: `output` itself when it ends in .gguf, else `output`/model.gguf (the folder's other
    files are left as they are: the file holds the tokenizer too)."""
    output = Path(output)
    return output if output.suffix == ".gguf" else output / "model.gguf"


def _write_export(model, tokenizer, target: str, output: Path, name: str) -> None:
    """The export into `output`: a new folder, or for gguf the file."""
    if target == "gguf":
        write_gguf(model, tokenizer, output, name)
        return
    if target == "hf":
        model.save_pretrained(output)
    else:
        save_as_transformers(model, target, output)
    tokenizer.save_pretrained(output)


def save_as_transformers(model: ArgonneForCausalLM, target: str, output: Path) -> None:
    """The model as a plain transformers folder of `target` (TRANSFORMERS_TARGETS): the same weights, one to one."""
    import transformers

    class_name, to_config = TRANSFORMERS_TARGETS[target]
    with torch.device("meta"):
        theirs = getattr(transformers, class_name)(to_config(model.config))
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    theirs.load_state_dict(state, strict=True, assign=True)
    theirs.save_pretrained(output)


def permute_for_gguf_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's "llama" architecture rotates interleaved pairs (x0, x1), (x2, x3)...; transformers' Llama (and
    Argonne) rotate halves (x_i, x_{i + d/2}). Reordering each head's q/k output rows maps one onto the other, as
    llama.cpp's own converter does."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_pre_tokenizer(tokenizer) -> str:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = json.dumps(backend.get("pre_tokenizer"))
    return "qwen2" if '"Split"' in pre and "\\p{N}" in pre else "gpt-2"


def gguf_tensors(model: ArgonneForCausalLM) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's tensor names (q/k rows reordered for its RoPE layout)."""
    c, state = model.config, model.state_dict()
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if not c.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for ours, theirs in names.items():
            for suffix in ("", ".weight", ".bias"):
                key = f"model.layers.{i}.{ours}{suffix}"
                if key not in state:
                    continue
                tensor = state[key]
                if ours in ("self_attn.q_proj", "self_attn.k_proj") and suffix:
                    heads = c.num_attention_heads if ours == "self_attn.q_proj" else c.num_key_value_heads
                    tensor = permute_for_gguf_rope(tensor, heads)
                tensors[f"blk.{i}.{theirs}{suffix}"] = tensor
    return tensors


def write_gguf(model: ArgonneForCausalLM, tokenizer, path: Path, name: str | None = None) -> Path:
    """A llama-architecture GGUF file with the model's weights in their dtype (bf16, fp16 or fp32; 1-D tensors in
    fp32) and the byte-level BPE tokenizer llama.cpp needs."""
    import gguf
    import numpy as np

    c = model.config
    refuse_unfit(c, "gguf")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name or path.stem)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)

    # Tokenizer: every embedding row gets a token; rows past the tokenizer are unused padding.
    vocab = {index: token for token, index in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = {index for index in tokenizer.added_tokens_decoder}
    tokens, types = [], []
    for index in range(c.vocab_size):
        if index not in vocab:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(vocab[index])
            types.append(gguf.TokenType.CONTROL if index in special else
                         gguf.TokenType.USER_DEFINED if index in added else gguf.TokenType.NORMAL)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_gguf_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    if c.eos_token_id is not None:
        writer.add_eos_token_id(c.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    dtype = next(model.parameters()).dtype
    file_types = {torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
                  torch.float32: gguf.LlamaFileType.ALL_F32}
    if dtype not in file_types:
        raise ConversionError(f"GGUF export writes bf16, fp16 or fp32 weights, not {dtype}")
    writer.add_file_type(file_types[dtype])
    for name, tensor in gguf_tensors(model).items():
        tensor = tensor.detach().contiguous()
        if tensor.dim() == 1 or dtype == torch.float32:
            # Norm weights and biases stay float32 (exact from bf16 and fp16), as llama.cpp's converter keeps them.
            writer.add_tensor(name, np.ascontiguousarray(tensor.float().numpy()))
        elif dtype == torch.float16:
            writer.add_tensor(name, np.ascontiguousarray(tensor.numpy()))
        else:  # numpy has no bfloat16: the raw 2-byte values, typed BF16 in the file
            raw = tensor.view(torch.int16).numpy().view(np.uint8)
            writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ------------------------------------------------------------------------------------------------------- import


def _rope_theta(hf: dict) -> float:
    parameters = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = parameters.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in (None, "default"):
        raise ConversionError(f"RoPE scaling {kind!r} is not supported by Argonne's model")
    return float(parameters.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def legacy_argonne_config(hf: dict) -> ArgonneConfig:
    """The original Argonne code's configs: 1.x (model_type "argonne", GPT-2 names n_embd/n_layer/n_head/block_size)
    and 2.0 (model_type "argonne2", head_dim = hidden_size / num_attention_heads)."""
    if hf["model_type"] == "argonne":
        d, heads = hf["n_embd"], hf["n_head"]
        return ArgonneConfig.from_preset(
            "argonne-1.0", vocab_size=hf["vocab_size"], hidden_size=d, num_hidden_layers=hf["n_layer"],
            num_attention_heads=heads, num_key_value_heads=heads, head_dim=d // heads, intermediate_size=4 * d,
            max_position_embeddings=hf["block_size"], bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
        )
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    intermediate = hf.get("intermediate_size") or ((int(8 * d / 3) + 255) // 256) * 256
    return ArgonneConfig.from_preset(
        "argonne-2.0", vocab_size=hf["vocab_size"], hidden_size=d, num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or max(1, heads // 2),
        head_dim=d // heads, intermediate_size=intermediate,
        max_position_embeddings=hf.get("max_position_embeddings", 4096), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=hf.get("rope_theta", 10_000.0), attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False), tie_word_embeddings=hf.get("tie_word_embeddings", True),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
    )


def _unpipeline(state: dict) -> dict:
    """Argonne 1.0's pipeline layout `pipeline_stages.<stage>.<block>.*` -> `blocks.<global block>.*`, with the
    blocks per stage taken as the largest block index + 1 (as the original convert_model.py did)."""
    pattern = re.compile(r"^pipeline_stages\.(\d+)\.(\d+)\.(.*)$")
    matches = {key: pattern.match(key) for key in state}
    staged = {key: m for key, m in matches.items() if m}
    if not staged:
        return state
    per_stage = max(int(m.group(2)) for m in staged.values()) + 1
    result = {key: value for key, value in state.items() if key not in staged}
    for key, m in staged.items():
        result.setdefault(f"blocks.{int(m.group(1)) * per_stage + int(m.group(2))}.{m.group(3)}", state[key])
    return result


_LEGACY_1X = [  # original name pattern -> ours
    (r"^token_embedding\.weight$", "model.embed_tokens.weight"),
    (r"^position_embedding$", "model.embed_positions.weight"),
    (r"^blocks\.(\d+)\.ln1\.", r"model.layers.\1.input_layernorm."),
    (r"^blocks\.(\d+)\.ln2\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^blocks\.(\d+)\.attn\.query\.", r"model.layers.\1.self_attn.q_proj."),
    (r"^blocks\.(\d+)\.attn\.key\.", r"model.layers.\1.self_attn.k_proj."),
    (r"^blocks\.(\d+)\.attn\.value\.", r"model.layers.\1.self_attn.v_proj."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"model.layers.\1.mlp.up_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"model.layers.\1.mlp.down_proj."),
    (r"^ln_f\.", "model.norm."),
    (r"^head\.weight$", "lm_head.weight"),
]
_LEGACY_20 = [
    (r"^(model\.)?embed_tokens\.weight$", "model.embed_tokens.weight"),
    (r"^(model\.)?blocks\.(\d+)\.attn\.", r"model.layers.\2.self_attn."),
    (r"^(model\.)?blocks\.(\d+)\.input_norm\.", r"model.layers.\2.input_layernorm."),
    (r"^(model\.)?blocks\.(\d+)\.post_norm\.", r"model.layers.\2.post_attention_layernorm."),
    (r"^(model\.)?blocks\.(\d+)\.mlp\.", r"model.layers.\2.mlp."),
    (r"^(model\.)?norm\.weight$", "model.norm.weight"),
    (r"^(model\.)?lm_head\.weight$", "lm_head.weight"),
]


def legacy_state_dict(state: dict, model_type: str) -> dict:
    """Rename the original Argonne code's parameters to ours; the causal-mask buffers it saved are dropped."""
    rules = _LEGACY_1X if model_type == "argonne" else _LEGACY_20
    if model_type == "argonne":
        state = _unpipeline(state)
    renamed = {}
    for key, value in state.items():
        if key.endswith("attn.mask") or key.endswith("rotary_emb.inv_freq"):
            continue
        for pattern, replacement in rules:
            if re.match(pattern, key):
                new_key = re.sub(pattern, replacement, key)
                renamed[new_key] = value.reshape(value.shape[-2:]) if key == "position_embedding" else value
                break
        else:
            renamed[key] = value  # left for the missing/unexpected check to report
    return renamed


# The fields each kind of imported config must hold as integers (the others have defaults).
_REQUIRED_FIELDS = {
    "argonne 1.x": ("vocab_size", "n_embd", "n_layer", "n_head", "block_size"),
    "argonne2": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"),
    "transformers": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
}


def read_import_config(config_file: Path) -> dict:
    """The config.json of a folder to import, read with the project's JSON reader and its required fields checked:
    a missing or non-integer one is a ConversionError naming the file and the fields."""
    hf = read_json(config_file, ConversionError, "model config")
    kind = ("argonne 1.x" if hf.get("model_type") == "argonne" else "argonne2") if is_legacy_argonne(hf) \
        else "transformers" if hf.get("model_type") in ("llama", "qwen2", "qwen3") else None
    if kind is None:
        return hf  # ours, or a model_type argonne_config_from_hf refuses by name
    wrong = [name for name in _REQUIRED_FIELDS[kind]
             if not isinstance(hf.get(name), int) or isinstance(hf.get(name), bool) or hf[name] <= 0]
    if wrong:
        raise ConversionError(f"{config_file}: a {hf['model_type']} config needs positive integers for "
                              f"{', '.join(wrong)} (missing or {', '.join(repr(hf.get(n)) for n in wrong)})")
    return hf


def is_legacy_argonne(hf: dict) -> bool:
    """The original code's configs: "argonne2", or "argonne" with GPT-2 names (ours has hidden_size)."""
    return hf.get("model_type") == "argonne2" or (hf.get("model_type") == "argonne" and "n_embd" in hf)


def argonne_config_from_hf(hf: dict) -> ArgonneConfig:
    kind = hf.get("model_type")
    if is_legacy_argonne(hf):
        return legacy_argonne_config(hf)
    if kind == "argonne":  # already ours
        return ArgonneConfig.from_dict(hf)
    if kind not in ("llama", "qwen2", "qwen3"):
        raise ConversionError(
            f"model_type {kind!r} cannot be imported (supported: llama, qwen2, qwen3, argonne 1.x, argonne2)"
        )
    refuse_unrepresentable(hf)
    heads = hf["num_attention_heads"]
    qkv_bias = True if kind == "qwen2" else hf.get("attention_bias", False)
    return ArgonneConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096), norm_type="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), mlp_type="swiglu", position_embedding="rope",
        rope_theta=_rope_theta(hf), attention_bias=qkv_bias,
        attention_out_bias=False if kind == "qwen2" else qkv_bias, mlp_bias=hf.get("mlp_bias", False),
        qk_norm=kind == "qwen3", tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
    )


def refuse_unrepresentable(hf: dict) -> None:
    """A transformers Llama / Qwen2 / Qwen3 config with what Argonne's model does not have: raise ConversionError
    naming each (RoPE scaling is refused by _rope_theta)."""
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {hf['hidden_act']!r} (Argonne's SwiGLU: silu)")
    # Qwen2 and Qwen3 layers marked "sliding_attention" attend to every key unless use_sliding_window is set.
    if hf.get("use_sliding_window"):
        problems.append("sliding-window attention (use_sliding_window) is not supported")
    if problems:
        raise ConversionError(f"{hf['model_type']} model cannot be imported: " + "; ".join(problems))


def converted_model(source: str | Path) -> ArgonneForCausalLM:
    """A transformers Llama / Qwen2 / Qwen3 folder or an original Argonne 1.x / 2.0 folder as an Argonne model, in
    memory (its weights as stored, refused if any is NaN or Inf: before `import_model` writes anything)."""
    source = Path(source)
    config_file = source / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{source}: no config.json")
    hf = read_import_config(config_file)
    config = argonne_config_from_hf(hf)
    state = read_weights(source)
    if is_legacy_argonne(hf):
        state = legacy_state_dict(state, hf["model_type"])
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = ArgonneForCausalLM(config)
    problems = weight_mismatch(model.state_dict(), state)
    if problems:
        raise ConversionError(f"{source}: weights do not match the config: {problems}")
    check_finite_weights(state, source)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def import_model(source: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """A transformers Llama / Qwen2 / Qwen3 folder or an original Argonne 1.x / 2.0 folder -> an Argonne folder
    (weights, config with auto_map, code, tokenizer), written through the output policy (outputs.py): everything is
    read and checked first, then written into staging and renamed into place."""
    from .outputs import FOLDER, Output

    source, output = Path(source), Output(output, FOLDER, overwrite)
    model = converted_model(source)
    tokenizer = None
    if (source / "tokenizer_config.json").is_file() or (source / "tokenizer.json").is_file():
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(source)
    with output.staged() as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return output.path
