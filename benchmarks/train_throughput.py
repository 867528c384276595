"""Training-step throughput of Argonne's model against transformers' LlamaForCausalLM of the same shape and batch,
in the same process: tokens/s, MFU over the bf16 matmul rate measured in the same run, and peak memory.

    python benchmarks/train_throughput.py --preset small --batch 8 --seq-len 4096 --compile      # one GPU
    python benchmarks/train_throughput.py --preset argonne-2.0 --batch 2 --seq-len 4096 --compile --checkpointing
    python benchmarks/train_throughput.py --preset tiny --batch 2 --seq-len 128                  # CPU-sized

One step = forward + backward + AdamW (fused on GPUs) on random tokens; bf16 autocast with fp32 master weights on
GPUs, fp32 on CPUs. MFU = (6 N + 12 L H hd S) FLOPs/token x tokens/s / measured peak, as in ../shared/reference.
"""

from __future__ import annotations

import argparse
import gc
import time
from contextlib import nullcontext

import torch

from argonne import ArgonneConfig, ArgonneForCausalLM
from argonne.metrics import training_flops_per_token
from argonne.parallel import apply_activation_checkpointing, apply_compile
from argonne.train import measure_peak_tflops


def llama_like(config: ArgonneConfig, checkpointing: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings, attn_implementation="sdpa",
    ))
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model


def measure(name, model, step_inputs, device, amp, steps: int, warmup: int, flops_per_token, peak, tokens):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        with amp():
            loss = step_inputs(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    tokens_per_s = tokens / seconds
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"{name:<34}{seconds * 1000:>10.1f}{tokens_per_s:>14,.0f}{flops_per_token * tokens_per_s / peak:>8.3f}"
          f"{memory:>12.1f}")
    return tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each of Argonne's blocks")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both models")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    amp = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype else nullcontext
    config = ArgonneConfig.from_preset(args.preset, max_position_embeddings=max(args.seq_len, 128))
    tokens = args.batch * args.seq_len
    flops_per_token = training_flops_per_token(config, args.seq_len)
    peak = measure_peak_tflops(device, dtype) * 1e12
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), device=device)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    print(f"{args.preset}: batch {args.batch} x {args.seq_len}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, "
          f"measured peak {peak / 1e12:,.1f} TFLOP/s, {flops_per_token / 1e9:,.2f} GFLOPs/token")
    print(f"{'model':<34}{'step ms':>10}{'tokens/s':>14}{'MFU':>8}{'peak GiB':>12}")

    ours = ArgonneForCausalLM(config).to(device)
    if args.checkpointing:
        apply_activation_checkpointing(ours)
    if args.compile:
        apply_compile(ours)
    label = "argonne" + (" (compiled blocks)" if args.compile else "")
    ours_rate = measure(label, ours, lambda m: m(inputs, targets=targets, use_cache=False).loss, device, amp,
                        args.steps, args.warmup, flops_per_token, peak, tokens)
    del ours
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_transformers:
        theirs = llama_like(config, args.checkpointing).to(device)
        theirs_rate = measure("transformers LlamaForCausalLM", theirs,
                              lambda m: m(inputs, labels=inputs, use_cache=False).loss, device, amp,
                              args.steps, args.warmup, flops_per_token, peak, tokens)
        print(f"argonne / transformers tokens/s: {ours_rate / theirs_rate:.2f}x")


if __name__ == "__main__":
    main()
