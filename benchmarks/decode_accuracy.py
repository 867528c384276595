"""How close each decode-kernel setting's one-token logits are to a float32 reference, on the same model and tokens.

    python benchmarks/decode_accuracy.py --preset small                     # a GPU: bf16
    TRITON_INTERPRET=1 python benchmarks/decode_accuracy.py --preset tiny --prompt-tokens 32 --new-tokens 16  # CPU

Greedy token agreement between two bf16 decoders says little on a random model (its logits are near-ties, so
rounding parts them early: decode_throughput.py's agreement lines). This compares logits instead: a random
`--prompt-tokens` prompt is prefilled, then `--new-tokens` random tokens are fed one at a time through the
engine's decode step (its model runner, uncompiled; teacher forcing: every setting sees the same tokens, and the
keys read grow to prompt + new tokens, so the attention kernel's key ranges are exercised), and each step's logits
are compared with those of a float32 copy of the model run over the whole sequence at once. Per setting: the
relative L2 error of the logits (mean and worst step) and how often its argmax equals the reference's.
"""

from __future__ import annotations

import argparse
import copy

import torch
from decode_throughput import IdTokenizer, random_model  # beside this script

from argonne import ArgonneForCausalLM
from argonne.inference.engine import Engine, EngineSettings
from argonne.inference.runner import DECODE_KERNELS


@torch.no_grad()
def decode_logits(model: ArgonneForCausalLM, kernels: str, tokens: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
    """Float32 logits (new tokens, V) of the decode steps after the prompt: step i is fed tokens[prompt + i]."""
    total = tokens.shape[1]
    engine = Engine(model, IdTokenizer(), EngineSettings(max_batch=1, max_len=total), compile=False, kernels=kernels)
    runner, host = engine.runner, tokens[0].tolist()
    blocks = list(range(-(-total // runner.block_size)))  # the one sequence's blocks, in order
    runner.set_table(0, blocks)
    runner.prefill([(blocks, 0, host[:prompt_tokens])])
    rows = []
    for index in range(prompt_tokens, total):  # batch row 0 is fed the token at position `index`
        logits, _ = runner.decode(1, torch.tensor([host[index]]), torch.tensor([index]))
        rows.append(logits[0].float().clone())
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--kernels", nargs="+", choices=DECODE_KERNELS, default=list(DECODE_KERNELS))
    args = parser.parse_args()

    model = random_model(args.preset)
    config, device, dtype = model.config, model.device, model.dtype
    tokens = torch.randint(0, config.vocab_size, (1, args.prompt_tokens + args.new_tokens), device=device)
    with torch.no_grad():  # logits at prompt + i predict the token after the one fed at step i
        reference = copy.deepcopy(model).float()(tokens).logits[0, args.prompt_tokens:].float()
    print(f"{args.preset}, {dtype}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}: prompt {args.prompt_tokens}, {args.new_tokens} decode steps against float32")
    print(f"{'kernels':<16}{'mean rel. error':>16}{'worst step':>12}{'argmax = float32':>18}")
    for kernels in args.kernels:
        ours = decode_logits(copy.deepcopy(model), kernels, tokens, args.prompt_tokens)
        errors = (ours - reference).norm(dim=-1) / reference.norm(dim=-1)
        same = (ours.argmax(-1) == reference.argmax(-1)).float().mean()
        print(f"{kernels:<16}{errors.mean():>16.2e}{errors.max():>12.2e}{same:>18.1%}", flush=True)


if __name__ == "__main__":
    main()
