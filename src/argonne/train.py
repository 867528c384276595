"""`argonne train CONFIG.toml`: pretrain an Argonne model.

Set up (config, device, tokenizer) -> build (model, data, optimizer) -> run (the loop). This version trains in one
process on CPU or one GPU from parquet text tokenized in memory; the result is a Hugging Face folder
(`RUN_DIR/model`) with the tokenizer beside it, ready for `argonne generate`.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from .config import ConfigError, OptimConfig, RunConfig
from .configuration_argonne import ArgonneConfig
from .data import TokenWindows, iter_texts, resolve_parquet_files, tokenize_to_stream
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


def build_data(config: RunConfig, tokenizer) -> tuple[TokenWindows, TokenWindows | None]:
    """Training windows and the held-out validation windows (the last `val_windows` of the token stream)."""
    files = resolve_parquet_files(config.data.inputs)
    tokens = tokenize_to_stream(
        iter_texts(files, config.data.text_column), tokenizer, document_boundary_id(tokenizer)
    )
    seq_len, n_val = config.data.seq_len, config.data.val_windows
    total = TokenWindows(tokens, seq_len)
    if n_val == 0:
        return total, None
    if len(total) <= n_val:
        raise ConfigError(f"data has {len(total)} windows of {seq_len} tokens; cannot hold out {n_val}")
    split = (len(total) - n_val) * seq_len
    return TokenWindows(tokens[: split + 1], seq_len), TokenWindows(tokens[split:], seq_len)


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


class WindowOrder:
    """Global sample index -> window index: a fresh seeded permutation per epoch (or identity without shuffle)."""

    def __init__(self, num_windows: int, seed: int, shuffle: bool):
        self.num_windows, self.seed, self.shuffle = num_windows, seed, shuffle
        self._epoch, self._perm = -1, None

    def __getitem__(self, sample: int) -> int:
        epoch, offset = divmod(sample, self.num_windows)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._epoch = torch.randperm(self.num_windows, generator=generator), epoch
        return int(self._perm[offset])


def batch_at(windows: TokenWindows, order: WindowOrder, first_sample: int, size: int) -> torch.Tensor:
    return torch.stack([windows[order[first_sample + i]] for i in range(size)])  # (B, seq_len + 1)


@torch.no_grad()
def evaluate(model, windows: TokenWindows, batch_size: int, device, amp_dtype) -> float:
    model.eval()
    losses = []
    for start in range(0, len(windows), batch_size):
        batch = torch.stack([windows[i] for i in range(start, min(start + batch_size, len(windows)))]).to(device)
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
    train_windows, val_windows = build_data(config, tokenizer)
    optimizer = build_optimizer(model, config.optim, device)

    tc = config.train
    tokens_per_step = tc.micro_batch_size * tc.grad_accum * config.data.seq_len
    flops_per_token = training_flops_per_token(model.config, config.data.seq_len)
    print(
        f"model {config.model.preset}: {count_parameters(model.config):,} parameters, "
        f"{flops_per_token / 1e6:,.1f} MFLOPs/token | data: {len(train_windows):,} training windows of "
        f"{config.data.seq_len} tokens | {tokens_per_step:,} tokens/step x {tc.steps} steps | device {device}"
    )
    order = WindowOrder(len(train_windows), tc.seed, config.data.shuffle)
    metrics_file = open(run_dir / "metrics.jsonl", "w")
    nonfinite_in_a_row, skipped_steps, sample = 0, 0, 0
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
            batch = batch_at(train_windows, order, sample, tc.micro_batch_size).to(device, non_blocking=True)
            sample += tc.micro_batch_size
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
            if val_windows is not None and ((tc.eval_every and (step + 1) % tc.eval_every == 0) or done):
                record["val_loss"] = evaluate(model, val_windows, tc.micro_batch_size, device, amp_dtype)
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
