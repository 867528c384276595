"""`argonne generate MODEL`: sample text from a saved model, streaming tokens to the terminal.

This version runs transformers' `generate()` with its KV cache on our model; sampling defaults are the original
Argonne code's (temperature 0.8, top-k 50, top-p 0.95), and temperature 0 means greedy decoding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import TextStreamer

from .modeling_argonne import ArgonneForCausalLM
from .tokenizer import load_tokenizer


def load_model(path: str | Path, device: str = "auto") -> tuple[ArgonneForCausalLM, object]:
    """An exported Hugging Face folder (weights + tokenizer) on `device`, in bf16 on GPUs, float32 on CPUs."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json)")
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    model = ArgonneForCausalLM.from_pretrained(path, dtype=dtype).to(target).eval()
    return model, load_tokenizer(path)


def generate(
    model: ArgonneForCausalLM,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stream: bool = False,
) -> str:
    """The prompt's continuation (without the prompt)."""
    if seed is not None:
        torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p) if temperature > 0 else {}
    streamer = TextStreamer(tokenizer, skip_prompt=True) if stream else None
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        repetition_penalty=repetition_penalty,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.eos_token_id,
        streamer=streamer,
        **sampling,
    )
    return tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)


def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    """--prompt, else one prompt per non-empty line of --prompt-file, else stdin."""
    if prompt is not None:
        return [prompt]
    text = Path(prompt_file).read_text() if prompt_file else sys.stdin.read()
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompt given ({'file ' + prompt_file if prompt_file else 'stdin'} is empty)")
    return prompts
