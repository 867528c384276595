"""Run configuration: small typed dataclasses, one per concern, loaded from TOML with dotted command-line overrides.

    [model]            preset and field overrides
    [data]             where the tokens come from
    [optim]            the optimizer (AdamW, or Muon with AdamW) and the learning-rate schedule
    [parallel]         tensor parallel degree, sequence parallel, async TP, activation checkpointing, compile
    [checkpoint]       how often to save and how many to keep
    [distill]          teacher, alpha and temperature (argonne distill)
    [train]            the loop: steps, batch, device, logging, output

Every field can be overridden on the command line as `--section.field=value` (the value is read as TOML, so
`--optim.lr=3e-4`, `--data.inputs=["a.parquet"]` and `--train.run_dir=runs/x` all work).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.settings import DocumentSettings, document_problems
from .files import read_text

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
class DataConfig(DocumentSettings):
    """Where the tokens come from. The document settings (text_column, id_column, val_fraction, on_error and the
    filters: see DocumentSettings) are the ones `argonne data prepare` takes; streaming applies them, and prepared
    data keeps those it was made with."""

    inputs: list[str] = field(default_factory=list)
    """Parquet files, folders, globs or hf:// paths to stream from (tokenized on the fly); or use `prepared`."""
    prepared: str = ""
    """Folder written by `argonne data prepare` (memory-mapped token shards); or use `inputs`."""
    sft: list[str] = field(default_factory=list)
    """Instruction data (JSONL or parquet with `messages` or prompt/response) for fine-tuning; or inputs/prepared."""
    packing: bool = True
    """SFT: pack whole conversations into each window (else one conversation per padded window)."""
    tokenizer: str = ""
    """Tokenizer folder or hub name; it must be the one the data was prepared with. Default: model.init_from's own
    tokenizer, else the tiny preset's sample BPE (data/tokenizers/sample-bpe-8k)."""
    seq_len: int = 256
    """Tokens per training sequence (windows hold seq_len + 1 tokens)."""
    shuffle: bool = True
    """Visit prepared windows in a seeded random order (a stream is read in order)."""
    val_windows: int = 32
    """Held-out windows evaluated for the validation loss (0: none)."""
    workers: int = 1
    """Background processes: DataLoader workers (prepared) or tokenizer workers (streaming)."""


LR_SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")


@dataclass
class OptimConfig:
    optimizer: str = "adamw"
    """"adamw": fused AdamW for every parameter. "muon": Muon for the weight matrices of the transformer blocks
    (q/k/v/o, gate/up/down) and AdamW for the embeddings, the output head, norms and biases; both take lr, the
    schedule and weight_decay (Muon's update is scaled to AdamW's RMS, so no second lr is needed)."""
    lr: float = 3e-3
    """Peak learning rate, reached after warmup_steps."""
    min_lr: float = 3e-4
    """Learning rate at the end of the decay."""
    warmup_steps: int = 20
    """Steps of linear warmup from 0 to lr."""
    schedule: str = "cosine"
    """After the warmup: "cosine" decays to min_lr over the remaining steps (the original recipe); "wsd"
    (warmup-stable-decay, as MiniCPM and OLMo 2) holds lr, then decays linearly to min_lr over the last
    decay_fraction of the steps."""
    decay_fraction: float = 0.2
    """"wsd" only: the share of train.steps spent decaying (0.2: the last 20%)."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices; norms, biases and embeddings get none."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    muon_momentum: float = 0.95
    """"muon" only: momentum of Muon's gradient average."""
    muon_nesterov: bool = True
    """"muon" only: orthogonalise the Nesterov look-ahead of the momentum rather than the momentum itself."""
    muon_ns_steps: int = 5
    """"muon" only: Newton-Schulz iterations per matrix and step (5 brings the singular values near 1)."""


ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
FLOAT8_RECIPES = ("off", "tensorwise", "rowwise")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    """Tensor-parallel degree (within a node); the rest of the world is data parallel (FSDP2)."""
    activation_checkpointing: str = "none"
    """Recompute block activations in the backward pass: "none", "full" (keep only block inputs; ~1/3 more compute)
    or "selective" (keep matmul and attention outputs, recompute element-wise ops). true/false mean full/none."""
    compile: bool = False
    """torch.compile each transformer block."""
    float8: str = "off"
    """FP8 matmuls in the blocks' linears (torchao's float8 training): "off", "tensorwise" (one scale per tensor;
    FSDP2 all-gathers the weights in FP8) or "rowwise" (one scale per row: more accurate, a little slower). Needs a
    GPU of compute capability 8.9+ (H100, H200, L40S) and bf16; emulated (slowly) on CPUs. Weights stay in full
    precision: checkpoints are the same with or without it. The output head is never FP8."""
    float8_skip: list[str] = field(default_factory=list)
    """Linears kept in high precision under float8, by module name or pattern ("model.layers.0.*", "*.down_proj");
    "first" and "last" name the first and last blocks. A pattern that matches no linear is an error."""
    sequence_parallel: bool = True
    """Under tensor parallel, shard the activations between the tensor-parallel regions (the residual stream, the
    norms) along the sequence: 1/tensor_parallel of them per rank, all-gather + reduce-scatter instead of all-reduce.
    No effect without tensor_parallel > 1; data.seq_len must then divide by tensor_parallel."""
    async_tp: bool = False
    """Async tensor parallel: inductor overlaps sequence parallel's all-gathers and reduce-scatters with the matmuls
    (micro-pipelined, over symmetric memory). Needs CUDA, compile = true, tensor_parallel > 1 and
    sequence_parallel = true. Off by default: unmeasured on GPUs."""


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
class EvalConfig:
    """lm-evaluation-harness tasks run on the model as it trains (sharded as it is), see docs/evaluation.md."""

    tasks: list[str] = field(default_factory=list)
    """lm-eval task names, e.g. ["hellaswag", "arc_easy"] (empty: no task evaluation during training)."""
    every: int = 0
    """Steps between task evaluations (0: only at the end); there is always one at the end."""
    limit: float = 0.0
    """Documents per task: a count, or a fraction below 1 (0: all)."""
    num_fewshot: int = -1
    """Few-shot examples per prompt (-1: each task's own)."""
    include_path: str = ""
    """Folder of extra task YAML files."""
    batch_size: int = 16
    """Requests per forward pass."""


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
    spike_threshold: float = 0.0
    """Loss-spike detection (0: off; e.g. 6): a finite step loss above the mean of the last spike_window accepted
    losses by this many standard deviations (the spread floored at 1% of the mean) is a spike, and its update is
    skipped like a non-finite one's."""
    spike_window: int = 50
    """Accepted step losses the mean and spread are taken over (detection starts once that many are seen); also
    the span of steps within which spike_rollback_after spikes roll the run back."""
    spike_rollback_after: int = 3
    """Spikes within spike_window steps that roll the run back to its last checkpoint saved before the first of
    them, skipping the batches of the steps from the first spike to the last (recorded in the checkpoints, so a
    resume skips them too). 0: never roll back, only skip the spikes' updates."""
    spike_max_rollbacks: int = 3
    """Stop the run rather than roll back more often than this."""
    z_loss: float = 0.0
    """Coefficient of the z-loss (PaLM, OLMo: 1e-4) added to the cross-entropy: the mean squared log-partition of
    the logits, logged apart as `z_loss` (and the cross-entropy alone as `ce`). 0: off (the original recipe)."""
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
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "parallel": ParallelConfig,
            "checkpoint": CheckpointConfig, "distill": DistillConfig, "eval": EvalConfig, "train": TrainConfig}


def _unknown_names(unknown: list[str], known) -> str:
    """"['lrr'] (did you mean 'lr'?)": the unknown names with the closest known one for each that has one."""
    matches = {name: difflib.get_close_matches(name, list(known), n=1) for name in unknown}
    hints = [repr(match[0]) if len(unknown) == 1 else f"{match[0]!r} for {name!r}"
             for name, match in matches.items() if match]
    return f"{unknown}" + (f" (did you mean {', '.join(hints)}?)" if hints else "")


def _build_section(cls, values, section: str, problems: list[str]):
    """The section's dataclass from its known fields; unknown fields and a section that is no table are problems."""
    if not isinstance(values, dict):
        problems.append(f"[{section}] must be a table of fields, got {values!r}")
        return cls()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        problems.append(f"[{section}] has unknown field(s) {_unknown_names(unknown, known)}; known: {sorted(known)}")
    return cls(**{name: value for name, value in values.items() if name in known})


def build_run_config(values: dict) -> RunConfig:
    """A checked RunConfig from nested dicts (a TOML document); every problem is reported in one ConfigError."""
    problems = []
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        problems.append(f"unknown section(s) {_unknown_names(unknown, SECTIONS)}; known: {sorted(SECTIONS)}")
    config = RunConfig(**{name: _build_section(cls, values.get(name, {}), name, problems)
                          for name, cls in SECTIONS.items()})
    validate(config, problems)
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


def load_run_config(path: str | Path | None, overrides: list[str] = (), command: str | None = None) -> RunConfig:
    """The checked run config of a TOML file (None: the defaults) with `--section.field=value` overrides; with
    `command` (train, sft, distill) also checked for that command."""
    values: dict = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            values = tomllib.loads(read_text(Path(path), ConfigError, "run config"))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: invalid TOML ({error})") from None
    for text in overrides:
        keys, value = parse_override(text)
        target = values
        for depth, key in enumerate(keys[:-1]):
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ConfigError(f"cannot apply {text!r}: {'.'.join(keys[:depth + 1])} is not a table")
        target[keys[-1]] = value
    config = build_run_config(values)
    if command is not None:
        check_command(config, command)
    return config


def _above(low):
    return (lambda value: value > low), f"> {low}"


def _at_least(low):
    return (lambda value: value >= low), f">= {low}"


def _fraction(include_one: bool = False):
    if include_one:
        return (lambda value: 0 <= value <= 1), "in [0, 1]"
    return (lambda value: 0 <= value < 1), "in [0, 1)"


# Numeric fields whose range means something: "section.field" -> (check, what the value must be).
RANGES = {
    "data.seq_len": _above(0),
    "data.val_windows": _at_least(0),
    "data.workers": _at_least(0),
    "optim.lr": _above(0),
    "optim.min_lr": _at_least(0),
    "optim.warmup_steps": _at_least(0),
    "optim.decay_fraction": _fraction(include_one=True),
    "optim.weight_decay": _at_least(0),
    "optim.beta1": _fraction(),
    "optim.beta2": _fraction(),
    "optim.eps": _above(0),
    "optim.grad_clip": _at_least(0),
    "optim.muon_momentum": _fraction(),
    "optim.muon_ns_steps": ((lambda value: 1 <= value <= 20), "in [1, 20]"),
    "parallel.tensor_parallel": _above(0),
    "checkpoint.every": _at_least(0),
    "checkpoint.keep": _at_least(0),
    "distill.alpha": _fraction(include_one=True),
    "distill.temperature": _above(0),
    "distill.chunk": _above(0),
    "eval.every": _at_least(0),
    "eval.limit": _at_least(0),
    "eval.num_fewshot": _at_least(-1),
    "eval.batch_size": _above(0),
    "train.steps": _above(0),
    "train.micro_batch_size": _above(0),
    "train.grad_accum": _above(0),
    "train.seed": ((lambda value: 0 <= value < 2**63), "in [0, 2**63)"),  # numpy: no negative seed; torch: 64 bits
    "train.log_every": _above(0),
    "train.eval_every": _at_least(0),
    "train.max_nonfinite_in_a_row": _at_least(1),
    "train.z_loss": _at_least(0),
    "train.spike_threshold": _at_least(0),
    "train.spike_window": _at_least(2),
    "train.spike_rollback_after": _at_least(0),
    "train.spike_max_rollbacks": _at_least(0),
    "train.peak_tflops": _at_least(0),
    "train.sample_every": _at_least(0),
    "train.sample_tokens": _at_least(0),
}

# String fields with a fixed set of values.
CHOICES = {
    "train.dtype": ("auto", "bfloat16", "float32"),
    "parallel.activation_checkpointing": ACTIVATION_CHECKPOINTING,
    "parallel.float8": FLOAT8_RECIPES,
    "optim.schedule": LR_SCHEDULES,
    "optim.optimizer": OPTIMIZERS,
}


def _expected_type(value, annotation) -> str | None:
    """What `value` should be when it does not match the field annotation `annotation`, else None."""
    is_int = isinstance(value, int) and not isinstance(value, bool)  # TOML's true is no number
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false"
    if annotation is int:
        return None if is_int else "an integer"
    if annotation is float:
        return None if is_int or (isinstance(value, float) and math.isfinite(value)) else "a finite number"
    if annotation is str:
        return None if isinstance(value, str) else "a string"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args == (str,):
        return None if isinstance(value, list) and all(isinstance(v, str) for v in value) else "a list of strings"
    if origin is dict:
        return None if isinstance(value, dict) else "a table such as {name = value}"
    raise TypeError(f"no type check for annotation {annotation}")  # a new kind of config field needs one here


def _check_types(config: RunConfig, problems: list[str]) -> set[str]:
    """Check every field against its annotation; ints given for floats become floats. Returns the fields whose
    type is wrong (so no range check runs on them)."""
    wrong = set()
    for section in dataclasses.fields(config):
        part = getattr(config, section.name)
        for name, annotation in typing.get_type_hints(type(part)).items():
            value = getattr(part, name)
            expected = _expected_type(value, annotation)
            if expected is not None:
                wrong.add(f"{section.name}.{name}")
                problems.append(f"{section.name}.{name} must be {expected}, got {value!r} ({type(value).__name__})")
            elif annotation is float:
                setattr(part, name, float(value))
    return wrong


def _field(config: RunConfig, name: str):
    section, field_name = name.split(".")
    return getattr(getattr(config, section), field_name)


def validate(config: RunConfig, problems: list[str] | None = None) -> None:
    """Check every field's type, then ranges, choices and combinations; raise one ConfigError naming every problem
    (with any `problems` found before)."""
    problems = [] if problems is None else problems
    # Shorthands the config accepts: one input for a list of them, true/false for full/none checkpointing.
    if isinstance(config.data.inputs, str):
        config.data.inputs = [config.data.inputs]
    if isinstance(config.data.sft, str):
        config.data.sft = [config.data.sft]
    if isinstance(config.parallel.activation_checkpointing, bool):
        config.parallel.activation_checkpointing = "full" if config.parallel.activation_checkpointing else "none"
    wrong_type = _check_types(config, problems)
    for name, (in_range, rule) in RANGES.items():
        value = _field(config, name)
        if name not in wrong_type and not in_range(value):
            problems.append(f"{name} must be {rule}, got {value}")
    for name, choices in CHOICES.items():
        value = _field(config, name)
        if name not in wrong_type and value not in choices:
            problems.append(f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")
    problems.extend(document_problems(config.data, "data.", skip=wrong_type))
    if not {"optim.lr", "optim.min_lr"} & wrong_type and config.optim.min_lr > config.optim.lr:
        problems.append(f"optim.min_lr ({config.optim.min_lr}) must not exceed optim.lr ({config.optim.lr})")
    problems.extend(float8_problems(config, wrong_type))
    if "eval.limit" not in wrong_type and config.eval.limit >= 1 and config.eval.limit != int(config.eval.limit):
        problems.append(f"eval.limit must be a count (1, 2, ...) or a fraction below 1, got {config.eval.limit}")
    if (config.train.spike_threshold and config.train.spike_rollback_after and not config.checkpoint.every
            and not {"train.spike_threshold", "train.spike_rollback_after", "checkpoint.every"} & wrong_type):
        problems.append("train.spike_rollback_after needs checkpoint.every > 0: a rollback returns to the last "
                        "checkpoint saved before the spikes (or set train.spike_rollback_after = 0)")
    problems.extend(parallel_problems(config, wrong_type))
    if "train.run_dir" not in wrong_type and not config.train.run_dir.strip():
        problems.append("train.run_dir is empty (an unset variable?): name the run's folder")
    if sum(map(bool, (config.data.inputs, config.data.prepared, config.data.sft))) != 1:
        problems.append("set exactly one of data.inputs (stream from parquet), data.prepared (prepared folder) "
                        "and data.sft (instruction data)")
    if problems:
        raise ConfigError("invalid run config: " + "; ".join(problems))


def float8_problems(config: RunConfig, wrong_type: set[str]) -> list[str]:
    """FP8 matmuls (torch._scaled_mm) need every dimension to divide by 16, the tokens of a micro-batch too (the
    inner dimension of the weight gradient); and torchao, checked before the run folder is touched. float8_skip
    means nothing with FP8 off."""
    if config.parallel.float8 == "off":
        return ["parallel.float8_skip is set but parallel.float8 is \"off\": set parallel.float8 to \"tensorwise\" "
                "or \"rowwise\", or remove float8_skip"] if config.parallel.float8_skip else []
    if {"parallel.float8", "train.micro_batch_size", "data.seq_len"} & wrong_type:
        return []
    problems = []
    tokens = config.train.micro_batch_size * config.data.seq_len
    if tokens % 16:
        problems.append(f"parallel.float8 needs train.micro_batch_size x data.seq_len ({config.train.micro_batch_size}"
                        f" x {config.data.seq_len} = {tokens}) to divide by 16 (FP8 matmuls multiply by the tokens)")
    if importlib.util.find_spec("torchao") is None:
        problems.append("parallel.float8 needs torchao: pip install 'argonne[float8]' (or torchao)")
    return problems


def parallel_problems(config: RunConfig, wrong_type: set[str]) -> list[str]:
    """What sequence parallel and async TP need of the other fields (async TP's CUDA is checked by parallelize)."""
    names = ("parallel.tensor_parallel", "parallel.sequence_parallel", "parallel.async_tp", "parallel.compile",
             "data.seq_len")
    if set(names) & wrong_type:
        return []
    parallel, problems = config.parallel, []
    if parallel.sequence_parallel and parallel.tensor_parallel > 1 and config.data.seq_len % parallel.tensor_parallel:
        problems.append(f"data.seq_len ({config.data.seq_len}) must divide by parallel.tensor_parallel "
                        f"({parallel.tensor_parallel}) with parallel.sequence_parallel = true (each rank keeps "
                        f"1/tensor_parallel of the tokens), or set parallel.sequence_parallel = false")
    if parallel.async_tp:
        missing = [need for need, ok in (("parallel.compile = true", parallel.compile),
                                         ("parallel.tensor_parallel > 1", parallel.tensor_parallel > 1),
                                         ("parallel.sequence_parallel = true", parallel.sequence_parallel)) if not ok]
        if missing:
            problems.append(f"parallel.async_tp needs {', '.join(missing)} (and CUDA), or set "
                            f"parallel.async_tp = false")
    return problems


# What each training command needs of a run config, and what would make it silently train something else.
COMMANDS = ("train", "sft", "distill")


def command_problems(config: RunConfig, command: str) -> list[str]:
    """Problems of `config` for `argonne COMMAND` (train, sft or distill)."""
    problems = []
    if command == "train":
        if config.data.sft:
            problems.append("data.sft is instruction data: fine-tune with `argonne sft`, or use data.inputs / "
                            "data.prepared to pretrain")
        if config.distill.teacher:
            problems.append("distill.teacher is set: distil with `argonne distill`, or remove the [distill] section")
    elif command == "sft":
        if not config.data.sft or not config.model.init_from:
            problems.append("an sft config needs data.sft (instruction files) and model.init_from (starting weights)")
        if config.distill.teacher:
            problems.append("distill.teacher is set: distil with `argonne distill` (it takes data.sft too)")
    elif command == "distill":
        if not config.distill.teacher:
            problems.append("a distill config needs distill.teacher")
        if config.train.z_loss:
            problems.append("train.z_loss is not part of the distillation loss: remove it (or set it to 0)")
    else:
        raise ValueError(f"no training command {command!r}; known: {COMMANDS}")
    return problems


def check_command(config: RunConfig, command: str) -> None:
    problems = command_problems(config, command)
    if problems:
        raise ConfigError(f"invalid run config for argonne {command}: " + "; ".join(problems))
