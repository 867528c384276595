"""The `argonne` command: one table of subcommands, each a small function whose docstring is its help."""

from __future__ import annotations

import argparse
import os
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
        "attention_bias attention_out_bias mlp_bias tie_word_embeddings"
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


def _run_training(args: argparse.Namespace, spec_name: str) -> int:
    """Load the run config (with --section.field=value overrides), check it for the command, and train with the
    command's TrainSpec."""
    from .config import load_run_config
    from .train import TrainingStopped, train

    config = load_run_config(args.config, args.overrides, command=args.command)
    if spec_name == "distill":
        from .distill import DISTILLATION as spec
    else:
        from .train import PRETRAINING, SFT

        spec = SFT if spec_name == "sft" else PRETRAINING
    try:
        train(config, spec, resume=args.resume, overwrite=args.overwrite)
    except TrainingStopped as error:
        print(f"argonne {args.command}: stopped: {error}", file=sys.stderr)
        return 3
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model from a TOML run config; any field can be overridden as --section.field=value."""
    return _run_training(args, "train")


def cmd_sft(args: argparse.Namespace) -> int:
    """Fine-tune on instruction data (data.sft) from model.init_from, with loss on assistant tokens only; the
    trainer is `argonne train`'s, so parallelism, checkpoints, resume and metrics work the same."""
    return _run_training(args, "sft")


def cmd_distill(args: argparse.Namespace) -> int:
    """Distil a teacher (distill.teacher) into a student (model.preset or model.init_from):
    alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy, on `argonne train`'s trainer."""
    return _run_training(args, "distill")


def _add_training_command(sub, name: str, func, config_help: str) -> None:
    parser = sub.add_parser(name, help=func.__doc__, description=func.__doc__)
    parser.add_argument("config", help=config_help)
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the latest complete checkpoint of the run (auto) or from PATH")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the earlier run in train.run_dir (checkpoints, metrics, TensorBoard events, "
                             "model) and start fresh; without it a used run folder is refused")
    parser.set_defaults(func=func, accepts_overrides=True)


def _add_train(sub) -> None:
    _add_training_command(sub, "train", cmd_train, "TOML run config, e.g. configs/tiny.toml")


def _add_sft(sub) -> None:
    _add_training_command(sub, "sft", cmd_sft, "TOML run config with data.sft and model.init_from")


def _add_distill(sub) -> None:
    _add_training_command(sub, "distill", cmd_distill, "TOML run config with a [distill] section")


def cmd_plot(args: argparse.Namespace) -> int:
    """Plot training and validation loss against tokens seen (RUN_DIR/loss.png)."""
    from .plot import plot_run

    print(plot_run(args.run_dir, args.output))
    return 0


def _add_plot(sub) -> None:
    parser = sub.add_parser("plot", help=cmd_plot.__doc__, description=cmd_plot.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--output", default=None, help="default: RUN_DIR/loss.png")
    parser.set_defaults(func=cmd_plot)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text from a model folder or training checkpoint, streaming tokens as they are made."""
    from transformers.utils import logging as hf_logging

    from .generate import Generator, load_model, read_prompts

    hf_logging.disable_progress_bar()  # keep the terminal for the generated text
    model, tokenizer = load_model(args.model, args.device)
    generator = Generator(model, tokenizer, compile=args.compile, kernels=args.kernels)
    params = _sampling_params(args)
    for prompt in read_prompts(args.prompt, args.prompt_file):
        print(prompt, end="", flush=True)
        generator.stream(prompt, params, lambda text: print(text, end="", flush=True))
        print()
    return 0


def _add_generate(sub) -> None:
    parser = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    parser.add_argument("model", help="model folder (e.g. runs/tiny/model) or checkpoint folder")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="file with one prompt per line (default: read stdin)")
    _sampling_options(parser)
    parser.set_defaults(func=cmd_generate)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """Filter and tokenize parquet shards into packed uint32 token shards plus a manifest (resumable)."""
    from dataclasses import fields

    from .data import DataError, DocumentSettings
    from .data.prepare import PrepareSettings, prepare_dataset
    from .data.settings import document_problems
    from .tokenizer import load_tokenizer

    _configure_logging()
    documents = DocumentSettings(**{f.name: getattr(args, f.name) for f in fields(DocumentSettings)})
    problems = document_problems(documents, "--")
    if problems:
        raise DataError("; ".join(p.replace("_", "-") for p in problems))
    settings = PrepareSettings(seq_len=args.seq_len, workers=args.workers, documents=documents)
    manifest = prepare_dataset(args.inputs, load_tokenizer(args.tokenizer), args.output, settings)
    print(
        f"{manifest['train_tokens']:,} training and {manifest['val_tokens']:,} validation tokens from "
        f"{len(manifest['shards'])} shard(s) in {args.output}"
    )
    _print_stats(manifest)
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    """Print a prepared dataset's manifest and filter stats, and decode one sample window."""
    from .data.batches import num_windows, read_window
    from .data.prepare import PreparedTokens, load_manifest
    from .tokenizer import load_tokenizer

    manifest = load_manifest(args.directory)
    tokenizer_info = manifest["tokenizer"]
    print(f"dataset      {args.directory} ({manifest['format']}, {manifest['dtype']})")
    print(f"tokenizer    {tokenizer_info['name']} ({tokenizer_info['vocab_size']:,} tokens, "
          f"vocab sha256 {tokenizer_info['vocab_sha256'][:16]}…), boundary id {manifest['boundary_token_id']}")
    print(f"tokens       {manifest['train_tokens']:,} training, {manifest['val_tokens']:,} validation")
    for source in manifest["sources"]:
        print(f"source       {source['path']} ({source['bytes']:,} bytes, sha256 {str(source['sha256'])[:16]}…)")
    for skipped in manifest["skipped_files"]:
        print(f"skipped      {skipped['path']}: {skipped['reason']}")
    _print_stats(manifest)
    tokens = PreparedTokens(args.directory)
    seq_len = args.seq_len or manifest["seq_len"]
    windows = num_windows(len(tokens), seq_len)
    print(f"windows      {windows:,} of {seq_len + 1} tokens (seq_len {seq_len})")
    if windows:
        index = min(args.window, windows - 1)
        window = read_window(tokens, index, seq_len)
        tokenizer = load_tokenizer(args.tokenizer or tokenizer_info["name"])
        print(f"--- window {index}, first {args.show_tokens} tokens ---")
        print(tokenizer.decode(window[: args.show_tokens].tolist()))
    return 0


def _print_stats(manifest: dict) -> None:
    print(f"{'documents':<18}{'count':>12}{'tokens':>16}")
    for reason, counts in manifest["stats"].items():
        if counts["documents"] or reason in ("kept", "validation"):
            print(f"  {reason:<16}{counts['documents']:>12,}{counts['tokens']:>16,}")


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    """Train a byte-level BPE tokenizer on parquet text and save it in Hugging Face format."""
    from .data.parquet import iter_texts, resolve_parquet_files
    from .tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(
        iter_texts(resolve_parquet_files(args.inputs), args.text_column), args.vocab_size, args.output
    )
    print(f"{len(tokenizer):,}-token BPE saved to {args.output}")
    return 0


def _configure_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _document_options(parser) -> None:
    """One flag per DocumentSettings field (--text-column, --min-tokens, ...): the run config's [data] section
    holds the same fields, so a prepare and a stream read one set of settings."""
    from dataclasses import fields

    from .data.settings import DocumentSettings

    for setting in fields(DocumentSettings):
        kind = {"int": int, "float": float}.get(str(setting.type), str)
        parser.add_argument(f"--{setting.name.replace('_', '-')}", type=kind, default=setting.default,
                            help=setting.metadata["help"] + f" (data.{setting.name} in a run config)")


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="prepare and inspect training data", description="Training data tools.")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    prepare = data_sub.add_parser("prepare", help=cmd_data_prepare.__doc__, description=cmd_data_prepare.__doc__)
    prepare.add_argument("inputs", nargs="+", help="parquet files, folders, globs or hf://datasets/... paths")
    prepare.add_argument("--tokenizer", required=True, help="tokenizer folder or hub name")
    prepare.add_argument("--output", required=True, help="output folder (rerun to resume)")
    prepare.add_argument("--seq-len", type=int, default=4096,
                         help="window length that `data inspect` shows by default (training sets data.seq_len)")
    prepare.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                         help="tokenizer worker processes (0: in this process)")
    _document_options(prepare)
    prepare.set_defaults(func=cmd_data_prepare)
    inspect = data_sub.add_parser("inspect", help=cmd_data_inspect.__doc__, description=cmd_data_inspect.__doc__)
    inspect.add_argument("directory")
    inspect.add_argument("--window", type=int, default=0, help="which window to decode")
    inspect.add_argument("--seq-len", type=int, default=None, help="default: the manifest's")
    inspect.add_argument("--show-tokens", type=int, default=200)
    inspect.add_argument("--tokenizer", default=None, help="default: the one named in the manifest")
    inspect.set_defaults(func=cmd_data_inspect)


def _add_tokenizer(sub) -> None:
    tokenizer = sub.add_parser("tokenizer", help="train tokenizers", description="Tokenizer tools.")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", metavar="TOKENIZER_COMMAND", required=True)
    train = tokenizer_sub.add_parser("train", help=cmd_tokenizer_train.__doc__, description=cmd_tokenizer_train.__doc__)
    train.add_argument("inputs", nargs="+", help="parquet files, folders or globs")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--output", required=True)
    train.add_argument("--text-column", default="text")
    train.set_defaults(func=cmd_tokenizer_train)


def _sampling_options(parser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the decode step (default: on CUDA only)")
    _kernels_option(parser)


def _kernels_option(parser) -> None:
    from .generate import CUDA_DEFAULT_KERNELS, DECODE_KERNELS

    default = "torch" if CUDA_DEFAULT_KERNELS == "torch" else f"{CUDA_DEFAULT_KERNELS} on GPUs, torch elsewhere"
    parser.add_argument("--kernels", choices=DECODE_KERNELS, default=None,
                        help="one-token decoding on torch's kernels (cuBLAS, SDPA) or our Triton kernels for GPUs "
                             f"(gemv: the matmuls; gemv+attention: and the attention); default: {default}")


def _sampling_params(args):
    from .generate import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed,
    )


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with an instruction-tuned model through its chat template; history is kept within the context."""
    from transformers.utils import logging as hf_logging

    from .chat import run_chat
    from .generate import Generator, load_model

    hf_logging.disable_progress_bar()
    model, tokenizer = load_model(args.model, args.device)
    run_chat(Generator(model, tokenizer, compile=args.compile, kernels=args.kernels), _sampling_params(args),
             args.system)
    return 0


def _add_chat(sub) -> None:
    parser = sub.add_parser("chat", help=cmd_chat.__doc__, description=cmd_chat.__doc__)
    parser.add_argument("model", help="model folder or checkpoint folder")
    parser.add_argument("--system", default=None, help="system message")
    _sampling_options(parser)
    parser.set_defaults(func=cmd_chat)


def cmd_eval_perplexity(args: argparse.Namespace) -> int:
    """Perplexity of a model over parquet or text files, with a sliding window of configurable stride."""
    from transformers.utils import logging as hf_logging

    from .evaluate import iter_documents, perplexity
    from .generate import load_model

    hf_logging.disable_progress_bar()
    model, tokenizer = load_model(args.model, args.device)
    result = perplexity(model, tokenizer, iter_documents(args.data, args.text_column), args.window, args.stride,
                        args.max_documents, args.batch_size, progress=True)
    print(f"perplexity {result.value:.4f} over {result.tokens:,} tokens in {result.documents:,} documents "
          f"(mean NLL {result.nll / result.tokens:.4f} nats/token)")
    return 0


def _add_eval(sub) -> None:
    evaluate = sub.add_parser("eval", help="evaluate a model", description="Model evaluation.")
    eval_sub = evaluate.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND", required=True)
    parser = eval_sub.add_parser("perplexity", help=cmd_eval_perplexity.__doc__,
                                 description=cmd_eval_perplexity.__doc__)
    parser.add_argument("model", help="model folder or checkpoint folder")
    parser.add_argument("--data", nargs="+", required=True, help="parquet files/folders/globs or text files")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--window", type=int, default=None, help="tokens per window (default: the context)")
    parser.add_argument("--stride", type=int, default=None, help="tokens between windows (default: the window)")
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--device", default="auto")
    parser.set_defaults(func=cmd_eval_perplexity)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat completions with streaming)."""
    from .serve import ServerLimits, serve

    limits = ServerLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens_limit,
                          max_body_bytes=args.max_body_bytes)
    serve(args.model, args.host, args.port, args.api_key, limits, args.device, args.kernels)
    return 0


def _add_serve(sub) -> None:
    parser = sub.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    parser.add_argument("model", help="model folder or checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require Authorization: Bearer KEY on every route but /health "
                             "(default: $ARGONNE_API_KEY, if set; an empty key is refused)")
    parser.add_argument("--max-prompt-tokens", type=int, default=8192)
    parser.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="largest request body; larger ones get 413 before they are read (default: 1 MiB)")
    parser.add_argument("--device", default="auto")
    _kernels_option(parser)
    parser.set_defaults(func=cmd_serve)


def cmd_export(args: argparse.Namespace) -> int:
    """Export an HF folder or a training checkpoint (any parallel layout) as an Argonne folder (hf) or a plain
    transformers Llama folder (llama)."""
    from .export import export_model

    print(export_model(args.source, args.to, args.output, args.dtype))
    return 0


def _add_export(sub) -> None:
    parser = sub.add_parser("export", help=cmd_export.__doc__, description=cmd_export.__doc__)
    parser.add_argument("source", help="model folder or checkpoint folder")
    parser.add_argument("--to", required=True, choices=("hf", "llama", "gguf"))
    parser.add_argument("--output", required=True)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.set_defaults(func=cmd_export)


def cmd_import(args: argparse.Namespace) -> int:
    """Import a transformers Llama or Qwen2 folder as an Argonne folder (to continue pretraining or fine-tune)."""
    from .export import import_model

    print(import_model(args.source, args.output))
    return 0


def _add_import(sub) -> None:
    parser = sub.add_parser("import", help=cmd_import.__doc__, description=cmd_import.__doc__)
    parser.add_argument("source", help="a transformers Llama or Qwen2 folder")
    parser.add_argument("--output", required=True)
    parser.set_defaults(func=cmd_import)


# name -> function adding the subcommand's parser.
COMMANDS: dict[str, Callable] = {
    "info": _add_info,
    "train": _add_train,
    "sft": _add_sft,
    "distill": _add_distill,
    "plot": _add_plot,
    "generate": _add_generate,
    "chat": _add_chat,
    "serve": _add_serve,
    "eval": _add_eval,
    "export": _add_export,
    "import": _add_import,
    "data": _add_data,
    "tokenizer": _add_tokenizer,
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
    except KeyboardInterrupt:
        # Ctrl-C: one line and the shell's status for SIGINT (128 + 2). Training catches SIGINT itself (it saves a
        # checkpoint and exits 0), so this is every other command.
        print(f"\nargonne {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
