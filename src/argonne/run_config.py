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

Each field declares its type, range and choices (pydantic); rules between fields are validators of their section,
or of RunConfig when they span sections. `build_run_config` turns pydantic's errors into one ConfigError that names
every bad key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import sys
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveInt, ValidationError,
                      field_validator, model_validator)
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo

from .data.settings import DocumentSettings, document_problems
from .files import read_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad run configuration; the message names the section and field."""


# Strict: TOML's 2.5, "abc" or true is no integer, and a string is no number (an int is accepted for a float).
SECTION = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
Fraction = Annotated[float, Field(ge=0, lt=1)]
Share = Annotated[float, Field(ge=0, le=1)]
PositiveFloat = Annotated[float, Field(gt=0)]

LRSchedule = Literal["cosine", "wsd"]
Optimizer = Literal["adamw", "muon"]
ActivationCheckpointing = Literal["none", "full", "selective"]
Float8Recipe = Literal["off", "tensorwise", "rowwise"]


@dataclass(config=SECTION)
class ModelSection:
    preset: str = "tiny"
    """Name of an Argonne preset (argonne-2.0, argonne-1.5, argonne-1.0, small, tiny)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Preset fields to change, e.g. {num_hidden_layers = 2}."""
    init_from: str = ""
    """Start from these weights (a Hugging Face folder or a training checkpoint) instead of a fresh preset; every
    weight must be present and of the right shape. The folder's config replaces preset and overrides."""


@dataclass(config=SECTION)
class DataSection(DocumentSettings):
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
    seq_len: PositiveInt = 256
    """Tokens per training sequence (windows hold seq_len + 1 tokens)."""
    shuffle: bool = True
    """Visit prepared windows in a seeded random order (a stream is read in order)."""
    val_windows: NonNegativeInt = 32
    """Held-out windows evaluated for the validation loss (0: none)."""
    workers: NonNegativeInt = 1
    """Background processes: DataLoader workers (prepared) or tokenizer workers (streaming)."""

    @field_validator("inputs", "sft", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_document_settings(self):
        # The document settings' rules live with them: `argonne data prepare` checks its flags by the same ones.
        problems = document_problems(self, "data.")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass(config=SECTION)
class OptimSection:
    optimizer: Optimizer = "adamw"
    """"adamw": fused AdamW for every parameter. "muon": Muon for the weight matrices of the transformer blocks
    (q/k/v/o, gate/up/down) and AdamW for the embeddings, the output head, norms and biases; both take lr, the
    schedule and weight_decay (Muon's update is scaled to AdamW's RMS, so no second lr is needed)."""
    lr: PositiveFloat = 3e-3
    """Peak learning rate, reached after warmup_steps."""
    min_lr: NonNegativeFloat = 3e-4
    """Learning rate at the end of the decay."""
    warmup_steps: NonNegativeInt = 20
    """Steps of linear warmup from 0 to lr."""
    schedule: LRSchedule = "cosine"
    """After the warmup: "cosine" decays to min_lr over the remaining steps (the original recipe); "wsd"
    (warmup-stable-decay, as MiniCPM and OLMo 2) holds lr, then decays linearly to min_lr over the last
    decay_fraction of the steps."""
    decay_fraction: Share = 0.2
    """"wsd" only: the share of train.steps spent decaying (0.2: the last 20%)."""
    weight_decay: NonNegativeFloat = 0.1
    """Decoupled weight decay for matrices; norms, biases and embeddings get none."""
    beta1: Fraction = 0.9
    beta2: Fraction = 0.95
    eps: PositiveFloat = 1e-8
    grad_clip: NonNegativeFloat = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    muon_momentum: Fraction = 0.95
    """"muon" only: momentum of Muon's gradient average."""
    muon_nesterov: bool = True
    """"muon" only: orthogonalise the Nesterov look-ahead of the momentum rather than the momentum itself."""
    muon_ns_steps: Annotated[int, Field(ge=1, le=20)] = 5
    """"muon" only: Newton-Schulz iterations per matrix and step (5 brings the singular values near 1)."""

    @model_validator(mode="after")
    def _check_decay_ends_below_the_peak(self):
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr ({self.min_lr}) must not exceed optim.lr ({self.lr})")
        return self


@dataclass(config=SECTION)
class ParallelSection:
    tensor_parallel: PositiveInt = 1
    """Tensor-parallel degree (within a node); the rest of the world is data parallel (FSDP2)."""
    activation_checkpointing: ActivationCheckpointing = "none"
    """Recompute block activations in the backward pass: "none", "full" (keep only block inputs; ~1/3 more compute)
    or "selective" (keep matmul and attention outputs, recompute element-wise ops). true/false mean full/none."""
    compile: bool = False
    """torch.compile each transformer block."""
    float8: Float8Recipe = "off"
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

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _true_means_full(cls, value):
        return ("full" if value else "none") if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _check_float8_and_async_tp(self):
        problems = []
        if self.float8 == "off" and self.float8_skip:
            problems.append("parallel.float8_skip is set but parallel.float8 is \"off\": set parallel.float8 to "
                            "\"tensorwise\" or \"rowwise\", or remove float8_skip")
        # Checked before the run folder is touched, not when the model is built.
        if self.float8 != "off" and importlib.util.find_spec("torchao") is None:
            problems.append("parallel.float8 needs torchao: pip install 'argonne[float8]' (or torchao)")
        # async TP's CUDA is checked by parallelize.
        missing = [need for need, ok in (("parallel.compile = true", self.compile),
                                         ("parallel.tensor_parallel > 1", self.tensor_parallel > 1),
                                         ("parallel.sequence_parallel = true", self.sequence_parallel)) if not ok]
        if self.async_tp and missing:
            problems.append(f"parallel.async_tp needs {', '.join(missing)} (and CUDA), or set "
                            f"parallel.async_tp = false")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass(config=SECTION)
class CheckpointSection:
    every: NonNegativeInt = 0
    """Steps between checkpoints (0: only at the end)."""
    keep: NonNegativeInt = 3
    """Complete checkpoints kept; older ones are deleted after each good save (0 keeps all)."""


@dataclass(config=SECTION)
class DistillSection:
    teacher: str = ""
    """Teacher model: a Hugging Face folder (any causal LM) or an Argonne checkpoint. Empty: no distillation."""
    alpha: Share = 0.5
    """Weight of the soft (KL) term; 1 - alpha weighs the cross-entropy on the data."""
    temperature: PositiveFloat = 1.0
    """Softmax temperature of both distributions; the KL term is scaled by T^2."""
    chunk: PositiveInt = 512
    """Positions per float32 KL chunk (bounds the memory of the soft term)."""


@dataclass(config=SECTION)
class EvalSection:
    """lm-evaluation-harness tasks run on the model as it trains (sharded as it is), see docs/evaluation.md."""

    tasks: list[str] = field(default_factory=list)
    """lm-eval task names, e.g. ["hellaswag", "arc_easy"] (empty: no task evaluation during training)."""
    every: NonNegativeInt = 0
    """Steps between task evaluations (0: only at the end); there is always one at the end."""
    limit: NonNegativeFloat = 0.0
    """Documents per task: a count, or a fraction below 1 (0: all)."""
    num_fewshot: Annotated[int, Field(ge=-1)] = -1
    """Few-shot examples per prompt (-1: each task's own)."""
    include_path: str = ""
    """Folder of extra task YAML files."""
    batch_size: PositiveInt = 16
    """Requests per forward pass."""

    @field_validator("limit")
    @classmethod
    def _count_or_fraction(cls, limit: float) -> float:
        if limit >= 1 and limit != int(limit):
            raise ValueError(f"eval.limit must be a count (1, 2, ...) or a fraction below 1, got {limit}")
        return limit

    @model_validator(mode="after")
    def _lm_eval_installed(self):
        if self.tasks and importlib.util.find_spec("lm_eval") is None:
            raise ValueError("eval.tasks needs lm-eval: pip install 'argonne[eval]' (or lm_eval)")
        return self


@dataclass(config=SECTION)
class TrainSection:
    run_dir: str = "runs/tiny"
    """Output folder: checkpoints/, metrics.jsonl, TensorBoard events, loss.png and the final model/."""
    steps: PositiveInt = 200
    """Optimizer steps."""
    micro_batch_size: PositiveInt = 16
    """Sequences per forward/backward."""
    grad_accum: PositiveInt = 1
    """Micro-batches per optimizer step."""
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0  # numpy takes no negative seed; torch takes 64 bits
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Compute dtype: "auto" (bfloat16 autocast on CUDA, float32 on CPU), "bfloat16" or "float32"."""
    log_every: PositiveInt = 10
    """Steps between metric lines."""
    eval_every: NonNegativeInt = 50
    """Steps between validation losses (0: only at the end)."""
    max_nonfinite_in_a_row: Annotated[int, Field(ge=1)] = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient norm (each one is skipped)."""
    spike_threshold: NonNegativeFloat = 0.0
    """Loss-spike detection (0: off; e.g. 6): a finite step loss above the mean of the last spike_window accepted
    losses by this many standard deviations (the spread floored at 1% of the mean) is a spike, and its update is
    skipped like a non-finite one's."""
    spike_window: Annotated[int, Field(ge=2)] = 50
    """Accepted step losses the mean and spread are taken over (detection starts once that many are seen); also
    the span of steps within which spike_rollback_after spikes roll the run back."""
    spike_rollback_after: NonNegativeInt = 3
    """Spikes within spike_window steps that roll the run back to its last checkpoint saved before the first of
    them, skipping the batches of the steps from the first spike to the last (recorded in the checkpoints, so a
    resume skips them too). 0: never roll back, only skip the spikes' updates."""
    spike_max_rollbacks: NonNegativeInt = 3
    """Stop the run rather than roll back more often than this."""
    z_loss: NonNegativeFloat = 0.0
    """Coefficient of the z-loss (PaLM, OLMo: 1e-4) added to the cross-entropy: the mean squared log-partition of
    the logits, logged apart as `z_loss` (and the cross-entropy alone as `ce`). 0: off (the original recipe)."""
    peak_tflops: NonNegativeFloat = 0.0
    """Peak matmul TFLOP/s of one device for MFU; 0 measures it at start."""
    tensorboard: bool = True
    """Write TensorBoard events to run_dir/tensorboard."""
    sample_every: NonNegativeInt = 0
    """Steps between greedy sample generations from sample_prompt (0: never)."""
    sample_prompt: str = "The"
    sample_tokens: NonNegativeInt = 32

    @field_validator("run_dir")
    @classmethod
    def _names_a_folder(cls, run_dir: str) -> str:
        if not run_dir.strip():
            raise ValueError("train.run_dir is empty (an unset variable?): name the run's folder")
        return run_dir


@dataclass(config=SECTION)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    distill: DistillSection = field(default_factory=DistillSection)
    eval: EvalSection = field(default_factory=EvalSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @model_validator(mode="after")
    def _check_across_sections(self):
        problems = []
        parallel, seq_len, micro_batch = self.parallel, self.data.seq_len, self.train.micro_batch_size
        # FP8 matmuls (torch._scaled_mm) need every dimension to divide by 16, the tokens of a micro-batch too (the
        # inner dimension of the weight gradient).
        if parallel.float8 != "off" and micro_batch * seq_len % 16:
            problems.append(f"parallel.float8 needs train.micro_batch_size x data.seq_len ({micro_batch} x {seq_len} "
                            f"= {micro_batch * seq_len}) to divide by 16 (FP8 matmuls multiply by the tokens)")
        if parallel.sequence_parallel and parallel.tensor_parallel > 1 and seq_len % parallel.tensor_parallel:
            problems.append(f"data.seq_len ({seq_len}) must divide by parallel.tensor_parallel "
                            f"({parallel.tensor_parallel}) with parallel.sequence_parallel = true (each rank keeps "
                            f"1/tensor_parallel of the tokens), or set parallel.sequence_parallel = false")
        if self.train.spike_threshold and self.train.spike_rollback_after and not self.checkpoint.every:
            problems.append("train.spike_rollback_after needs checkpoint.every > 0: a rollback returns to the last "
                            "checkpoint saved before the spikes (or set train.spike_rollback_after = 0)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


SECTIONS = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "parallel": ParallelSection,
            "checkpoint": CheckpointSection, "distill": DistillSection, "eval": EvalSection, "train": TrainSection}

# What a pydantic type error says the value must be, in TOML's words.
EXPECTED = {"int_type": "an integer", "float_type": "a finite number", "finite_number": "a finite number",
            "bool_type": "true or false", "string_type": "a string", "list_type": "a list of strings",
            "dict_type": "a table such as {name = value}"}
RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _unknown_names(unknown: list[str], known) -> str:
    """"['lrr'] (did you mean 'lr'?)": the unknown names with the closest known one for each that has one."""
    matches = {name: difflib.get_close_matches(name, list(known), n=1) for name in unknown}
    hints = [repr(match[0]) if len(unknown) == 1 else f"{match[0]!r} for {name!r}"
             for name, match in matches.items() if match]
    return f"{unknown}" + (f" (did you mean {', '.join(hints)}?)" if hints else "")


def _bound(number) -> str:
    """A bound as the user reads it: 2**63 rather than 9223372036854775808."""
    if isinstance(number, int) and number > 2**32 and number & (number - 1) == 0:
        return f"2**{number.bit_length() - 1}"
    return str(number)


def _range(info: FieldInfo) -> str:
    """What a field's declared bounds allow: "> 0", ">= -1", "in [0, 1)"."""
    bounds = {name: getattr(rule, name) for rule in info.metadata for name in ("gt", "ge", "lt", "le")
              if hasattr(rule, name)}
    low, opening = ("gt", "(") if "gt" in bounds else ("ge", "[")
    high, closing = ("lt", ")") if "lt" in bounds else ("le", "]")
    if high not in bounds:
        return f"{'>' if low == 'gt' else '>='} {bounds[low]}"
    return f"in {opening}{_bound(bounds[low])}, {_bound(bounds[high])}{closing}"


def _problem(error: dict, section: str, values: dict) -> str:
    """One of pydantic's errors of `section` (built from `values`) as the user's message, naming the key."""
    if error["type"] == "value_error":  # the validators' messages name their keys
        return str(error["ctx"]["error"])
    name = error["loc"][0]
    key, value = f"{section}.{name}", values.get(name)
    if error["type"] == "literal_error":
        choices = error["ctx"]["expected"].replace("'", "")  # "'cosine' or 'wsd'" -> "cosine or wsd"
        return f"{key} must be {choices}, got {value!r}"
    if error["type"] in RANGE_ERRORS:
        return f"{key} must be {_range(SECTIONS[section].__pydantic_fields__[name])}, got {value}"
    if error["type"] in EXPECTED or len(error["loc"]) > 1:  # (name, index): an item of a list of strings
        expected = "a list of strings" if len(error["loc"]) > 1 else EXPECTED[error["type"]]
        return f"{key} must be {expected}, got {value!r} ({type(value).__name__})"
    return f"{key}: {error['msg']}, got {value!r}"


def _build_section(section: str, values, problems: list[str]):
    """The section from its table, or None with its problems added (unknown fields first, then one per field)."""
    if not isinstance(values, dict):
        problems.append(f"[{section}] must be a table of fields, got {values!r}")
        return None
    try:
        return SECTIONS[section](**values)
    except ValidationError as error:
        errors = error.errors()
    unknown = sorted(e["loc"][0] for e in errors if e["type"] == "unexpected_keyword_argument")
    if unknown:
        known = [f.name for f in dataclasses.fields(SECTIONS[section])]
        problems.append(f"[{section}] has unknown field(s) {_unknown_names(unknown, known)}; known: {sorted(known)}")
    # dict.fromkeys: one message for a list field with several bad items
    problems.extend(dict.fromkeys(_problem(e, section, values) for e in errors
                                  if e["type"] != "unexpected_keyword_argument"))
    return None


def build_run_config(values: dict) -> RunConfig:
    """A checked RunConfig from nested dicts (a TOML document); every problem is reported in one ConfigError. Rules
    across sections are checked once every section is valid."""
    problems = []
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        problems.append(f"unknown section(s) {_unknown_names(unknown, SECTIONS)}; known: {sorted(SECTIONS)}")
    sections = {name: _build_section(name, values.get(name, {}), problems) for name in SECTIONS}
    data = values.get("data", {})
    # Not a rule of DataSection: RunConfig() without data is fine for building a model or an optimizer.
    if isinstance(data, dict) and sum(bool(data.get(name)) for name in ("inputs", "prepared", "sft")) != 1:
        problems.append("set exactly one of data.inputs (stream from parquet), data.prepared (prepared folder) "
                        "and data.sft (instruction data)")
    if problems:
        raise ConfigError("invalid run config: " + "; ".join(problems))
    try:
        return RunConfig(**sections)
    except ValidationError as error:
        raise ConfigError("invalid run config: " + "; ".join(_problem(e, "", {}) for e in error.errors())) from None


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
