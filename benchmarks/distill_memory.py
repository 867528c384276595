"""Peak memory and time of one distillation step on CPU: the loss from the student's logits, forward and backward,
with the chunked `argonne.training.distill.distillation_loss` ("after") and the implementation it replaced ("before",
reproduced below: a whole-batch float32 cross-entropy plus a KL in chunks of positions, both through autograd).

    python benchmarks/distill_memory.py                          # 2 x 1024 positions, vocab 151,665, float32 and bf16
    python benchmarks/distill_memory.py --dtypes float32 --variants   # only the comparison, in float32

(On 2 CPU cores each step takes 15-40 s at the default shape: split a run with --dtypes and --variants.)

Each variant runs in a fresh process: the student's logits (a leaf with requires_grad) and the teacher's (no grad)
are made first, then one step (loss, backward) is timed and its peak memory taken as the process's peak resident
set (getrusage ru_maxrss) less its resident set once the inputs exist; further steps are timed only (the best is
reported). The student's gradient is part of the step's memory. A third process runs both variants on the same
inputs and compares loss, KL, cross-entropy and gradient (torch.allclose, rtol 1e-4 in float32, 2e-2 in bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

GiB = 1024**3


def before_loss(logits, teacher, targets, vocab: int, alpha: float, temperature: float, chunk: int):
    """The distillation loss before the chunked loss (commit 8d77379): (loss, kl, ce)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    scored = targets != -100
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[1], chunk):
        s = (logits[:, start:start + chunk, :vocab].float() / temperature).log_softmax(-1)
        t = (teacher[:, start:start + chunk, :vocab].float() / temperature).log_softmax(-1)
        kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)  # (B, chunk)
        total = total + (kl * scored[:, start:start + chunk]).sum()
    kl = total / scored.sum().clamp(min=1)
    loss = alpha * temperature**2 * kl + (1 - alpha) * ce
    return loss, kl.detach(), ce.detach()


def after_loss(logits, teacher, targets, vocab: int, alpha: float, temperature: float, chunk: int):
    from argonne.training.distill import distillation_loss

    return distillation_loss(logits, teacher, targets, vocab, alpha, temperature, chunk)


VARIANTS = {"before": before_loss, "after": after_loss}


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def make_inputs(args):
    """Student logits (leaf, requires_grad), teacher logits, targets (the last 10% of each row unscored), made in
    place so that no temporary raises the peak before the step."""
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, args.seq_len, args.vocab)
    student = torch.empty(shape, dtype=dtype).normal_(0, 2, generator=generator).requires_grad_(True)
    teacher = torch.empty(shape, dtype=dtype).normal_(0, 2, generator=generator)
    targets = torch.randint(0, args.vocab, shape[:2], generator=generator)
    targets[:, -args.seq_len // 10:] = -100
    return student, teacher, targets


def step(variant: str, args, student, teacher, targets):
    student.grad = None
    loss, kl, ce = VARIANTS[variant](student, teacher, targets, args.vocab, args.alpha, args.temperature, args.chunk)
    loss.backward()
    return loss.detach(), kl, ce


def measure(args) -> None:
    import argonne.training.distill  # noqa: F401  imported before the inputs by both variants: not part of the step

    torch.set_num_threads(args.threads)
    student, teacher, targets = make_inputs(args)
    inputs_rss, inputs_peak = rss_bytes(), peak_rss_bytes()
    started = time.perf_counter()
    step(args.variant, args, student, teacher, targets)
    times = [time.perf_counter() - started]
    peak = peak_rss_bytes()
    for _ in range(args.steps - 1):
        started = time.perf_counter()
        step(args.variant, args, student, teacher, targets)
        times.append(time.perf_counter() - started)
    print(json.dumps({"inputs_rss": inputs_rss, "peak_before_step": inputs_peak, "peak": peak,
                      "extra": peak - inputs_rss, "times": times}))


def check(args) -> None:
    torch.set_num_threads(args.threads)
    student, teacher, targets = make_inputs(args)
    after = step("after", args, student, teacher, targets)
    after_grad, student.grad = student.grad, None
    before = step("before", args, student, teacher, targets)
    tolerance = {"float32": dict(rtol=1e-4, atol=1e-6), "bfloat16": dict(rtol=2e-2, atol=1e-6)}[args.dtype]
    result = {name: [float(a), float(b), torch.allclose(a.float(), b.float(), **tolerance)]
              for name, a, b in zip(("loss", "kl", "ce"), after, before)}
    difference = (after_grad.float() - student.grad.float()).abs().max()
    result["grad"] = [float(difference), float(student.grad.float().abs().max()),
                      torch.allclose(after_grad.float(), student.grad.float(), **tolerance)]
    print(json.dumps(result))


def run(args, mode: str, dtype: str, variant: str = "") -> dict:
    command = [sys.executable, __file__, "--mode", mode, "--dtype", dtype, "--variant", variant or "after",
               "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--vocab", str(args.vocab),
               "--alpha", str(args.alpha), "--temperature", str(args.temperature), "--chunk", str(args.chunk),
               "--steps", str(args.steps), "--threads", str(args.threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151_665, help="logits' last dimension and the real vocabulary")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--chunk", type=int, default=512, help="the loss's chunk (positions before, rows after)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
                        help="variants to measure (none: only the comparison)")
    parser.add_argument("--steps", type=int, default=3, help="steps per variant: the first gives the peak")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-check", action="store_true", help="skip the comparison of the two variants")
    parser.add_argument("--mode", choices=["measure", "check"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "measure":
        return measure(args)
    if args.mode == "check":
        return check(args)

    logits_gib = args.batch * args.seq_len * args.vocab * 4 / GiB
    print(f"student and teacher logits {args.batch} x {args.seq_len} x {args.vocab:,} (float32: {logits_gib:.2f} GiB "
          f"each); alpha {args.alpha}, T {args.temperature}, chunk {args.chunk}; torch {torch.__version__}, "
          f"{args.threads} threads")
    print(f"{'dtype':<9} {'variant':<7} {'peak extra GiB':>14} {'first step s':>12} {'best step s':>11}")
    for dtype in args.dtypes:
        for variant in args.variants:
            r = run(args, "measure", dtype, variant)
            print(f"{dtype:<9} {variant:<7} {r['extra'] / GiB:>14.2f} {r['times'][0]:>12.2f} "
                  f"{min(r['times']):>11.2f}", flush=True)
        if not args.no_check:
            c = run(args, "check", dtype)
            print(f"{dtype}: after vs before: " + "; ".join(
                f"{name} {'allclose' if ok else 'DIFFER'} ({a:.6g} vs {b:.6g})" for name, (a, b, ok) in c.items()
                if name != "grad") + f"; grad {'allclose' if c['grad'][2] else 'DIFFER'} (max |difference| "
                f"{c['grad'][0]:.3g}, max |grad| {c['grad'][1]:.3g})", flush=True)


if __name__ == "__main__":
    main()
