"""`argonne train CONFIG.toml`: pretrain an Argonne model.

Set up (config, device, tokenizer) -> build (model, data, optimizer) -> run (the loop). This version trains in one
process on CPU or one GPU, from prepared token shards or straight from parquet; the result is a Hugging Face folder
(`RUN_DIR/model`) with the tokenizer beside it, ready for `argonne generate`.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, OptimConfig, RunConfig
from .configuration_argonne import ArgonneConfig
from .data import StreamingTokens, TokenizeSettings, held_out_tokens
from .loader import PreparedBatches, PreparedTokens, StreamingBatches, num_windows, read_window
from .metrics import count_parameters, training_flops_per_token
from .modeling_argonne import ArgonneForCausalLM
from .tokenizer import document_boundary_id, load_tokenizer


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if name == "bfloat16" else None


def build_model(config: RunConfig, tokenizer) -> ArgonneForCausalLM:
    model_config = ArgonneConfig.from_preset(config.model.preset, **config.model.overrides)
    if len(tokenizer) > model_config.vocab_size:
        raise ConfigError(
            f"tokenizer {config.data.tokenizer!r} has {len(tokenizer)} tokens but model preset "
            f"{config.model.preset!r} has vocab_size {model_config.vocab_size}; set model.overrides.vocab_size"
        )
    model_config.eos_token_id = document_boundary_id(tokenizer)
    model_config.pad_token_id = tokenizer.pad_token_id
    return ArgonneForCausalLM(model_config)


def build_data(config: RunConfig, tokenizer, rank: int = 0, world: int = 1, pin_memory: bool = False):
    """This rank's training batches and the validation windows (None without held-out data)."""
    data, tc = config.data, config.train
    if data.prepared:
        batches = PreparedBatches(
            PreparedTokens(data.prepared, "train", tokenizer), data.seq_len, tc.micro_batch_size, rank, world,
            seed=tc.seed, shuffle=data.shuffle, workers=data.workers, pin_memory=pin_memory,
        )
        val_tokens = PreparedTokens(data.prepared, "val", tokenizer)
    else:
        settings = TokenizeSettings(text_column=data.text_column, val_fraction=data.val_fraction,
                                    on_error=data.on_error)
        stream = StreamingTokens(data.inputs, tokenizer, settings, workers=data.workers)
        batches = StreamingBatches(stream, data.seq_len, tc.micro_batch_size, rank, world, pin_memory=pin_memory)
        val_tokens = held_out_tokens(stream, (data.seq_len * data.val_windows + 1)) if data.val_fraction else None
    if not data.val_windows or val_tokens is None or num_windows(len(val_tokens), data.seq_len) == 0:
        return batches, None
    return batches, (val_tokens, min(data.val_windows, num_windows(len(val_tokens), data.seq_len)))


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms, biases and embeddings are not decayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_embedding = "embed_" in name
        (decay if param.ndim >= 2 and not is_embedding else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        fused=device.type == "cuda",
    )


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr at total_steps."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return optim.min_lr + (optim.lr - optim.min_lr) * cosine


@torch.no_grad()
def evaluate(model, validation, batch_size: int, seq_len: int, device, amp_dtype) -> float:
    """Mean loss over the first `count` windows of the held-out tokens."""
    tokens, count = validation
    model.eval()
    losses = []
    for start in range(0, count, batch_size):
        windows = [read_window(tokens, i, seq_len) for i in range(start, min(start + batch_size, count))]
        batch = torch.from_numpy(np.stack(windows).astype(np.int64)).to(device)
        with _autocast(device, amp_dtype):
            losses.append(model(batch[:, :-1], targets=batch[:, 1:], use_cache=False).loss)
    model.train()
    return torch.stack(losses).mean().item()


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


def train(config: RunConfig) -> dict:
    """Run the training loop; returns a summary (final losses, tokens, time)."""
    run_dir = Path(config.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    torch.manual_seed(config.train.seed)
    device = resolve_device(config.train.device)
    amp_dtype = autocast_dtype(config.train.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    tokenizer = load_tokenizer(config.data.tokenizer)
    model = build_model(config, tokenizer).to(device)
    batches, validation = build_data(config, tokenizer, pin_memory=device.type == "cuda")
    optimizer = build_optimizer(model, config.optim, device)

    tc = config.train
    tokens_per_step = tc.micro_batch_size * tc.grad_accum * config.data.seq_len
    flops_per_token = training_flops_per_token(model.config, config.data.seq_len)
    print(
        f"model {config.model.preset}: {count_parameters(model.config):,} parameters, "
        f"{flops_per_token / 1e6:,.1f} MFLOPs/token | {tokens_per_step:,} tokens/step x {tc.steps} steps | "
        f"device {device}"
    )
    batch_iter = iter(batches)
    metrics_file = open(run_dir / "metrics.jsonl", "w")
    nonfinite_in_a_row, skipped_steps = 0, 0
    started = last_log = time.perf_counter()
    losses_since_log: list[torch.Tensor] = []
    summary: dict = {}
    model.train()
    for step in range(tc.steps):
        lr = lr_at(step, config.optim, tc.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for _ in range(tc.grad_accum):
            batch = next(batch_iter).to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                loss = model(batch[:, :-1], targets=batch[:, 1:], use_cache=False).loss
            (loss / tc.grad_accum).backward()
            step_loss += loss.detach() / tc.grad_accum
        clip = config.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if torch.isfinite(step_loss) and torch.isfinite(grad_norm):
            optimizer.step()
            nonfinite_in_a_row = 0
        else:
            skipped_steps += 1
            nonfinite_in_a_row += 1
            print(f"step {step + 1}: non-finite loss ({step_loss.item()}) or grad norm ({grad_norm.item()}); skipped")
            if nonfinite_in_a_row >= tc.max_nonfinite_in_a_row:
                raise TrainingStopped(
                    f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient norm (step {step + 1}); "
                    "lower optim.lr, check the data, or raise train.max_nonfinite_in_a_row"
                )
        optimizer.zero_grad(set_to_none=True)
        losses_since_log.append(step_loss)

        done = step + 1 == tc.steps
        if (step + 1) % tc.log_every == 0 or done:
            now = time.perf_counter()
            steps_logged = len(losses_since_log)
            record = {
                "step": step + 1,
                "tokens": (step + 1) * tokens_per_step,
                "loss": torch.stack(losses_since_log).mean().item(),
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "tokens_per_s": steps_logged * tokens_per_step / (now - last_log),
                "skipped_steps": skipped_steps,
            }
            if validation is not None and ((tc.eval_every and (step + 1) % tc.eval_every == 0) or done):
                record["val_loss"] = evaluate(
                    model, validation, tc.micro_batch_size, config.data.seq_len, device, amp_dtype
                )
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            print(_format_record(record))
            losses_since_log.clear()
            last_log = time.perf_counter()
            summary.update(record)
    metrics_file.close()

    model_dir = run_dir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    summary["elapsed_s"] = time.perf_counter() - started
    print(f"done in {summary['elapsed_s']:.0f}s; model saved to {model_dir}")
    return summary


def _format_record(record: dict) -> str:
    text = (
        f"step {record['step']:>6} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
        f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s"
    )
    if "val_loss" in record:
        text += f" | val loss {record['val_loss']:.4f}"
    return text
