"""The `argonne` command: one table of subcommands, each a small function whose docstring is its help."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def cmd_info(args: argparse.Namespace) -> int:
    """Print a preset's (or a saved model folder's) architecture, exact parameter count and FLOPs per token."""
    from .configuration_argonne import PRESETS, ArgonneConfig
    from .metrics import count_parameters, matmul_parameters, training_flops_per_token

    if args.preset in PRESETS:
        config = ArgonneConfig.from_preset(args.preset)
    elif Path(args.preset, "config.json").is_file():
        config = ArgonneConfig.from_pretrained(args.preset)
    else:
        raise SystemExit(
            f"argonne info: {args.preset!r} is neither a preset ({', '.join(PRESETS)}) nor a model folder"
        )
    seq_len = args.seq_len or config.max_position_embeddings
    fields = (
        "vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim "
        "intermediate_size max_position_embeddings norm_type norm_eps mlp_type position_embedding rope_theta "
        "attention_bias mlp_bias tie_word_embeddings"
    ).split()
    print(f"{args.preset}")
    for name in fields:
        if name == "rope_theta" and config.position_embedding != "rope":
            continue
        print(f"  {name:<26}{getattr(config, name)}")
    print(f"  {'parameters':<26}{count_parameters(config):,}")
    print(f"  {'matmul parameters':<26}{matmul_parameters(config):,}")
    print(f"  {'training FLOPs/token':<26}{training_flops_per_token(config, seq_len):,} (sequence {seq_len})")
    return 0


def _add_info(sub) -> None:
    parser = sub.add_parser("info", help=cmd_info.__doc__, description=cmd_info.__doc__)
    parser.add_argument("preset", help="preset name (argonne-2.0, argonne-1.5, argonne-1.0, small, tiny) or folder")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length for attention FLOPs")
    parser.set_defaults(func=cmd_info)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model from a TOML run config; any field can be overridden as --section.field=value."""
    from .config import load_run_config
    from .train import train

    train(load_run_config(args.config, args.overrides))
    return 0


def _add_train(sub) -> None:
    parser = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    parser.add_argument("config", help="TOML run config, e.g. configs/tiny.toml")
    parser.set_defaults(func=cmd_train, accepts_overrides=True)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text from a saved model folder, streaming tokens as they are made."""
    from transformers.utils import logging as hf_logging

    from .generate import generate, load_model, read_prompts

    hf_logging.disable_progress_bar()  # keep the terminal for the generated text
    model, tokenizer = load_model(args.model, args.device)
    for prompt in read_prompts(args.prompt, args.prompt_file):
        print(prompt, end="", flush=True)
        generate(
            model,
            tokenizer,
            prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stream=True,
        )
        print()
    return 0


def _add_generate(sub) -> None:
    parser = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    parser.add_argument("model", help="model folder (e.g. runs/tiny/model)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="file with one prompt per line (default: read stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.set_defaults(func=cmd_generate)


# name -> function adding the subcommand's parser.
COMMANDS: dict[str, Callable] = {
    "info": _add_info,
    "train": _add_train,
    "generate": _add_generate,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="argonne",
        description="Argonne: pretrain, fine-tune, serve and export decoder-only language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # Only `train` takes free-form --section.field=value overrides; anything else unknown is an error.
    if getattr(args, "accepts_overrides", False):
        args.overrides = unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        # User mistakes (bad config, bad data, missing files) end with their message, not a traceback.
        print(f"argonne {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
