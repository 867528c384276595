"""Decode tokens/s of Argonne's generator against transformers' `generate()` on the same model, in one run.

    python benchmarks/decode_throughput.py --preset small                 # a GPU: bf16, compiled decode step
    python benchmarks/decode_throughput.py --preset tiny --new-tokens 64  # CPU-sized

Greedy decoding of `--new-tokens` tokens after a random `--prompt-tokens` prompt, batch 1 and batch 16 (by default),
with random weights (speed does not depend on them). transformers runs with its default dynamic cache and with
`cache_implementation="static"`. Each figure is new tokens per second over all rows, after a warm-up run.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = ArgonneConfig.from_preset(args.preset, eos_token_id=None)
    model = ArgonneForCausalLM(config).to(device=device, dtype=dtype).eval()
    generator = Generator(model, _IdTokenizer())
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()):,} parameters, {dtype}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}; "
          f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens, greedy")
    print(f"{'batch':>6}  {'decoder':<44}{'tokens/s':>12}")
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    for batch in args.batches:
        prompt = torch.randint(0, config.vocab_size, (batch, args.prompt_tokens), device=device)
        ours = time_call(lambda: generator.generate_ids(prompt.tolist(), params), device, args.repeats)
        rows = [("argonne Generator (static cache" + (", compiled)" if device.type == "cuda" else ")"), ours)]
        for label, extra in (("transformers generate, dynamic cache", {}),
                             ("transformers generate, static cache", {"cache_implementation": "static"})):
            def hf():
                model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, **extra)
            rows.append((label, time_call(hf, device, args.repeats)))
        for label, seconds in rows:
            print(f"{batch:>6}  {label:<44}{batch * args.new_tokens / seconds:>12,.1f}")


if __name__ == "__main__":
    main()
