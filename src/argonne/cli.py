"""The `argonne` commands: one small function per subcommand, run by `argonne_cli.main`.

The parser (options, help texts, defaults) is `argonne_cli`, outside this package, so that `--help` needs no torch;
it imports this module only to run a command, and this module never imports it back. `python -m argonne` runs the
command line (argonne/__main__.py). The library progress bars are switched off once, in `argonne_cli.main`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
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
        "attention_bias attention_out_bias mlp_bias qk_norm tie_word_embeddings"
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


def _run_training(args: argparse.Namespace, spec_name: str) -> int:
    """Load the run config (with --section.field=value overrides), check it for the command, and train with the
    command's TrainSpec."""
    from .run_config import load_run_config
    from .training.loop import train
    from .training.recovery import TrainingStopped

    config = load_run_config(args.config, args.overrides, command=args.command)
    if spec_name == "distill":
        from .training.distill import DISTILLATION as spec
    else:
        from .training.build import PRETRAINING, SFT

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


def cmd_plot(args: argparse.Namespace) -> int:
    """Plot training and validation loss against tokens seen (RUN_DIR/loss.png)."""
    from .plot import plot_run

    print(plot_run(args.run_dir, args.output, overwrite=args.overwrite))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text from a model folder or training checkpoint, streaming tokens as they are made."""
    from .inference.engine import Engine, EngineSettings
    from .inference.text import read_prompts
    from .loading import open_model

    model, tokenizer = open_model(args.model, args.device, tokenizer=args.tokenizer)
    params = _sampling_params(args)
    prompts = read_prompts(args.prompt, args.prompt_file)
    encoded = [tokenizer(prompt, add_special_tokens=False).input_ids for prompt in prompts]
    context = model.config.max_position_embeddings
    longest = max(len(ids) for ids in encoded) + params.max_new_tokens
    if longest > context:
        raise ValueError(f"prompt ({longest - params.max_new_tokens} tokens) + max_new_tokens "
                         f"({params.max_new_tokens}) exceeds the context window ({context} tokens)")
    # One sequence at a time, its KV cache as long as the longest prompt needs (rounded up, as CUDA graphs of
    # longer caches read more keys per token).
    settings = EngineSettings(max_batch=1, max_len=min(context, -(-longest // 256) * 256))
    engine = Engine(model, tokenizer, settings, compile=args.compile, kernels=args.kernels)
    for prompt, ids in zip(prompts, encoded):
        print(prompt, end="", flush=True)
        engine.stream(ids, params, lambda text: print(text, end="", flush=True))
        print()
    return 0


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
    manifest = prepare_dataset(args.inputs, load_tokenizer(args.tokenizer), args.output, settings,
                               overwrite=args.overwrite)
    print(
        f"{manifest['train_tokens']:,} training and {manifest['val_tokens']:,} validation tokens from "
        f"{len(manifest['shards'])} shard(s) in {args.output}"
    )
    _print_stats(manifest)
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    """Print a prepared dataset's manifest and filter stats, and decode one sample window."""
    from .data.batches import TokenWindows
    from .data.prepare import PreparedTokens, open_prepared
    from .tokenizer import load_tokenizer

    # Every shard's size checked; its checksum with --verify (it reads every byte: minutes for terabytes).
    manifest = open_prepared(args.directory, checksums=args.verify)
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
    print(f"checksums    {'every shard verified' if args.verify else 'not verified (--verify reads every shard)'}")
    tokens = PreparedTokens(args.directory, manifest=manifest)
    seq_len = args.seq_len or manifest["seq_len"]
    tokenizer = load_tokenizer(args.tokenizer or tokenizer_info["name"])
    windows = TokenWindows(tokens, seq_len, len(tokenizer))  # a token id outside the vocabulary is an error
    print(f"windows      {len(windows):,} of {seq_len + 1} tokens (seq_len {seq_len})")
    if len(windows):
        index = min(args.window, len(windows) - 1)
        window = windows[index]
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
    from .outputs import FOLDER, Output
    from .tokenizer import train_bpe_tokenizer

    output = Output(args.output, FOLDER, args.overwrite)
    texts = iter_texts(resolve_parquet_files(args.inputs), args.text_column)
    with output.staged() as staging:
        tokenizer = train_bpe_tokenizer(texts, args.vocab_size, staging)
    print(f"{len(tokenizer):,}-token BPE saved to {output.path}")
    return 0


def _configure_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _sampling_params(args):
    from .inference.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed,
    )


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with an instruction-tuned model through its chat template; history is kept within the context."""
    from .chat import run_chat
    from .inference.engine import Engine, EngineSettings
    from .loading import open_model

    model, tokenizer = open_model(args.model, args.device, tokenizer=args.tokenizer)
    # One conversation: one sequence; each turn's history is a prefix of the next, taken from the prefix cache.
    engine = Engine(model, tokenizer, EngineSettings(max_batch=1), compile=args.compile, kernels=args.kernels)
    run_chat(engine, _sampling_params(args), args.system)
    return 0


def cmd_eval_perplexity(args: argparse.Namespace) -> int:
    """Perplexity of a model over parquet or text files, with a sliding window of configurable stride; with
    --output, the result as JSON too."""
    import json

    from .evaluate import iter_documents, perplexity
    from .loading import open_model
    from .outputs import FILE, Output

    output = Output(args.output, FILE, args.overwrite) if args.output else None  # refused before the work
    model, tokenizer = open_model(args.model, args.device, tokenizer=args.tokenizer)
    result = perplexity(model, tokenizer, iter_documents(args.data, args.text_column), args.window, args.stride,
                        args.max_documents, args.batch_size, progress=True)
    print(f"perplexity {result.value:.4f} over {result.tokens:,} tokens in {result.documents:,} documents "
          f"(mean NLL {result.nll / result.tokens:.4f} nats/token)")
    if output is not None:
        record = {"model": str(args.model), "data": args.data, "window": args.window, "stride": args.stride,
                  "perplexity": result.value, "tokens": result.tokens, "documents": result.documents,
                  "nll": result.nll, "mean_nll": result.nll / result.tokens}
        written = output.write(json.dumps(record, indent=2) + "\n")
        print(f"result written to {written}")
    return 0


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    """lm-evaluation-harness tasks on a model: lm-eval's results table, and its results JSON with --output."""
    from .outputs import FILE, Output

    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise ValueError("--tasks: no task names given")
    output = Output(args.output, FILE, args.overwrite) if args.output else None  # refused before the work
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("benchmark tasks need lm-eval: pip install 'argonne[eval]' (or lm_eval)")
    from .harness import (ArgonneLM, check_tasks, evaluate_tasks, results_table, task_limit, task_manager,
                          write_results)

    limit = task_limit(args.limit, "--limit")
    manager = task_manager(args.include_path, tasks)
    check_tasks(tasks, manager)  # before the model loads
    lm = ArgonneLM(pretrained=args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                   batch_size=args.batch_size)
    results = evaluate_tasks(lm, tasks, num_fewshot=args.num_fewshot, limit=limit, manager=manager)
    print(results_table(results))
    if output is not None:
        print(f"results written to {write_results(results, output)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat completions with streaming)."""
    from .inference.engine import EngineSettings
    from .serve import ServerLimits, serve

    _configure_logging()  # the engine's slots, the warm-up's time, a failed step's traceback

    limits = ServerLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens_limit,
                          max_body_bytes=args.max_body_bytes)
    settings = EngineSettings(max_batch=args.max_batch, max_len=args.max_model_len,
                              kv_cache_memory=args.kv_cache_memory, max_queue=args.max_queue,
                              prefill_chunk=args.prefill_chunk, prefix_caching=not args.no_prefix_caching)
    settings.check()  # before the model loads
    if not args.drain_timeout >= 0:
        raise ValueError(f"--drain-timeout must be >= 0 seconds, got {args.drain_timeout}")
    serve(args.model, args.host, args.port, args.api_key, limits, args.device, args.kernels, args.tokenizer,
          settings, args.drain_timeout)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export an HF folder or a training checkpoint (any parallel layout) as an Argonne folder (hf), a plain
    transformers Llama (llama) or Qwen3 (qwen3) folder, or a llama.cpp GGUF file (gguf)."""
    from .export import export_model

    print(export_model(args.source, args.to, args.output, args.dtype, args.tokenizer, overwrite=args.overwrite))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Import a transformers Llama, Qwen2 or Qwen3 folder, or an original Argonne 1.x / 2.0 folder, as an Argonne
    folder (to continue pretraining or fine-tune)."""
    from .export import import_model

    print(import_model(args.source, args.output, overwrite=args.overwrite))
    return 0
