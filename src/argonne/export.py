"""`argonne export` and `argonne import`: Argonne models to and from the formats the ecosystem reads.

Export sources are Hugging Face folders or training checkpoints of any parallel layout (DCP consolidates them on the
CPU). Targets: an Argonne folder (`hf`: loads with trust_remote_code=True), and `llama`: a plain
`LlamaForCausalLM` folder for presets whose architecture Llama can express (RMSNorm, SwiGLU, RoPE) — so vLLM,
lm-eval and llama.cpp's converters accept it. Parameter names are already Llama's, so the weights map one to one.

Imports read transformers Llama and Qwen2 folders. Loading third-party files never runs their code: safetensors, or
`torch.load(weights_only=True)` for .bin/.pth files; a file that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from .configuration_argonne import ArgonneConfig
from .modeling_argonne import ArgonneForCausalLM

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ConversionError(ValueError):
    """The source cannot be converted; the message says what differs."""


# ------------------------------------------------------------------------------------------------------- export


def llama_incompatibilities(config: ArgonneConfig) -> list[str]:
    problems = []
    if config.norm_type != "rmsnorm":
        problems.append(f"norm_type is {config.norm_type!r} (Llama: rmsnorm)")
    if config.mlp_type != "swiglu":
        problems.append(f"mlp_type is {config.mlp_type!r} (Llama: swiglu)")
    if config.position_embedding != "rope":
        problems.append(f"position_embedding is {config.position_embedding!r} (Llama: rope)")
    if config.attention_out_bias != config.attention_bias:
        problems.append("o_proj bias differs from q/k/v bias (Llama has one attention_bias for all four)")
    return problems


def to_llama_config(config: ArgonneConfig):
    from transformers import LlamaConfig

    problems = llama_incompatibilities(config)
    if problems:
        raise ConversionError("this model does not fit the Llama architecture: " + "; ".join(problems))
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta, attention_bias=config.attention_bias, mlp_bias=config.mlp_bias,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )


def export_model(source: str | Path, target: str, output: str | Path, dtype: str = "bf16") -> Path:
    from .generate import load_model

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model, tokenizer = load_model(source, "cpu")
    model.to(DTYPES[dtype])
    output = Path(output)
    if target == "hf":
        model.save_pretrained(output)
    elif target == "llama":
        from transformers import LlamaForCausalLM

        with torch.device("meta"):
            llama = LlamaForCausalLM(to_llama_config(model.config))
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        llama.load_state_dict(state, strict=True, assign=True)
        llama.save_pretrained(output)
    elif target == "gguf":
        raise ConversionError("GGUF export is not implemented yet")
    else:
        raise ConversionError(f"unknown export target {target!r}; use hf, llama or gguf")
    tokenizer.save_pretrained(output)
    return output


# ------------------------------------------------------------------------------------------------------- import


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors files, else its .bin/.pth files loaded with weights_only=True."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        state = {}
        for file in files:
            state.update(load_file(file))
        return state
    files = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pth")) + sorted(folder.glob("*.pt"))
    if not files:
        raise ConversionError(f"{folder}: no .safetensors, .bin or .pth weights")
    state = {}
    for file in files:
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError) as error:
            raise ConversionError(
                f"{file}: refused — it needs unpickling of arbitrary Python objects, which could run code. "
                f"Convert it to safetensors where you trust it. ({error})"
            ) from None
        if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise ConversionError(f"{file}: not a state dict of tensors")
        state.update(loaded)
    return state


def _rope_theta(hf: dict) -> float:
    parameters = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = parameters.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in (None, "default"):
        raise ConversionError(f"RoPE scaling {kind!r} is not supported by Argonne's model")
    return float(parameters.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def argonne_config_from_hf(hf: dict) -> ArgonneConfig:
    kind = hf.get("model_type")
    if kind not in ("llama", "qwen2"):
        raise ConversionError(f"model_type {kind!r} cannot be imported (supported: llama, qwen2)")
    heads = hf["num_attention_heads"]
    if kind == "qwen2" and hf.get("use_sliding_window"):
        raise ConversionError("Qwen2 sliding-window attention is not supported")
    qkv_bias = True if kind == "qwen2" else hf.get("attention_bias", False)
    return ArgonneConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096), norm_type="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), mlp_type="swiglu", position_embedding="rope",
        rope_theta=_rope_theta(hf), attention_bias=qkv_bias,
        attention_out_bias=False if kind == "qwen2" else qkv_bias, mlp_bias=hf.get("mlp_bias", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", False), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
    )


def import_model(source: str | Path, output: str | Path) -> Path:
    """A transformers Llama or Qwen2 folder -> an Argonne folder (weights, config with auto_map, code, tokenizer)."""
    source, output = Path(source), Path(output)
    config_file = source / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{source}: no config.json")
    config = argonne_config_from_hf(json.loads(config_file.read_text()))
    state = read_weights(source)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = ArgonneForCausalLM(config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"{source}: weights do not match the config: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.save_pretrained(output)
    if (source / "tokenizer_config.json").is_file() or (source / "tokenizer.json").is_file():
        from .tokenizer import load_tokenizer

        load_tokenizer(source).save_pretrained(output)
    return output
