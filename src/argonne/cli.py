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


# name -> function adding the subcommand's parser. Each workflow module adds its own entry.
COMMANDS: dict[str, Callable] = {
    "info": _add_info,
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
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
