"""Training-step throughput of Argonne's trainer against transformers' LlamaForCausalLM of the same shape and batch,
in the same process: tokens/s, MFU over the bf16 matmul rate measured in the same run, and peak memory.

    python benchmarks/train_throughput.py --preset small --batch 8 --seq-len 4096 --compile      # one GPU
    python benchmarks/train_throughput.py --preset argonne-2.0 --batch 2 --seq-len 4096 --compile \
        --checkpointing selective
    python benchmarks/train_throughput.py --preset small --compile --checkpointing none selective  # two variants
    python benchmarks/train_throughput.py --preset tiny --batch 2 --seq-len 128                  # CPU-sized
    python benchmarks/train_throughput.py --preset argonne-2.0 --batch 2 --seq-len 4096 --compile \
        --checkpointing selective --float8 tensorwise rowwise       # FP8 rows beside bf16 and transformers
    python benchmarks/train_throughput.py --preset small --compile --document-length 1024 --skip-transformers
                                        # document attention beside causal, on the same windows of documents

Argonne's step is the trainer's own `training_step` (chunked linear + cross-entropy, clipping, fused AdamW that skips
non-finite updates on the device) on a model prepared by the trainer's `parallelize` (activation checkpointing,
per-block compile). transformers' step is the same work written the usual way (labels loss, clip_grad_norm_, fused
AdamW), as in ../shared/reference. Random tokens; bf16 autocast with fp32 master weights on GPUs, fp32 on CPUs.
MFU = (6 N + 12 L H hd S) FLOPs/token x tokens/s / measured peak, as in ../shared/reference.
On a GPU, `--check-syncs` makes any host synchronisation inside Argonne's timed steps an error.
"""

from __future__ import annotations

import argparse
import gc
import time
from contextlib import nullcontext
from typing import get_args

import torch

from argonne import ArgonneConfig, ArgonneForCausalLM
from argonne.run_config import ActivationCheckpointing, RunConfig
from argonne.metrics import training_flops_per_token
from argonne.optim import build_optimizer
from argonne.parallel import Float8Plan, Topology, parallelize
from argonne.training.build import cross_entropy_objective
from argonne.training.loop import training_step
from argonne.training.metrics import measure_peak_tflops


def llama_like(config: ArgonneConfig, checkpointing: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings, attn_implementation="sdpa",
    ))
    if checkpointing:  # renamed in transformers 5.x; older versions have only the first name
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    return model


def argonne_step(config: ArgonneConfig, args, checkpointing: str, batch, device, amp, float8: str = "off"):
    with device:  # initialised on the device: a 4.9B model would take minutes on the CPU
        model = ArgonneForCausalLM(config)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    parallelize(model, Topology(), checkpointing, args.compile, None, Float8Plan.for_device(float8, [], device, dtype))
    run = RunConfig()  # the defaults: one micro-batch per step, clipping at 1.0
    optimizer = build_optimizer(model, run.optim)

    def step():
        training_step(model, optimizer, lambda: batch, cross_entropy_objective, amp, run, Topology(), device)

    return model, step


def transformers_step(config: ArgonneConfig, args, batch, device, amp):
    with device:
        model = llama_like(config, args.transformers_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    inputs = batch[:, :-1]

    def step():
        with amp():
            loss = model(inputs, labels=inputs, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def measure(name, build, args, device, flops_per_token, peak, tokens, check_syncs=False, profile_to=None) -> float:
    try:
        return _measure(name, build, args, device, flops_per_token, peak, tokens, check_syncs, profile_to)
    except torch.OutOfMemoryError:
        print(f"{name:<40}{'out of memory':>44}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        return float("nan")


def _measure(name, build, args, device, flops_per_token, peak, tokens, check_syncs, profile_to) -> float:
    model, step = build()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sync_check = device.type == "cuda" and check_syncs
    if sync_check:
        torch.cuda.set_sync_debug_mode("error")
    started = time.perf_counter()
    try:
        for _ in range(args.steps):
            step()
    finally:
        if sync_check:
            torch.cuda.set_sync_debug_mode("default")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.steps
    tokens_per_s = tokens / seconds
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"{name:<40}{seconds * 1000:>10.1f}{tokens_per_s:>14,.0f}{flops_per_token * tokens_per_s / peak:>8.3f}"
          f"{memory:>12.1f}", flush=True)
    if profile_to:
        profile_step(step, profile_to, name)
    del model, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return tokens_per_s


def profile_step(step, path: str, label: str) -> None:
    """Appends the kernel table of one step (after the timed ones), sorted by GPU time, to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    with open(path, "a") as f:
        f.write(f"{label}: one training step\n")
        f.write(prof.key_averages().table(sort_by="self_device_time_total" if torch.cuda.is_available()
                                          else "self_cpu_time_total", row_limit=50, max_name_column_width=90) + "\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each of Argonne's blocks")
    parser.add_argument("--checkpointing", choices=get_args(ActivationCheckpointing), nargs="+", default=["none"],
                        help="Argonne's activation checkpointing; several values measure one Argonne row each")
    parser.add_argument("--transformers-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="transformers' (full) checkpointing; default: on when the first --checkpointing is not "
                             "none")
    parser.add_argument("--check-syncs", action="store_true",
                        help="on a GPU, fail on any host synchronisation inside Argonne's timed steps")
    parser.add_argument("--profile", metavar="FILE",
                        help="append the kernel table of one step of the first Argonne row")
    parser.add_argument("--float8", choices=("tensorwise", "rowwise"), nargs="+", default=[],
                        help="one more Argonne row per FP8 recipe (the first --checkpointing mode); MFU stays over "
                             "the bf16 peak, so FP8 rows can pass 1")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--document-length", type=int, default=0, metavar="N",
                        help="windows of documents of N tokens on average (random lengths, each closed by the "
                             "boundary token), and one more Argonne row with attention_scope = \"document\"")
    args = parser.parse_args()
    if args.transformers_checkpointing is None:
        args.transformers_checkpointing = args.checkpointing[0] != "none"

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
    if args.document_length:  # a boundary after each token with probability 1/N: geometric lengths of mean N
        ends = torch.rand(batch.shape, generator=torch.Generator().manual_seed(0)) < 1 / args.document_length
        batch[ends.to(device)] = config.eos_token_id
    print(f"{args.preset}: batch {args.batch} x {args.seq_len}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, "
          f"measured peak {peak / 1e12:,.1f} TFLOP/s, {flops_per_token / 1e9:,.2f} GFLOPs/token")
    print(f"{'model':<40}{'step ms':>10}{'tokens/s':>14}{'MFU':>8}{'peak GiB':>12}", flush=True)

    ours = {}
    for index, checkpointing in enumerate(args.checkpointing):
        label = "argonne" + (", compiled blocks" if args.compile else "") + (
            f", {checkpointing} ckpt" if checkpointing != "none" else "")
        ours[label] = measure(label, lambda: argonne_step(config, args, checkpointing, batch, device, amp), args,
                              device, flops_per_token, peak, tokens, args.check_syncs,
                              args.profile if index == 0 else None)
    for recipe in args.float8:
        label = "argonne" + (", compiled blocks" if args.compile else "") + (
            f", {args.checkpointing[0]} ckpt" if args.checkpointing[0] != "none" else "") + f", float8 {recipe}"
        ours[label] = measure(label, lambda: argonne_step(config, args, args.checkpointing[0], batch, device, amp,
                                                          recipe), args, device, flops_per_token, peak, tokens)
        bf16 = next(iter(ours))
        print(f"float8 {recipe} / bf16 ({bf16}) tokens/s: {ours[label] / ours[bf16]:.3f}")
    if args.document_length:
        documents = ArgonneConfig.from_preset(args.preset, max_position_embeddings=max(args.seq_len, 128),
                                              attention_scope="document")
        label = "argonne" + (", compiled blocks" if args.compile else "") + ", document attention"
        ours[label] = measure(label, lambda: argonne_step(documents, args, args.checkpointing[0], batch, device, amp),
                              args, device, flops_per_token, peak, tokens)
        causal = next(iter(ours))
        print(f"document attention / causal ({causal}) tokens/s: {ours[label] / ours[causal]:.3f}")
    if not args.skip_transformers:
        label = "transformers Llama" + (", checkpointing" if args.transformers_checkpointing else "")
        theirs = measure(label, lambda: transformers_step(config, args, batch, device, amp), args, device,
                         flops_per_token, peak, tokens)
        for label, tokens_per_s in ours.items():
            print(f"{label} / transformers tokens/s: {tokens_per_s / theirs:.2f}x")


if __name__ == "__main__":
    main()
