"""Decode tokens/s of Argonne's generator against transformers' `generate()` on the same model, in one run.

    python benchmarks/decode_throughput.py --preset small                 # a GPU: bf16, compiled decode step
    python benchmarks/decode_throughput.py --preset tiny --new-tokens 64  # CPU-sized

Greedy decoding of `--new-tokens` tokens after a random `--prompt-tokens` prompt, batch 1 and batch 16 (by default),
with random weights (speed does not depend on them). Argonne's Generator runs as `argonne generate` does;
transformers runs with its default dynamic cache and with `cache_implementation="static"`. Each figure is new tokens
per second over all rows, after a warm-up run. The agreement line compares the greedy tokens of the first row with
transformers' (bf16 rounding parts them early on a random model, whose logits are near-ties).
`--variants` adds Argonne rows for what-if settings of the decode step (`argonne generate` uses neither yet): a copy
of the model with merged projections (`merge_projections`: one matmul for q/k/v and one for gate/up) and/or other
Inductor settings. `--profile FILE` appends, per variant, a kernel table of one batch-1
generation and the GPU busy time per token.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from argonne import ArgonneConfig, ArgonneForCausalLM
from argonne.generate import Generator, SamplingParams


class _IdTokenizer:
    eos_token_id = None


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    _synchronize(device)
    return (time.perf_counter() - started) / repeats


def profile_generation(generate, path: str, new_tokens: int, label: str) -> None:
    """Appends the kernel table of one generation to `path`."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        generate()
        _synchronize(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        wall = time.perf_counter() - started
    events = prof.key_averages()
    on_gpu = [e for e in events if e.device_type == DeviceType.CUDA]  # kernels, copies, memsets: no double counting
    busy_us = sum(e.self_device_time_total for e in on_gpu)
    kernels = sum(e.count for e in on_gpu)
    with open(path, "a") as f:
        f.write(f"{label}: wall per token {wall / new_tokens * 1e6:,.1f} us (profiled); GPU busy per token "
                f"{busy_us / new_tokens:,.1f} us; GPU ops per token {kernels / new_tokens:,.1f}\n\n")
        f.write(events.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=90) + "\n\n")
    print(f"profile of {label}: GPU busy {busy_us / new_tokens:,.1f} us per token, "
          f"{kernels / new_tokens:,.1f} GPU ops per token, wall {wall / new_tokens * 1e6:,.1f} us per token -> {path}",
          flush=True)


# Inductor settings worth measuring for a one-token step whose matmuls are matrix-vector products.
INDUCTOR_SETTINGS = {
    "max-autotune": {"max_autotune": True, "coordinate_descent_tuning": True},  # Triton matmul templates too
    "decompose-mm": {"decompose_mem_bound_mm": True},  # small matmuls as fusable multiply-and-sum kernels
}
VARIANTS = {name: (False, options) for name, options in INDUCTOR_SETTINGS.items()} | {"merged": (True, {})} | {
    f"merged+{name}": (True, options) for name, options in INDUCTOR_SETTINGS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--profile", metavar="FILE", help="append kernel tables of one batch-1 generation per variant")
    parser.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), default=[])
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = ArgonneConfig.from_preset(args.preset, eos_token_id=None)
    model = ArgonneForCausalLM(config).to(device=device, dtype=dtype).eval()
    generators = [("argonne Generator (static cache" + (", CUDA graphs)" if device.type == "cuda" else ")"),
                   Generator(model, _IdTokenizer()), {})]
    merged_model = None
    for name in args.variants:  # each compiles its own step, under its settings
        merge, options = VARIANTS[name]
        if merge and merged_model is None:
            merged_model = copy.deepcopy(model)
            merged_model.merge_projections()
        generators.append((f"argonne Generator, {name}", Generator(merged_model if merge else model, _IdTokenizer(),
                                                                     compile=True), options))
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()):,} parameters, {dtype}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}; "
          f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens, greedy", flush=True)
    print(f"{'batch':>6}  {'decoder':<44}{'tokens/s':>12}", flush=True)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    for batch in args.batches:
        prompt = torch.randint(0, config.vocab_size, (batch, args.prompt_tokens), device=device)
        outputs = {}
        for label, generator, options in generators:
            def ours(generator=generator, label=label, options=options):
                with torch._inductor.config.patch(options):
                    outputs[label] = generator.generate_ids(prompt.tolist(), params)
            try:
                report(batch, label, time_call(ours, device, args.repeats), args.new_tokens)
            except Exception as error:  # a what-if setting that does not compile here is a finding, not the end
                if not options:
                    raise
                print(f"{batch:>6}  {label}: failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
                continue
            if args.profile and batch == 1:
                profile_generation(ours, args.profile, args.new_tokens, label)
        if args.skip_transformers:
            continue
        for label, extra in (("transformers generate, dynamic cache", {}),
                             ("transformers generate, static cache", {"cache_implementation": "static"})):
            def hf(extra=extra, label=label):
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, **extra)
                outputs[label] = out[:, args.prompt_tokens:].tolist()
            report(batch, label, time_call(hf, device, args.repeats), args.new_tokens)
        reference = outputs["transformers generate, dynamic cache"][0]
        for label in (label for label, _, _ in generators if label in outputs):
            ours = outputs[label][0]
            same = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), len(reference))
            print(f"{batch:>6}  {label}: first {same} of {len(reference)} greedy tokens equal transformers'",
                  flush=True)


def report(batch: int, label: str, seconds: float, new_tokens: int) -> None:
    print(f"{batch:>6}  {label:<44}{batch * new_tokens / seconds:>12,.1f}", flush=True)


if __name__ == "__main__":
    main()
