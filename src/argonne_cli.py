"""The `argonne` command line: its parser, and the dispatch to the commands in `argonne.cli`.

This module is outside the `argonne` package on purpose. Importing `argonne` registers the model with transformers'
Auto classes, which imports torch and transformers (several seconds); a parser inside the package would pay that
before it could print `--help`. Here parsing needs only the standard library, so `argonne --help` and
`argonne COMMAND --help` are instant, and `argonne.cli` (with the heavy imports) is loaded only to run a command.
Each option's help and default are written here; the commands themselves are `argonne.cli.cmd_*`.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable

from argonne_options import CUDA_DEFAULT_KERNELS, DECODE_KERNELS, DocumentSettings


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions and epilogs: paragraphs (split by blank lines) are filled to the terminal's width, except lists
    (paragraphs with an indented line), which keep their lines. Every option's help ends with its default, unless
    the help already says what the default is, or there is none (None, an off flag, an empty list)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if any(line.startswith(" ") for line in paragraph.splitlines()):
                paragraphs.append("\n".join(indent + line for line in paragraph.splitlines()))
            else:
                lines = self._split_lines(paragraph, width - len(indent))
                paragraphs.append("\n".join(indent + line for line in lines))
        return "\n\n".join(paragraphs)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Option names such as --min-letter-space-fraction are not broken at their hyphens.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        no_default = default is None or default is False or default == [] or default is argparse.SUPPRESS
        if not no_default and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _command(sub, name: str, summary: str, description: str | None = None, func: str | None = None,
             **kwargs) -> argparse.ArgumentParser:
    """A subcommand: `summary` is its line in the parent's list, `description` (default: the summary) heads its own
    --help, and `func` names the argonne.cli function that runs it."""
    parser = sub.add_parser(name, help=summary, description=description or summary, formatter_class=HelpFormatter,
                            **kwargs)
    if func:
        parser.set_defaults(func=func)
    return parser


def _overwrite_option(parser, what: str = "the output") -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} when it already exists; without it an existing output is refused "
                             "and left as it is")


def _add_info(sub) -> None:
    parser = _command(sub, "info", "architecture, exact parameter count and training FLOPs per token",
                      "Print a preset's (or a saved model folder's) architecture, exact parameter count, matmul "
                      "parameter count and training FLOPs per token.", "cmd_info")
    parser.add_argument("preset", help="a preset such as tiny, small or argonne-2.0 (an unknown name lists them all), or a model "
                                        "folder with config.json")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="sequence length for the attention FLOPs (default: the model's context, "
                             "max_position_embeddings)")


OVERRIDES_EPILOG = """\
overrides:
  --section.field=value  any field of the run config, read as TOML, e.g.
                         --train.steps=100 --optim.lr=3e-4
                         --model.overrides="{num_hidden_layers = 2}"; the sections
                         and fields are documented in src/argonne/run_config.py"""


def _add_training_command(sub, name: str, summary: str, description: str, func: str, config_help: str) -> None:
    usage = f"argonne {name} [-h] [--resume auto|PATH] [--overwrite] config [--section.field=value ...]"
    parser = _command(sub, name, summary, description, func, epilog=OVERRIDES_EPILOG, usage=usage)
    parser.add_argument("config", help=config_help)
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the newest complete checkpoint of the run (auto) or from the checkpoint "
                             "folder PATH (default: start a new run)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the earlier run in train.run_dir (checkpoints, metrics, TensorBoard events, "
                             "model) and start fresh; without it a used run folder is refused")
    parser.set_defaults(accepts_overrides=True)


def _add_train(sub) -> None:
    _add_training_command(
        sub, "train", "train a model from a TOML run config",
        "Train a model from a TOML run config (configs/tiny.toml: the CPU quickstart; configs/small.toml, "
        "configs/argonne-2.0.toml). Any field can be overridden as --section.field=value. Runs in one process "
        "(CPU or one GPU) or under torchrun on one or many nodes; writes checkpoints, metrics.jsonl, TensorBoard "
        "events, loss.png and the final model folder to train.run_dir.",
        "cmd_train", "TOML run config, e.g. configs/tiny.toml")


def _add_sft(sub) -> None:
    _add_training_command(
        sub, "sft", "instruction fine-tuning (loss on assistant tokens only)",
        "Fine-tune on instruction data (data.sft) from model.init_from, with the loss on assistant tokens only. "
        "The trainer is `argonne train`'s, so parallelism, checkpoints, resume and metrics work the same.",
        "cmd_sft", "TOML run config with data.sft (instruction files) and model.init_from (starting weights)")


def _add_distill(sub) -> None:
    _add_training_command(
        sub, "distill", "knowledge distillation from a teacher model",
        "Distil a teacher (distill.teacher) into a student (model.preset or model.init_from), minimising "
        "alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy on `argonne train`'s trainer.",
        "cmd_distill", "TOML run config with a [distill] section (teacher, alpha, temperature)")


def _add_plot(sub) -> None:
    parser = _command(sub, "plot", "plot a run's training and validation loss",
                      "Plot a run's training and validation loss against tokens seen, from RUN_DIR/metrics.jsonl, "
                      "and print the image's path.", "cmd_plot")
    parser.add_argument("run_dir", help="run folder (train.run_dir) holding metrics.jsonl")
    parser.add_argument("--output", default=None,
                        help="image file to write (default: RUN_DIR/loss.png, the run's own plot, redrawn)")
    _overwrite_option(parser, "the --output image")


def _add_generate(sub) -> None:
    parser = _command(sub, "generate", "stream a continuation of a prompt",
                      "Generate text from a model folder or training checkpoint, streaming tokens as they are "
                      "made. Each prompt is printed, then its continuation. Without --prompt or --prompt-file, "
                      "prompts are read from stdin, one per non-empty line.", "cmd_generate")
    parser.add_argument("model", help="model folder (e.g. runs/quickstart/model) or training checkpoint folder")
    _tokenizer_option(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="one prompt (default: --prompt-file, else stdin)")
    source.add_argument("--prompt-file", help="file with one prompt per non-empty line (default: read stdin)")
    _sampling_options(parser)


def _tokenizer_option(parser) -> None:
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or hub name, for a model folder that holds none (default: the model "
                             "folder's own)")


def _sampling_options(parser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate per prompt or reply")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the K most likely tokens; 0: all")
    parser.add_argument("--top-p", type=float, default=0.95,
                        help="sample among the most likely tokens whose probabilities reach P; 1.0: all")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="above 1, tokens already in the prompt or output become less likely (CTRL's rule); "
                             "1.0: off")
    parser.add_argument("--stop", action="append", default=[],
                        help="string that ends the text, which is cut before it (repeatable; default: none)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for reproducible samples (default: a different sample each run)")
    parser.add_argument("--device", default="auto", help="auto (a GPU where CUDA is available, else the CPU), cpu, "
                                                         "cuda or cuda:N")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the decode step with torch.compile (default: on CUDA only)")
    _kernels_option(parser)


def _kernels_option(parser) -> None:
    default = "torch" if CUDA_DEFAULT_KERNELS == "torch" else f"{CUDA_DEFAULT_KERNELS} on GPUs, torch elsewhere"
    parser.add_argument("--kernels", choices=DECODE_KERNELS, default=None,
                        help="one-token decoding on torch's kernels (cuBLAS, SDPA) or our Triton kernels for GPUs "
                             f"(gemv: the matmuls; gemv+attention: and the attention); default: {default}")


def _add_chat(sub) -> None:
    parser = _command(sub, "chat", "multi-turn chat through the tokenizer's chat template",
                      "Chat with an instruction-tuned model through its tokenizer's chat template; the history is "
                      "kept within the context. /quit, /exit or Ctrl-D leaves; Ctrl-C during a reply stops that "
                      "reply.", "cmd_chat")
    parser.add_argument("model", help="model folder or training checkpoint folder")
    _tokenizer_option(parser)
    parser.add_argument("--system", default=None, help="system message that opens the conversation (default: none)")
    _sampling_options(parser)


def _add_serve(sub) -> None:
    parser = _command(sub, "serve", "OpenAI-compatible HTTP server",
                      "Serve a model over an OpenAI-compatible HTTP API: GET /health, GET /v1/models, "
                      "POST /v1/completions and POST /v1/chat/completions (both with streaming).", "cmd_serve")
    parser.add_argument("model", help="model folder or training checkpoint folder")
    _tokenizer_option(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 127.0.0.1 serves this machine only")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    parser.add_argument("--api-key", default=None,
                        help="require Authorization: Bearer KEY on every route but /health "
                             "(default: $ARGONNE_API_KEY, if set, else no key; an empty key is refused)")
    parser.add_argument("--max-prompt-tokens", type=int, default=8192,
                        help="longest prompt a request may send, in tokens (the model's context also bounds it)")
    parser.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="largest request body; larger ones get 413 before they are read "
                             "(default: %(default)s bytes = 1 MiB)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="most requests decoded together (default: %(default)s)")
    parser.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                        help="GiB for the KV cache, in blocks of 16 tokens that sequences take as they grow: "
                             "requests wait for blocks when it is full (default: enough for --max-batch sequences "
                             "of --max-model-len tokens)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest sequence, prompt and completion together (default: the model's context)")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="prefill every prompt whole, even where its first blocks of tokens are cached from "
                             "an earlier request (a shared system prompt, few-shot examples)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="most requests waiting to be admitted; past it requests get 429 with Retry-After "
                             "(default: %(default)s)")
    parser.add_argument("--prefill-chunk", type=int, default=512,
                        help="most prompt tokens prefilled between two decode steps, so a long prompt does not "
                             "stall the running requests (default: %(default)s)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM or Ctrl-C, seconds to let requests in flight finish before cancelling "
                             "them (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _kernels_option(parser)


def _add_eval(sub) -> None:
    evaluate = _command(sub, "eval", "evaluate a model (benchmark tasks with lm-eval, perplexity)",
                        "Evaluate a model folder or training checkpoint. `argonne eval tasks MODEL --tasks ...` runs "
                        "EleutherAI's lm-evaluation-harness tasks (HellaSwag, ARC, PIQA, LAMBADA, MMLU... by their "
                        "lm-eval names, or your own task YAML files) on Argonne's model and prints lm-eval's results "
                        "table. `argonne eval perplexity MODEL --data FILES` scores parquet rows or text files with "
                        "a sliding window and prints the perplexity, the token and document counts and the mean "
                        "negative log-likelihood per token. Run `argonne eval tasks --help` or `argonne eval "
                        "perplexity --help` for their options.")
    eval_sub = evaluate.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND", required=True)
    tasks = _command(eval_sub, "tasks", "lm-evaluation-harness tasks (HellaSwag, ARC, MMLU... or your own YAML)",
                     "Run lm-evaluation-harness tasks on a model: an Argonne folder, a training checkpoint of any "
                     "parallel layout, or a Llama / Qwen2 folder. Tasks by their lm-eval names download their "
                     "datasets from the Hugging Face hub; --include-path adds a folder of your own task YAML files "
                     "(as lm_eval's --include_path). Prints lm-eval's results table and, with --output, writes its "
                     "results JSON. Log-likelihood requests are length-sorted and batched, one forward per batch; "
                     "generation requests use Argonne's generator, greedy. bf16 on GPUs, float32 on CPUs.",
                     "cmd_eval_tasks")
    tasks.add_argument("model", help="model folder, Llama/Qwen2 folder or training checkpoint folder")
    tasks.add_argument("--tasks", required=True,
                       help="comma-separated lm-eval task or group names, e.g. hellaswag,arc_easy,piqa")
    tasks.add_argument("--include-path", default=None, help="folder of extra task YAML files")
    tasks.add_argument("--num-fewshot", type=int, default=None,
                       help="few-shot examples per prompt (default: each task's own, usually 0)")
    tasks.add_argument("--limit", type=float, default=None,
                       help="documents per task: a count, or a fraction below 1 (default: all)")
    tasks.add_argument("--batch-size", type=int, default=16, help="requests per forward pass")
    tasks.add_argument("--output", default=None, help="write lm-eval's results JSON to this file")
    _overwrite_option(tasks, "the --output file")
    _tokenizer_option(tasks)
    tasks.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    tasks.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: bf16 on GPUs, float32 on CPUs")
    parser = _command(eval_sub, "perplexity", "perplexity over parquet or text files, with a sliding window",
                      "Perplexity of a model over parquet files (one document per row) or text files (one document "
                      "per file), with a sliding window of configurable stride: every token but a document's "
                      "first is scored once, with up to a window of context. A progress bar runs on stderr.",
                      "cmd_eval_perplexity")
    parser.add_argument("model", help="model folder or training checkpoint folder")
    _tokenizer_option(parser)
    parser.add_argument("--data", nargs="+", required=True,
                        help="parquet files, folders or globs, and/or text files")
    parser.add_argument("--text-column", default="text", help="parquet column holding the text")
    parser.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context)")
    parser.add_argument("--stride", type=int, default=None,
                        help="tokens between window starts; smaller strides give each token more context "
                             "(default: the window, no overlap)")
    parser.add_argument("--max-documents", type=int, default=None, help="stop after N documents (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--output", default=None,
                        help="also write the result (perplexity, tokens, documents, NLL, settings) as JSON to this file")
    _overwrite_option(parser, "the --output file")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _add_export(sub) -> None:
    parser = _command(
        sub, "export", "export a model folder or checkpoint (hf, llama, qwen3 or gguf)",
        "Export a model folder or a training checkpoint (any parallel layout; its shards are consolidated on "
        "the CPU) in one of four formats:\n\n"
        "  hf     an Argonne folder: safetensors, config.json with auto_map, the modeling\n"
        "         code, the tokenizer and generation_config.json; loads with\n"
        "         AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)\n"
        "  llama  a plain transformers LlamaForCausalLM folder (no remote code), for models\n"
        "         Llama can express (RMSNorm, SwiGLU, RoPE, one attention-bias setting: the\n"
        "         argonne-2.0, small and tiny presets); vLLM, lm-eval and llama.cpp's\n"
        "         converters read it; a model with qk_norm is refused (Llama has no QK-norm)\n"
        "  qwen3  a plain transformers Qwen3ForCausalLM folder (no remote code), for the same\n"
        "         architecture with qk_norm = true (Qwen3 always has QK-norm)\n"
        "  gguf   OUTPUT/model.gguf (or OUTPUT itself when it ends in .gguf) for llama.cpp:\n"
        "         llama architecture, the byte-level BPE tokenizer and chat template, q/k\n"
        "         rows reordered for llama.cpp's RoPE; models llama cannot hold are refused",
        "cmd_export")
    parser.add_argument("source", help="model folder or training checkpoint folder")
    _tokenizer_option(parser)
    parser.add_argument("--to", required=True, choices=("hf", "llama", "qwen3", "gguf"),
                        help="output format (see above)")
    parser.add_argument("--output", required=True,
                        help="output folder (gguf: a folder for model.gguf, or a path ending in .gguf)")
    _overwrite_option(parser, "an existing output (the source itself too: it is read whole first)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="weight dtype, one for every format: hf, llama and qwen3 save the weights in it; gguf "
                             "writes BF16, F16 or F32 matrices (norm weights and biases always F32)")


def _add_import(sub) -> None:
    parser = _command(
        sub, "import", "import a Llama, Qwen2, Qwen3 or original Argonne 1.x / 2.0 folder",
        "Import a model folder as an Argonne folder (weights, config.json with auto_map, the modeling code and, "
        "when the source has one, the tokenizer), to continue pretraining or fine-tune it. Sources:\n\n"
        "  - a transformers Llama folder (model_type \"llama\")\n"
        "  - a transformers Qwen2 folder (model_type \"qwen2\"; its q/k/v biases are kept;\n"
        "    sliding-window attention is refused)\n"
        "  - a transformers Qwen3 folder (model_type \"qwen3\"; imported with qk_norm = true;\n"
        "    sliding-window attention is refused)\n"
        "  - an original Argonne 1.x folder (model_type \"argonne\" with GPT-2-style names,\n"
        "    including 1.0's pipeline_stages.<stage>.<block> layout)\n"
        "  - an original Argonne 2.0 folder (model_type \"argonne2\")\n"
        "  - an Argonne folder (model_type \"argonne\"), saved again\n\n"
        "RoPE scaling is refused. Weights are read from safetensors, or from .bin/.pth/.pt files with "
        "torch.load(weights_only=True); a file that needs arbitrary unpickling is refused, never run.",
        "cmd_import")
    parser.add_argument("source", help="folder with config.json and weights (see above)")
    parser.add_argument("--output", required=True, help="folder to write the Argonne model to")
    _overwrite_option(parser, "an existing output folder")


def _document_options(parser) -> None:
    """One flag per DocumentSettings field (--text-column, --min-tokens, ...), with its default and help: the run
    config's [data] section holds the same fields, so a prepare and a stream read one set of settings."""
    from dataclasses import fields

    for setting in fields(DocumentSettings):
        kind = {"int": int, "float": float}.get(str(setting.type), str)
        choices = ("fail", "skip") if setting.name == "on_error" else None
        parser.add_argument(f"--{setting.name.replace('_', '-')}", type=kind, default=setting.default, choices=choices,
                            help=f"{setting.metadata['help']} (data.{setting.name} in a run config)")


def _add_data(sub) -> None:
    data = _command(sub, "data", "prepare and inspect training data",
                    "Training data tools. `argonne data prepare` filters and tokenizes parquet text into packed "
                    "uint32 token shards plus a manifest (resumable): the folder a run config names as "
                    "data.prepared. `argonne data inspect` prints a prepared folder's manifest and filter stats "
                    "and decodes one training window. Run `argonne data prepare --help` or `argonne data inspect "
                    "--help` for their options.")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    prepare = _command(data_sub, "prepare", "filter and tokenize parquet shards into token shards (resumable)",
                       "Filter and tokenize parquet shards into packed uint32 token shards plus a manifest; rerun "
                       "the same command to resume. Texts longer than --ratio-rules-min-chars characters are dropped "
                       "when digits make up more than --max-digit-fraction of their characters, or letters and "
                       "whitespace less than --min-letter-space-fraction; documents with fewer than --min-tokens "
                       "tokens are dropped. The document settings are the fields of a run config's [data] section "
                       "too, so streaming the same inputs with the same settings gives the same tokens. "
                       "--val-fraction holds documents out for validation, chosen by hashing --id-column. The "
                       "document and token counts per reason are printed at the end.",
                       "cmd_data_prepare")
    prepare.add_argument("inputs", nargs="+", help="parquet files, folders, globs or hf://datasets/... paths")
    prepare.add_argument("--tokenizer", required=True, help="tokenizer folder or Hugging Face hub name")
    prepare.add_argument("--output", required=True,
                         help="output folder; rerun the same command (same inputs and settings) to resume")
    _overwrite_option(prepare, "a dataset prepared from other inputs or settings (it stays usable until the new "
                               "one is complete)")
    prepare.add_argument("--seq-len", type=int, default=4096,
                         help="window length recorded in the manifest (data inspect's; training uses the run "
                              "config's data.seq_len)")
    # With 2 cores one worker process only moves the work (and pays its start-up): in-process is faster there.
    cores = os.cpu_count() or 1
    prepare.add_argument("--workers", type=int, default=cores - 1 if cores > 2 else 0,
                         help="tokenizer worker processes; 0: tokenize in this process "
                              "(default: the CPU cores less one, or 0 with 2 cores or fewer; %(default)s here)")
    _document_options(prepare)
    inspect = _command(data_sub, "inspect", "print a prepared dataset's manifest and decode a window",
                       "Print a prepared dataset's manifest (tokenizer, token counts, sources, skipped files) and "
                       "filter stats, and decode the start of one training window.", "cmd_data_inspect")
    inspect.add_argument("directory", help="prepared dataset folder (data prepare's --output)")
    inspect.add_argument("--window", type=int, default=0,
                         help="index of the window to decode (past the last: the last)")
    inspect.add_argument("--seq-len", type=int, default=None, help="window length (default: the manifest's)")
    inspect.add_argument("--show-tokens", type=int, default=200, help="tokens of the window to decode and print")
    inspect.add_argument("--tokenizer", default=None,
                         help="tokenizer to decode with (default: the one named in the manifest)")
    inspect.add_argument("--verify", action="store_true",
                         help="also check every shard against its checksum in the manifest (reads every byte; "
                              "without it, their sizes are checked)")


def _add_tokenizer(sub) -> None:
    tokenizer = _command(sub, "tokenizer", "train tokenizers",
                         "Tokenizer tools. `argonne tokenizer train` trains a byte-level BPE tokenizer on parquet "
                         "text and saves it in Hugging Face format, for `argonne data prepare --tokenizer` and "
                         "data.tokenizer in a run config. Run `argonne tokenizer train --help` for its options.")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", metavar="TOKENIZER_COMMAND", required=True)
    train = _command(tokenizer_sub, "train", "train a byte-level BPE tokenizer on parquet text",
                     "Train a byte-level BPE tokenizer on parquet text and save it in Hugging Face format. Its "
                     "special tokens come first: <|endoftext|> (id 0: document boundary, EOS and padding), "
                     "<|im_start|> and <|im_end|> (ChatML).", "cmd_tokenizer_train")
    train.add_argument("inputs", nargs="+", help="parquet files, folders or globs")
    train.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, special ones included")
    train.add_argument("--output", required=True, help="folder to save the tokenizer in")
    _overwrite_option(train, "an existing output folder")
    train.add_argument("--text-column", default="text", help="parquet column holding the text")


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
        prog="argonne", formatter_class=HelpFormatter,
        description="Argonne: pretrain, fine-tune, serve and export decoder-only language models.",
        epilog="Run `argonne COMMAND --help` for a command's arguments and their defaults.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS.values():
        add(sub)
    return parser


def quiet_library_progress_bars() -> None:
    """transformers' and huggingface_hub's own bars ("Loading weights", "Writing model shards", downloads) would
    clutter every command's output; Argonne's bars (training, data prepare, perplexity) are its own tqdm and stay.
    An explicit HF_HUB_DISABLE_PROGRESS_BARS (0 shows them) is left to decide."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' bars and, through it, huggingface_hub's


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # Only the training commands take free-form --section.field=value overrides; anything else unknown is an error.
    if getattr(args, "accepts_overrides", False):
        args.overrides = unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        from argonne import cli as commands  # here, not at the top: torch, transformers and the registered model

        quiet_library_progress_bars()
        return getattr(commands, args.func)(args)
    except (ValueError, FileNotFoundError) as error:
        # User mistakes (bad config, bad data, missing files) end with their message, not a traceback.
        print(f"argonne {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of our output went away (`argonne info tiny | head -3`): stop quietly, as `cat` would, and keep
        # the interpreter's final flush from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        # Ctrl-C: one line and the shell's status for SIGINT (128 + 2). Training catches SIGINT itself (it saves a
        # checkpoint and exits 0), so this is every other command.
        print(f"\nargonne {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
