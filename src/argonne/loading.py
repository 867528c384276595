"""The one place that opens a model: a Hugging Face folder (safetensors, sharded safetensors or torch.save weights)
or a training checkpoint of any parallel layout, with its config and tokenizer, on a checked device in its dtype.

generate, chat, serve, eval, export, distillation's teacher and training's `model.init_from` all open models here.
Nothing here runs code from the files it reads: safetensors hold no code, torch.save files are read with
weights_only=True, checkpoint metadata through checkpoint.py's restricted reader, tokenizers and configs with
trust_remote_code=False; a checkpoint is verified against its checksums before its config builds anything. Weights
holding NaN or Inf are refused, naming the tensors (`check_finite_weights`, also run where a model is written).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from .configuration_argonne import ArgonneConfig
from .files import read_json
from .modeling_argonne import ArgonneForCausalLM

# torch.save weight files, as older transformers folders hold them (pytorch_model.bin).
TORCH_WEIGHT_FILES = ("*.bin", "*.pth", "*.pt")
# What a folder needs for its tokenizer to load: tokenizer.json (fast tokenizers) or tokenizer_config.json with the
# files it names.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ModelError(ValueError):
    """A model folder or checkpoint that cannot be opened; the message names the file and what is wrong."""


def open_model(path: str | Path, device: str = "auto", dtype: str = "auto", tokenizer: str | Path | None = None):
    """(model in eval mode on `device` in `dtype`, tokenizer) from a model folder or a training checkpoint folder.
    The tokenizer is the folder's own unless `tokenizer` (a folder or hub name) is given; a folder without one is
    an error that says which files are missing and how to pass one, before any weight is read."""
    from .device import resolve_device

    path = Path(path)
    target = resolve_device(device)
    config = open_config(path)
    check_weight_files(path)
    if tokenizer is None:
        require_tokenizer_files(path)  # before any weight is read
    model = ArgonneForCausalLM(config)
    load_weights(model, path, verify=False)  # verified by open_config
    return ready_for_use(model, target, dtype, tokenizer if tokenizer is not None else path)


def ready_for_use(model: ArgonneForCausalLM, target: torch.device, dtype: str, tokenizer: str | Path):
    """(model on `target` in `dtype` ("auto": device.resolve_dtype), in eval mode, tokenizer from `tokenizer`)."""
    from .device import resolve_dtype
    from .tokenizer import load_tokenizer

    model.to(device=target, dtype=resolve_dtype(dtype, target))
    return model.eval(), load_tokenizer(tokenizer)


def open_config(path: str | Path) -> ArgonneConfig:
    """The model config of a folder or checkpoint; a checkpoint is verified first (nothing is built from a
    config.json whose checkpoint does not match its checksums)."""
    from .checkpoint import check_before_use, is_checkpoint

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model folder or checkpoint (no config.json)")
    if is_checkpoint(path):
        check_before_use(path)
    read_json(path / "config.json", ModelError, "model config")  # a damaged file named, whatever transformers says
    try:
        return ArgonneConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        raise ModelError(f"{path / 'config.json'}: not an Argonne config ({_first_line(error)})") from None


def load_weights(model: ArgonneForCausalLM, source: str | Path, verify: bool = True) -> None:
    """Every weight of `model` from a folder's safetensors (or torch.save files) or a training checkpoint (verified
    unless `verify=False` says the caller did); a missing, unexpected or mis-shaped weight is an error, never a
    silent random initialisation."""
    from .checkpoint import is_checkpoint, load_model_weights

    source = Path(source)
    if is_checkpoint(source):
        load_model_weights(source, model, verify)  # DCP: raises on a missing key or a shape mismatch
        check_finite_weights(model, source)
        return
    check_weight_files(source)
    state = read_weights(source)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers may save the tied head; it is the embedding
    problems = weight_mismatch(model.state_dict(), state)
    if problems:
        raise ModelError(f"{source}: the weights do not fit the model: {problems}")
    check_finite_weights(state, source)
    model.load_state_dict(state, strict=True)


# Offending tensors an error names; a model broken by one bad update usually has NaN in most of them.
NON_FINITE_NAMED = 4


def check_finite_weights(weights: torch.nn.Module | Mapping[str, torch.Tensor], source: str | Path,
                         advice: str = "the model is broken — retrain it or restore it from an earlier checkpoint"
                         ) -> None:
    """Raise ModelError naming `source` and the first tensors of `weights` (a model or a state dict) that hold NaN
    or Inf, with how many such values each has. A model with one NaN weight turns every logit it touches into NaN,
    which decoding would read as a token (the argmax of NaNs) and perplexity as `nan`: it is refused where a model is
    opened or written instead.

    One `aminmax` per tensor finds them: NaN propagates through min and max, and an Inf is the min or the max. It
    reads the weights once, about as fast as a sum, where `isfinite(t).all()` first writes a boolean per value:
    10-30x slower on 2 CPU cores (benchmarks/finite_check.py; Argonne 2.0 in bf16: about 2 s against a minute).
    Values are counted only in a broken tensor."""
    if isinstance(weights, torch.nn.Module):
        # named_parameters and named_buffers skip tied duplicates (the tied lm_head is the embedding).
        weights = dict(weights.named_parameters()) | dict(weights.named_buffers())
    broken = [(name, tensor) for name, tensor in weights.items() if not _all_finite(tensor)]
    if not broken:
        return
    named = ", ".join(f"{name} ({_values(int(tensor.numel() - torch.isfinite(tensor).sum()))})"
                      for name, tensor in broken[:NON_FINITE_NAMED])
    more = f" and {len(broken) - NON_FINITE_NAMED} more tensors" if len(broken) > NON_FINITE_NAMED else ""
    raise ModelError(f"{source}: non-finite weights (NaN or Inf) in {named}{more}; {advice}")


def _all_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point() or tensor.is_meta or tensor.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(tensor.detach()))).all())


def _values(count: int) -> str:
    return f"{count:,} value" + ("" if count == 1 else "s")


def check_weight_files(path: Path) -> None:
    """That `path` holds weights to read (cheap: names only), and a sharded index names files of the folder."""
    from .checkpoint import COMPLETE, is_checkpoint

    if is_checkpoint(path):
        return
    check_shard_index(path)
    if not any(path.glob("*.safetensors")) and not any(f for p in TORCH_WEIGHT_FILES for f in path.glob(p)):
        raise FileNotFoundError(
            f"{path}: no weights: looked for model.safetensors (or model.safetensors.index.json), "
            f"{' / '.join(TORCH_WEIGHT_FILES)} (pytorch_model.bin), and a training checkpoint's {COMPLETE} marker"
        )


def require_tokenizer_files(path: Path) -> None:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"{path} has no tokenizer: neither {' nor '.join(TOKENIZER_FILES)} is there (a model saved with "
            f"save_pretrained alone has none). Save the tokenizer into the folder (tokenizer.save_pretrained), or "
            f"pass one with --tokenizer (a folder or hub name: the one the model was trained with)"
        )


def check_shard_index(path: Path) -> None:
    """A sharded safetensors folder's index must name files of the folder itself, not paths leading elsewhere."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    weight_map = read_json(index, ModelError, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelError(f"{index}: not a valid safetensors index (no weight_map object)")
    files = set(weight_map.values())
    outside = sorted(str(f) for f in files if not isinstance(f, str) or Path(f).name != f)
    if outside:
        raise ModelError(f"{index}: refused, its weight_map points outside the folder: {outside[:3]}")


def weight_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """What keeps `state` from loading strictly into a model whose state dict is `expected`, or None."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in sorted(set(state) & set(expected))
             if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        return f"missing {missing}, unexpected {unexpected}, wrong shapes {wrong}"
    return None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors files, else its .bin/.pth files loaded with weights_only=True (a
    pickle that needs any other object is refused, so reading runs no code)."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        state = {}
        for file in files:
            state.update(read_safetensors(file))
        return state
    files = sorted(f for pattern in TORCH_WEIGHT_FILES for f in folder.glob(pattern))
    if not files:
        raise ModelError(f"{folder}: no .safetensors, .bin or .pth weights")
    state = {}
    for file in files:
        loaded = read_torch_weights(file)
        if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise ModelError(f"{file}: not a state dict of tensors")
        state.update(loaded)
    return state


def read_torch_weights(file: Path):
    """What a torch.save file holds, loaded with weights_only=True: a pickle that needs any other object is
    refused (reading runs no code), and a truncated or damaged file is a ModelError naming it."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error) and "GLOBAL" not in str(error):  # not a refused object: damage
            raise ModelError(f"{file}: not a valid torch weights file ({_unpickling_cause(error)}); it may be "
                             f"truncated or damaged: copy or download it again") from None
        raise ModelError(
            f"{file}: refused — it needs unpickling of arbitrary Python objects, which could run code. "
            f"Convert it to safetensors where you trust it. ({_unpickling_cause(error)})"
        ) from None
    except (RuntimeError, AttributeError, EOFError, OSError, ValueError) as error:  # a damaged zip or pickle
        raise ModelError(f"{file}: not a valid torch weights file ({_first_line(error)}); it may be truncated or "
                         f"damaged: copy or download it again") from None


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; a truncated file, a header that lies about sizes or offsets, or any
    other damage is a ModelError naming the file (safetensors' own error names none)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ModelError(f"{file}: not a valid safetensors file ({_first_line(error)}); it may be truncated or "
                         f"damaged: copy or download it again") from None


def _unpickling_cause(error: Exception) -> str:
    """torch's weights-only refusal in one line: the line naming what was refused (or the damage), without the
    paragraphs of advice around it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported" in line or "load key" in line]
    return (named or lines or [type(error).__name__])[0][:300]


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
