"""Run configuration: small typed dataclasses, one per concern, loaded from TOML with dotted command-line overrides.

    [model]            preset and field overrides
    [data]             where the tokens come from
    [optim]            AdamW and the learning-rate schedule
    [parallel]         tensor parallel degree, activation checkpointing, compile
    [checkpoint]       how often to save and how many to keep
    [distill]          teacher, alpha and temperature (argonne distill)
    [train]            the loop: steps, batch, device, logging, output

Every field can be overridden on the command line as `--section.field=value` (the value is read as TOML, so
`--optim.lr=3e-4`, `--data.inputs=["a.parquet"]` and `--train.run_dir=runs/x` all work).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad run configuration; the message names the section and field."""


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Name of an Argonne preset (argonne-2.0, argonne-1.5, argonne-1.0, small, tiny)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Preset fields to change, e.g. {num_hidden_layers = 2}."""
    init_from: str = ""
    """Start from these weights (a Hugging Face folder or a training checkpoint) instead of a fresh preset; every
    weight must be present and of the right shape. The folder's config replaces preset and overrides."""


@dataclass
class DataConfig:
    inputs: list[str] = field(default_factory=list)
    """Parquet files, folders, globs or hf:// paths to stream from (tokenized on the fly); or use `prepared`."""
    prepared: str = ""
    """Folder written by `argonne data prepare` (memory-mapped token shards); or use `inputs`."""
    sft: list[str] = field(default_factory=list)
    """Instruction data (JSONL or parquet with `messages` or prompt/response) for fine-tuning; or inputs/prepared."""
    packing: bool = True
    """SFT: pack whole conversations into each window (else one conversation per padded window)."""
    tokenizer: str = "data/tokenizers/sample-bpe-8k"
    """Tokenizer folder or hub name; it must be the one the data was prepared with."""
    text_column: str = "text"
    """Parquet column holding the document text (streaming)."""
    seq_len: int = 256
    """Tokens per training sequence (windows hold seq_len + 1 tokens)."""
    shuffle: bool = True
    """Visit prepared windows in a seeded random order (a stream is read in order)."""
    val_fraction: float = 0.0
    """Streaming: fraction of documents held out for validation, chosen by id hash as in prepare."""
    val_windows: int = 32
    """Held-out windows evaluated for the validation loss (0: none)."""
    workers: int = 1
    """Background processes: DataLoader workers (prepared) or tokenizer workers (streaming)."""
    on_error: str = "fail"
    """Streaming: "fail" on bad input, or "skip" it with a logged count."""


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate, reached after warmup_steps."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20
    """Steps of linear warmup from 0 to lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices; norms, biases and embeddings get none."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""


ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    """Tensor-parallel degree (within a node); the rest of the world is data parallel (FSDP2)."""
    activation_checkpointing: str = "none"
    """Recompute block activations in the backward pass: "none", "full" (keep only block inputs; ~1/3 more compute)
    or "selective" (keep matmul and attention outputs, recompute element-wise ops). true/false mean full/none."""
    compile: bool = False
    """torch.compile each transformer block."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep: int = 3
    """Complete checkpoints kept; older ones are deleted after each good save (0 keeps all)."""


@dataclass
class DistillConfig:
    teacher: str = ""
    """Teacher model: a Hugging Face folder (any causal LM) or an Argonne checkpoint. Empty: no distillation."""
    alpha: float = 0.5
    """Weight of the soft (KL) term; 1 - alpha weighs the cross-entropy on the data."""
    temperature: float = 1.0
    """Softmax temperature of both distributions; the KL term is scaled by T^2."""
    chunk: int = 512
    """Positions per float32 KL chunk (bounds the memory of the soft term)."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/tiny"
    """Output folder: checkpoints/, metrics.jsonl, TensorBoard events, loss.png and the final model/."""
    steps: int = 200
    """Optimizer steps."""
    micro_batch_size: int = 16
    """Sequences per forward/backward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seed: int = 0
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"."""
    dtype: str = "auto"
    """Compute dtype: "auto" (bfloat16 autocast on CUDA, float32 on CPU), "bfloat16" or "float32"."""
    log_every: int = 10
    """Steps between metric lines."""
    eval_every: int = 50
    """Steps between validation losses (0: only at the end)."""
    max_nonfinite_in_a_row: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient norm (each one is skipped)."""
    peak_tflops: float = 0.0
    """Peak matmul TFLOP/s of one device for MFU; 0 measures it at start."""
    tensorboard: bool = True
    """Write TensorBoard events to run_dir/tensorboard."""
    sample_every: int = 0
    """Steps between greedy sample generations from sample_prompt (0: never)."""
    sample_prompt: str = "The"
    sample_tokens: int = 32


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build_section(cls, values: dict, section: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"[{section}] has unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def build_run_config(values: dict) -> RunConfig:
    sections = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; known: {sorted(sections)}")
    classes = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "parallel": ParallelConfig,
               "checkpoint": CheckpointConfig, "distill": DistillConfig, "train": TrainConfig}
    config = RunConfig(**{name: _build_section(classes[name], values.get(name, {}), name) for name in classes})
    validate(config)
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """`--section.field=value` -> (["section", "field"], value parsed as TOML, or the raw string)."""
    if not text.startswith("--") or "=" not in text:
        raise ConfigError(f"override {text!r} must look like --section.field=value")
    key, raw = text[2:].split("=", 1)
    path = key.split(".")
    if len(path) < 2:
        raise ConfigError(f"override {text!r} must name a section and a field, e.g. --train.steps=100")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    values: dict = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: invalid TOML ({error})") from None
    for text in overrides:
        keys, value = parse_override(text)
        target = values
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = value
    return build_run_config(values)


def validate(config: RunConfig) -> None:
    problems = []
    positive = {
        "data.seq_len": config.data.seq_len,
        "train.steps": config.train.steps,
        "train.micro_batch_size": config.train.micro_batch_size,
        "train.grad_accum": config.train.grad_accum,
        "train.log_every": config.train.log_every,
        "optim.lr": config.optim.lr,
        "parallel.tensor_parallel": config.parallel.tensor_parallel,
    }
    problems += [f"{name} must be > 0, got {value}" for name, value in positive.items() if value <= 0]
    if config.optim.min_lr > config.optim.lr:
        problems.append(f"optim.min_lr ({config.optim.min_lr}) must not exceed optim.lr ({config.optim.lr})")
    if config.optim.warmup_steps < 0:
        problems.append(f"optim.warmup_steps must be >= 0, got {config.optim.warmup_steps}")
    if config.train.dtype not in ("auto", "bfloat16", "float32"):
        problems.append(f"train.dtype must be auto, bfloat16 or float32, got {config.train.dtype!r}")
    if isinstance(config.data.inputs, str):
        config.data.inputs = [config.data.inputs]
    if isinstance(config.data.sft, str):
        config.data.sft = [config.data.sft]
    if sum(map(bool, (config.data.inputs, config.data.prepared, config.data.sft))) != 1:
        problems.append("set exactly one of data.inputs (stream from parquet), data.prepared (prepared folder) "
                        "and data.sft (instruction data)")
    checkpointing = config.parallel.activation_checkpointing
    if isinstance(checkpointing, bool):
        config.parallel.activation_checkpointing = "full" if checkpointing else "none"
    elif checkpointing not in ACTIVATION_CHECKPOINTING:
        problems.append(f"parallel.activation_checkpointing must be none, full or selective, got {checkpointing!r}")
    if config.data.on_error not in ("fail", "skip"):
        problems.append(f"data.on_error must be fail or skip, got {config.data.on_error!r}")
    if problems:
        raise ConfigError("invalid run config: " + "; ".join(problems))
