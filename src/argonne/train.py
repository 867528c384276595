"""`argonne train CONFIG.toml`: pretrain an Argonne model on CPU, one GPU, or many under torchrun.

Set up (config, processes, device, tokenizer) -> build (model, parallelism, optimizer, data) -> run (the loop).
The same code runs in one process and under `torchrun` on one or many nodes: the ("dp", "tp") device mesh decides
what is sharded (see parallel.py). Checkpoints are sharded DCP folders (checkpoint.py); `--resume auto` continues
from the latest complete one, with any number of processes or parallel layout.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from .checkpoint import (
    CheckpointError,
    checkpoint_step,
    complete_checkpoints,
    load_checkpoint,
    read_checkpoint_metadata,
    read_marker,
    read_state_record,
    run_id_of,
    save_checkpoint,
    verify_checkpoint,
)
from .run_config import ConfigError, RunConfig, check_command
from .configuration_argonne import ArgonneConfig
from .data.batches import pretraining_data, split_batch
from .data.settings import DataError
from .inference.sampling import NonFiniteLogits, SamplingParams
from .loading import ModelError, check_finite_weights, load_weights, open_config
from .device import resolve_device, resolve_dtype
from .files import write_atomic
from .metrics import count_parameters, training_flops_per_token
from .modeling_argonne import ArgonneForCausalLM
from .optim import build_optimizer, check_resumable, lr_at, set_lr
from .parallel import (
    Float8Plan, Topology, any_process, clip_grad_norm, describe_float8, from_main_process, init_distributed,
    parallelize,
)
from .run_folder import (
    METRICS_FILE,
    RunFolderError,
    RunLock,
    clear_earlier_run,
    earlier_run,
    encode_record,
    keep_metrics_until,
    new_run_id,
    read_run_id,
    refuse_fresh_start,
    apply_set_aside,
    plan_set_aside,
    set_aside_name,
    undo_unsaved_branch,
    write_run_record,
)
from .tokenizer import document_boundary_id, load_tokenizer

# Above this size the model is built on the meta device and initialised after sharding, so no process ever holds
# it whole; below it every process builds the full model from the seed, so any layout starts from identical weights.
META_INIT_PARAMETERS = 1_000_000_000


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps in a row, out of memory)."""


# ------------------------------------------------------------------------------------------------------- set up


def compute_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 for mixed precision, or None for plain float32 (see device.resolve_dtype for "auto")."""
    dtype = resolve_dtype(name, device)
    return None if dtype == torch.float32 else dtype


# ------------------------------------------------------------------------------------------------------- build


# The tokenizer of runs that name none and start from no model: the tiny preset's, in the repository.
SAMPLE_TOKENIZER = "data/tokenizers/sample-bpe-8k"


def build_tokenizer(config: RunConfig):
    """data.tokenizer, by default model.init_from's own tokenizer (else the sample BPE). Starting weights come with
    the token ids they were trained on: a data.tokenizer with another vocabulary is an error naming both."""
    from .data.documents import tokenizer_fingerprint
    from .loading import TOKENIZER_FILES

    init_from = config.model.init_from
    has_own = bool(init_from) and any((Path(init_from) / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = load_tokenizer(config.data.tokenizer or (init_from if has_own else SAMPLE_TOKENIZER))
    if has_own and config.data.tokenizer:
        ours, theirs = tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(load_tokenizer(init_from))
        if ours["vocab_sha256"] != theirs["vocab_sha256"]:
            raise ConfigError(
                f"data.tokenizer {config.data.tokenizer!r} ({ours['vocab_size']:,} tokens) is not the tokenizer of "
                f"model.init_from {init_from!r} ({theirs['vocab_size']:,} tokens): the starting weights were "
                f"trained on the other one's token ids. Leave data.tokenizer unset to use model.init_from's"
            )
    return tokenizer


def build_model_config(config: RunConfig, tokenizer) -> ArgonneConfig:
    if config.model.init_from:
        model_config = open_config(config.model.init_from)  # a checkpoint is verified first
    else:
        model_config = ArgonneConfig.from_preset(config.model.preset, **config.model.overrides)
    if len(tokenizer) > model_config.vocab_size:
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path!r} has {len(tokenizer)} tokens but model preset "
            f"{config.model.preset!r} has vocab_size {model_config.vocab_size}; set model.overrides.vocab_size"
        )
    if config.data.seq_len > model_config.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len ({config.data.seq_len}) exceeds the model's context, max_position_embeddings "
            f"({model_config.max_position_embeddings}); lower data.seq_len or raise model.overrides.max_position_embeddings"
        )
    model_config.eos_token_id = document_boundary_id(tokenizer)
    model_config.pad_token_id = tokenizer.pad_token_id
    return model_config


def build_model(model_config: ArgonneConfig, config: RunConfig, topology: Topology, device, dtype):
    """The model, parallelized, on `device`, initialised from train.seed."""
    # Starting weights are loaded whole before sharding, so a fine-tuning run builds the model whole.
    on_meta = count_parameters(model_config) > META_INIT_PARAMETERS and not config.model.init_from
    torch.manual_seed(config.train.seed)
    with torch.device("meta") if on_meta else nullcontext():
        model = ArgonneForCausalLM(model_config)
    if config.model.init_from:
        load_weights(model, config.model.init_from, verify=False)  # verified by build_model_config
    if not on_meta:
        model.to(device)
    float8 = Float8Plan.for_device(config.parallel.float8, config.parallel.float8_skip, device, dtype)
    parallelize(model, topology, config.parallel.activation_checkpointing, config.parallel.compile, dtype, float8,
                sequence_parallel=config.parallel.sequence_parallel, async_tp=config.parallel.async_tp)
    if on_meta:
        model.to_empty(device=device)
        torch.manual_seed(config.train.seed)
        model.reset_parameters()
    return model


def pretraining_batches(config: RunConfig, tokenizer, topology: Topology, pin_memory: bool = False):
    """This data-parallel rank's pretraining batches and the validation batches (None without held-out data). A
    stream's tokenization is shared by all processes of the run (each tokenizes 1/world of it)."""
    share = None
    if config.data.inputs and topology.world > 1:
        from .data.streaming import TokenizeShare

        share = TokenizeShare(topology.rank, topology.world, dist.new_group(backend="gloo"))
    return pretraining_data(config.data, config.train.micro_batch_size, config.train.seed, tokenizer,
                            topology.dp_rank, topology.dp, pin_memory, share, topology.host_group)


def sft_batches(config: RunConfig, tokenizer, topology: Topology, pin_memory: bool = False):
    """This data-parallel rank's batches of instruction windows and the held-out conversations' windows."""
    from .data.sft import sft_data

    return sft_data(config.data, config.train.micro_batch_size, config.train.seed, tokenizer, topology.dp_rank,
                    topology.dp, pin_memory, log_main=lambda text: log_main(topology.rank, text))


def log_main(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


# ------------------------------------------------------------------------------------------------------- pieces


def mfu_peak(peak_tflops: float, device: torch.device, dtype: torch.dtype | None) -> tuple[float | None, str]:
    """The MFU denominator (TFLOP/s of one device) and how the start line describes it. Given (train.peak_tflops),
    or measured at start on a GPU, which runs the matmul alone at its full clock; on a CPU the same measurement
    shares cores with the data workers and the OS and read well below what training then reached (MFU 2.07 was
    printed), so there MFU is reported only against a given peak."""
    if peak_tflops:
        return peak_tflops, f"peak {peak_tflops:,.1f} TFLOP/s (train.peak_tflops)"
    if device.type == "cuda":
        measured = measure_peak_tflops(device, dtype)
        return measured, f"peak {measured:,.1f} TFLOP/s (measured)"
    return None, "MFU not reported: no sound peak on a CPU (set train.peak_tflops)"


def measure_peak_tflops(device: torch.device, dtype: torch.dtype | None) -> float:
    """Dense matmul TFLOP/s of this device in the compute dtype, measured (the MFU denominator): the best of five
    timed rounds, since the first ones run while clocks and thread pools are still waking up (a single round once
    read half the CPU's rate and gave MFUs above 1)."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    for _ in range(3):
        a @ b
    _synchronize(device)
    repeats = 20 if device.type == "cuda" else 5
    best = math.inf
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 * repeats / best / 1e12


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _mean_over_ranks(value: torch.Tensor, topology: Topology) -> torch.Tensor:
    if topology.mesh is None:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, group=topology.mesh["dp"].get_group())
    return total / topology.dp


@torch.no_grad()
def evaluate(model, validation: list[torch.Tensor], device, amp) -> float:
    """Mean loss over the held-out batches (every rank evaluates the same ones)."""
    model.eval()
    losses = []
    for batch in validation:
        inputs, targets = split_batch(batch.to(device))
        with amp():
            losses.append(model(inputs, targets=targets, use_cache=False).loss.float())
    model.train()
    return torch.stack(losses).mean().item()


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, tokens: int, device, amp) -> str:
    """The prompt and its greedy continuation: on the inference engine (the model borrowed as it is), or, for a model
    sharded over processes or compiled for training, on the uncached greedy loop run in lockstep by every rank. A
    note instead of text when the logits were NaN or Inf (the loop's non-finite loss count is what stops such a
    run)."""
    from .inference.engine import Engine, EngineSettings
    from .inference.uncached import greedy_uncached

    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if not tokens or not ids:
        return prompt
    model.eval()
    try:
        if _plain_model(model):  # (in the model's own dtype: the engine's cache and masks are made in it)
            context = model.config.max_position_embeddings
            ids, tokens = ids[-(context - 1):], min(tokens, context - min(len(ids), context - 1))
            settings = EngineSettings(max_batch=1, max_len=len(ids) + tokens)
            engine = Engine(model, tokenizer, settings, compile=False, prepare=False)
            return prompt + engine.complete([ids], SamplingParams(max_new_tokens=tokens, temperature=0))[0].text

        def forward(rows):
            with amp():
                return model(torch.tensor(rows, device=device), use_cache=False).logits[:, -1].float()

        eos = sorted({tokenizer.eos_token_id, model.config.eos_token_id} - {None})
        completions, broken = greedy_uncached(forward, [ids], tokens, tokenizer, eos, lockstep=True)
        if not broken:
            return prompt + completions[0].text
    except NonFiniteLogits:
        pass
    finally:
        model.train()
    return f"(no text: {NonFiniteLogits()})"


def _plain_model(model) -> bool:
    """A model in one process, as built (no DTensor parameters, no compiled blocks): the engine can borrow it."""
    from torch.distributed.tensor import DTensor

    return (not any(isinstance(p, DTensor) for p in model.parameters())
            and not any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()))


class PreemptionFlag:
    """Set by SIGTERM / SIGINT (SLURM and PBS send SIGTERM before killing a job); the loop then finishes the step,
    saves a checkpoint and exits 0. A second signal while saving falls back to the default action."""

    def __init__(self):
        self.raised = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class MetricsSink:
    """JSONL, TensorBoard and the console progress bar, on the main process only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, total_steps: int, first_step: int,
                 resumed_step: int):
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self.writer = self.bar = None
        if not enabled:
            return
        # A resumed run replays the steps after its checkpoint: their records from the interrupted run go, and so
        # does a last line torn by a crash mid-write.
        _, repaired = keep_metrics_until(self.path, resumed_step)
        self.file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_step + 1)
        from tqdm.auto import tqdm

        # disable=None: a bar on a terminal, plain lines in log files (SLURM, PBS, CI).
        self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True, disable=None)
        if repaired:
            self.note(f"{self.path}: dropped its torn last line (written when the earlier run was cut off)")

    def rewind(self, step: int) -> None:
        """Back to `step` after a rollback: the records and TensorBoard events after it go, the bar returns."""
        if not self.enabled:
            return
        self.file.close()
        keep_metrics_until(self.path, step)
        self.file = open(self.path, "a")
        if self.writer is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer.close()
            self.writer = SummaryWriter(self.writer.log_dir, purge_step=step + 1)
        self.bar.n = step
        self.bar.refresh()

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(encode_record(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    # eval/TASK/METRIC under its own heading; the rest under train/
                    self.writer.add_scalar(key if "/" in key else f"train/{key}", value, record["step"])
            self.writer.flush()
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        self.bar.write(format_record(record))

    def note(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()
            self.bar.close()


def format_record(record: dict) -> str:
    """A console line: the training step's figures, or the [eval] tasks' metrics (a record of their own)."""
    if "rolled_back_from" in record:
        return (f"step {record['step']:>6} | rolled back from step {record['rolled_back_from']} after loss spikes at "
                f"steps {record['spike_steps']}; batches {record['skipped_batches'][0]}-"
                f"{record['skipped_batches'][1] - 1} are skipped (rollback {record['rollbacks']})")
    tasks = [f"{key[5:]} {value:.4g}" for key, value in record.items() if key.startswith("eval/")]
    if "loss" not in record:
        return f"step {record['step']:>6} | tasks ({record.get('eval_seconds', 0):.1f} s): " + ", ".join(tasks)
    text = (
        f"step {record['step']:>6} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
        f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | "
        + (f"MFU {record['mfu']:.3f} | " if "mfu" in record else "")
        + f"mem {record['peak_memory_gib']:.2f} GiB"
    )
    if "val_loss" in record:
        text += f" | val loss {record['val_loss']:.4f}"
    return text


def oom_message(error: Exception, device: torch.device, config: RunConfig) -> str:
    figures = ""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        figures = (
            f" {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB peak allocated, "
            f"{(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB in use on {device}."
        )
    return (
        f"out of memory at micro_batch_size {config.train.micro_batch_size} x seq_len {config.data.seq_len}."
        f"{figures} Lower train.micro_batch_size (raise train.grad_accum to keep the global batch), turn on "
        f"parallel.activation_checkpointing, or use more GPUs / tensor parallelism. ({error})"
    )


# ------------------------------------------------------------------------------------------------------- run


def cross_entropy_objective(model, inputs: torch.Tensor, targets: torch.Tensor):
    """The pretraining and SFT loss: next-token cross-entropy (targets of -100 are ignored)."""
    return model(inputs, targets=targets, use_cache=False).loss, {}


def z_loss_objective(model, inputs: torch.Tensor, targets: torch.Tensor, coefficient: float):
    """Cross-entropy + coefficient * z, computed inside the chunked loss; the parts are logged apart."""
    output = model(inputs, targets=targets, use_cache=False, z_loss=coefficient)
    return output.loss, {"ce": output.loss.detach() - coefficient * output.z_loss, "z_loss": output.z_loss}


def build_cross_entropy(config: RunConfig, model_config: ArgonneConfig, tokenizer, device):
    if config.train.z_loss:
        return partial(z_loss_objective, coefficient=config.train.z_loss)
    return cross_entropy_objective


@dataclass(frozen=True)
class TrainSpec:
    """What a training command trains on and what it minimises; the loop (`train`) is the same for all.

    `build_data(config, tokenizer, topology, pin_memory)` -> (this rank's batches, validation batches or None);
    `build_objective(config, model_config, tokenizer, device)` -> `objective(model, inputs, targets)` returning
    (loss, {name: loss component}). `name` is the command (and the config checks it asks for: see
    config.check_command)."""

    name: str
    build_data: Callable
    build_objective: Callable = build_cross_entropy


PRETRAINING = TrainSpec("train", pretraining_batches)
SFT = TrainSpec("sft", sft_batches)


def training_step(model, optimizers, next_batch, objective, amp, config: RunConfig, topology: Topology, device,
                  spikes: "SpikeDetector | None" = None):
    """One optimizer step: grad_accum micro-batches forward and backward, the global gradient norm clipped, and an
    update of each optimizer (optim.build_optimizer's list), which each skips on the device when the loss or the
    gradient norm is not finite, or when `spikes` finds the loss a spike.

    Returns device tensors (loss, grad_norm, finite, parts, spike). Nothing here reads a value back to the host, so
    the host queues the next step (and fetches its batch) while the device still computes this one.
    """
    accumulate = config.train.grad_accum
    step_loss = torch.zeros((), device=device)
    parts: dict[str, torch.Tensor] = {}  # loss components (distillation: kl, ce)
    for _ in range(accumulate):
        inputs, targets = split_batch(next_batch().to(device, non_blocking=True))
        with amp():
            loss, micro_parts = objective(model, inputs, targets)
        (loss / accumulate).backward()
        step_loss += loss.detach().float() / accumulate
        for name, value in micro_parts.items():
            parts[name] = parts.get(name, 0) + value.float() / accumulate
    grad_norm = clip_grad_norm(model.parameters(), config.optim.grad_clip).to(device)
    step_loss = _mean_over_ranks(step_loss, topology)  # every process then agrees on skipping
    finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
    spike = spikes(step_loss, finite) if spikes is not None else torch.zeros_like(finite)
    found_inf = (~finite | spike).float()
    for optimizer in optimizers:
        optimizer.found_inf = found_inf  # fused AdamW's on-device skip (what GradScaler uses), and Muon's
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, finite, parts, spike


class SkippedSteps:
    """On-device count of updates skipped for a non-finite loss or gradient norm, and of the longest run of them
    in a row since the last read; read back only at log intervals."""

    def __init__(self, device):
        self.total = torch.zeros((), dtype=torch.long, device=device)
        self.in_a_row = torch.zeros_like(self.total)
        self.longest_run = torch.zeros_like(self.total)

    def update(self, finite: torch.Tensor) -> None:
        bad = (~finite).long()
        self.total += bad
        self.in_a_row = (self.in_a_row + 1) * bad
        self.longest_run = torch.maximum(self.longest_run, self.in_a_row)


class SpikeDetector:
    """Finite loss spikes, found on the device (no host read): a step loss is a spike when it exceeds the mean of
    the last `window` accepted losses by `threshold` standard deviations, the spread floored at 1% of the mean so
    that a flat stretch does not turn noise into spikes. Detection starts once `window` losses are seen; spikes and
    non-finite losses are not accepted into the window."""

    def __init__(self, window: int, threshold: float, device):
        self.threshold = threshold
        self.losses = torch.zeros(window, device=device)
        self.seen = torch.zeros((), dtype=torch.long, device=device)

    def __call__(self, loss: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        window = self.losses.shape[0]
        mean = self.losses.mean()
        spread = torch.maximum(self.losses.std(), 0.01 * mean)
        spike = finite & (self.seen >= window) & (loss > mean + self.threshold * spread)
        accept = finite & ~spike
        slot = (self.seen % window).view(1)
        self.losses.index_copy_(0, slot, torch.where(accept, loss.float(), self.losses[slot]))
        self.seen += accept.long()
        return spike

    def state_dict(self) -> dict:
        return {"losses": self.losses.tolist(), "seen": int(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["losses"]) != self.losses.shape[0]:  # train.spike_window changed: start the window again
            return
        self.losses.copy_(torch.tensor(state["losses"]))
        self.seen.fill_(state["seen"])


class Draws:
    """The training batches, drawn one at a time and counted; the ranges of draws in `skipped` (the batches of
    loss spikes a rollback left out) are drawn and dropped. Counting every draw, the position survives rollbacks
    and resumes: a checkpoint records it with the ranges."""

    def __init__(self, batches):
        self.batches = batches
        self.iterator = None  # made at the first draw: a data loader's iterator starts its worker processes
        self.drawn = 0
        self.skipped: list[list[int]] = []

    def __call__(self) -> torch.Tensor:
        if self.iterator is None:
            self.iterator = iter(self.batches)
        while any(start <= self.drawn < end for start, end in self.skipped):
            next(self.iterator)
            self.drawn += 1
        self.drawn += 1
        return next(self.iterator)

    def restart(self, data_state: dict, drawn: int, skipped: list[list[int]]) -> None:
        """Continue from a checkpoint's data position, with its count of draws and its skipped ranges."""
        self.batches.load_state_dict(data_state)
        self.iterator = None
        self.drawn = drawn
        self.skipped = [list(span) for span in skipped]


def train(config: RunConfig, spec: TrainSpec = PRETRAINING, resume: str | None = None,
          overwrite: bool = False) -> dict:
    """Run training as `spec` says (pretraining, SFT, distillation); returns a summary (last metrics, elapsed
    time). `resume` is None, "auto" or a checkpoint. Without `resume`, a run folder holding an earlier run is
    refused unless `overwrite` deletes that run."""
    check_command(config, spec.name)
    if resume is not None and overwrite:
        raise RunFolderError("--overwrite starts a new run and --resume continues one: choose one")
    device = resolve_device(config.train.device)
    joined_a_group = dist.is_initialized()  # a caller's process group (several runs in one launch) stays up
    topology = init_distributed(config.parallel.tensor_parallel, device)
    lock = claim_run_folder(Path(config.train.run_dir), resume, overwrite, topology)
    try:
        summary = _train(config, spec, topology, choose_checkpoint(Path(config.train.run_dir), resume, topology))
    finally:
        if lock is not None:
            lock.release()
    if dist.is_initialized():
        dist.barrier()
        if not joined_a_group:
            dist.destroy_process_group()
    return summary


def claim_run_folder(run_dir: Path, resume: str | None, overwrite: bool, topology: Topology) -> RunLock | None:
    """Lock the run folder (main process) and check that the run overwrites no other: a fresh start needs a folder
    without an earlier run (or `overwrite`, which deletes it), and a checkpoint from elsewhere resumes only into
    such a folder. Every process raises the same RunFolderError when the folder cannot be used."""
    from .outputs import FOLDER, check_place

    lock, problem = None, None
    if topology.is_main:
        lock = RunLock(run_dir)
        try:
            check_place(run_dir, FOLDER, option="train.run_dir")
            lock.acquire()
            found = earlier_run(run_dir)
            if found and resume is None and not overwrite:
                raise refuse_fresh_start(run_dir, found)
            if found and resume is None:
                log_main(0, f"--overwrite: deleted the earlier run in {run_dir}: "
                            f"{', '.join(clear_earlier_run(run_dir))}")
            if found and resume not in (None, "auto") and Path(resume).resolve().parent != \
                    (run_dir / "checkpoints").resolve():
                raise RunFolderError(
                    f"run folder {run_dir} holds an earlier run ({', '.join(found)}), and {resume} is not one of "
                    f"its checkpoints: resume it into an empty train.run_dir, or continue this folder's own run "
                    f"with --resume auto")
        except (RunFolderError, ValueError) as error:  # outputs.OutputError: a file, a link
            lock.release()
            lock, problem = None, str(error)
    problem = from_main_process(problem, topology)
    if problem is not None:
        raise RunFolderError(problem)
    return lock


class RunStart(NamedTuple):
    """How a run starts: from which checkpoint (None: afresh), under which run id, and which checkpoints it sets
    aside once it is built: a branch's newer ones (`newer`) and those `--resume auto` skipped for failing
    verification (`unverified`, kept as `step-N.unverified`: the run would otherwise replace them at their step)."""

    resume_from: Path | None
    run_id: str
    newer: tuple | list = ()  # (checkpoint, its run id)
    unverified: tuple[Path, ...] | list[Path] = ()
    branch: bool = False  # the folder's run steps aside (its newer checkpoints, model and metrics)


def choose_checkpoint(run_dir: Path, resume: str | None, topology: Topology) -> RunStart:
    """The checkpoint to resume from (None: a fresh start), the run's id, and the checkpoints it sets aside, the
    same in every process (the main process lists the folder; verification is shared by all). Nothing is
    written here but the undoing of a branch that never saved (below): the run folder changes only once the run is
    built (`start_run_folder`), so a refused resume leaves it as it was.

    `auto`: the newest checkpoint of this folder's run that verifies; one that does not is skipped, saying why, and
    none verifying is an error (starting over would bury the run). No checkpoint at all starts a new run only in a
    folder with no trace of one; a branch stopped before its first checkpoint is undone first, so auto finds what it
    found before the branch. A path: it must verify. The run id continues the checkpoint's. It is new for a fresh
    start, and for a resume from a checkpoint of this folder older than its run's newest: a branch, for which the
    newer checkpoints, the metrics log and the model are set aside under the old run's id (`plan_set_aside`), never
    deleted. Newer checkpoints that `auto` skipped failed verification: they are set aside too, never replaced."""
    checkpoints, unverified = run_dir / "checkpoints", []
    if resume is None:
        return RunStart(None, from_main_process(new_run_id(), topology))
    if resume == "auto":
        listed, problem = _main_decides(lambda: _auto_listing(run_dir), topology)
        if problem is not None:
            raise RunFolderError(problem)
        path, unverified = _first_verified(listed, checkpoints, topology)
        if path is None:
            return RunStart(None, from_main_process(new_run_id(), topology))
    else:
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
        if not verify_checkpoint(path, topology.host_group):
            log_main(topology.rank, f"{path}: written before checkpoints recorded checksums, not verified")
    run_id, newer, branch = _main_decides(lambda: _branch_of(run_dir, path, resume), topology)
    return RunStart(path, run_id, newer, unverified, branch)


def _main_decides(decide: Callable, topology: Topology):
    """`decide()`'s result, computed by the main process (which lists and reads the run folder), in every process.
    A user error there (a damaged run.json or marker) is raised in every process, not in the main one alone while
    the others wait for its answer."""
    result, problem = None, None
    if topology.is_main:
        try:
            result = decide()
        except (ValueError, OSError) as error:
            if topology.world == 1:
                raise
            problem = f"{type(error).__name__}: {error}"
    result, problem = from_main_process((result, problem), topology)
    if problem is not None:
        raise RunFolderError(problem)
    return result


def _auto_listing(run_dir: Path) -> tuple[list[Path], str | None]:
    """(Main process.) --resume auto's candidates, newest first, or the problem when there are none but the folder
    holds traces of a run (checkpoints without their COMPLETE marker, metrics, a model...)."""
    checkpoints = run_dir / "checkpoints"
    _undo_unsaved_branch(run_dir, "--resume auto")
    candidates = _auto_candidates(checkpoints, read_run_id(run_dir))
    found = earlier_run(run_dir) if not candidates else []
    if found:
        return [], (f"--resume auto: no complete checkpoint of this run in {checkpoints} to continue from, but "
                    f"{run_dir} holds an earlier run ({', '.join(found)}). Resume a checkpoint with --resume PATH, "
                    f"delete the run and start over with --overwrite, or choose another train.run_dir")
    return candidates, None


def _undo_unsaved_branch(run_dir: Path, option: str) -> None:
    """(Main process.) Undo a branch of this folder that stopped before its first checkpoint (run_folder.py)."""
    checkpoints = run_dir / "checkpoints"
    undone = undo_unsaved_branch(run_dir, lambda run_id: any(run_id_of(c) == run_id
                                                             for c in complete_checkpoints(checkpoints)))
    if undone:
        log_main(0, f"{option}: {undone}")


def _auto_candidates(checkpoints: Path, run_id: str | None) -> list[Path]:
    """This folder's run's checkpoints (or all, in a folder without run.json), newest first."""
    return [c for c in reversed(complete_checkpoints(checkpoints)) if run_id is None or run_id_of(c) in (run_id, None)]


def _first_verified(candidates: list[Path], checkpoints: Path, topology: Topology) -> tuple[Path | None, list[Path]]:
    """The newest candidate that verifies, and the newer ones that did not."""
    skipped = []
    for path in candidates:
        try:
            if not verify_checkpoint(path, topology.host_group):
                log_main(topology.rank, f"{path}: written before checkpoints recorded checksums, not verified")
            return path, skipped
        except CheckpointError as error:
            log_main(topology.rank, f"--resume auto: skipping {path.name}: {error}")
            skipped.append(path)
    if candidates:
        raise CheckpointError(
            f"--resume auto: none of the {len(candidates)} checkpoint(s) in {checkpoints} verifies (see above). "
            f"Resume from a good copy of one with --resume PATH; --overwrite would delete this run and start over"
        )
    return None, skipped


def _branch_of(run_dir: Path, path: Path, resume: str) -> tuple[str, list[tuple[Path, str]], bool]:
    """(Main process.) The run id of a run resumed from `path`, and the checkpoints a branch sets aside once it
    starts (`start_run_folder`), each with its run's id: those newer than `path` of its run and of the run the
    folder holds (run.json's, another when resuming an earlier branch's or a set-aside checkpoint). Any such
    checkpoint, or the folder holding another run, makes the resume a branch: a new run id, the folder's model and
    metrics set aside too. A branch stopped before its first checkpoint is undone first."""
    marker = read_marker(path)
    run_id, step = marker.get("run_id"), marker["step"]
    checkpoints = run_dir / "checkpoints"
    if resume == "auto" or path.resolve().parent != checkpoints.resolve():
        return run_id or new_run_id(), [], False
    _undo_unsaved_branch(run_dir, "--resume")
    current = read_run_id(run_dir)
    owners = {run_id, current} - {None}
    newer = [(c, run_id_of(c)) for c in complete_checkpoints(checkpoints)
             if checkpoint_step(c) > step and run_id_of(c) in owners]
    branch = bool(newer) or (current is not None and current != run_id)
    return (new_run_id() if run_id is None or branch else run_id), newer if branch else [], branch


def start_run_folder(run: "Run", start: RunStart) -> None:
    """(Main process, once the run is built and restored.) Set aside the checkpoints that `start` names and record
    the run: config.json and run.json. A branch's run.json, with what it sets aside, is written before anything
    moves, so that a branch stopped at any point before its first checkpoint can be undone."""
    run_dir, branch, planned = Path(run.config.train.run_dir), None, []
    for path in start.unverified:
        aside = set_aside_name(path, "unverified")
        path.rename(aside)
        log_main(0, f"--resume auto: {path.name}, which failed verification, is kept as {aside.name}")
    if start.branch:  # the run the folder held (run.json's; the resumed checkpoint's when there is none) steps aside
        old_id = read_run_id(run_dir) or run_id_of(run.resume_from) or "unnamed"
        planned = plan_set_aside(run_dir, old_id, list(start.newer))
        branch = {"run_id": old_id, "step": read_marker(run.resume_from)["step"], "set_aside": planned}
    write_atomic(run_dir / "config.json", json.dumps(run.config.to_dict(), indent=2))
    write_run_record(run_dir, run.run_id, resumed_from=str(run.resume_from) if run.resume_from else None,
                     **({"branched_from": branch} if branch else {}))
    if branch:
        apply_set_aside(run_dir, planned)
        resumed_run = run_id_of(run.resume_from)
        kept_log = run_dir / f"metrics.run-{resumed_run}.jsonl"
        if resumed_run != old_id and kept_log.is_file():  # the resumed run's own log goes on (cut at its step)
            shutil.copyfile(kept_log, run_dir / METRICS_FILE)
        log_main(0, f"resuming from {run.resume_from.name}: a branch of the run in {run_dir}. Kept under the old "
                    f"runs' names: {', '.join(entry['to'] for entry in planned) or 'nothing to keep'}")


def _train(config: RunConfig, spec: TrainSpec, topology: Topology, start: RunStart) -> dict:
    """The run, in a claimed run folder: build it, record it in the folder, loop, then export the trained model."""
    run = build_run(config, spec, topology, start.resume_from, start.run_id)
    _main_decides(lambda: start_run_folder(run, start), topology)
    sink = MetricsSink(Path(config.train.run_dir), topology.is_main, config.train.tensorboard, config.train.steps,
                       run.start_step, run.start_step)
    try:
        sink.note(run.describe())
        summary = train_loop(run, sink)
    finally:
        sink.close()
    if not summary["preempted"] and summary["step"] == config.train.steps:
        run_dir = Path(config.train.run_dir)
        export_final_model(run.model, run.model_config, run.tokenizer, run_dir / "model", topology)
        if topology.is_main:
            from .plot import plot_run

            plot_run(run_dir)
    return summary


@dataclass
class Run:
    """A built run: what the loop trains, on what, and where it saves."""

    config: RunConfig
    topology: Topology
    device: torch.device
    amp: Callable  # a context manager factory: autocast, or nothing when FSDP2 casts by itself
    tokenizer: object
    model_config: ArgonneConfig
    model: torch.nn.Module
    optimizers: list[torch.optim.Optimizer]  # AdamW, and Muon for the block matrices (optim.py)
    objective: Callable
    batches: object
    validation: list | None
    run_id: str
    resume_from: Path | None
    peak_tflops: float | None  # the MFU denominator, and how the start line names it
    peak_note: str
    start_step: int = 0
    tasks: object = None  # harness.TaskEvaluator for the [eval] tasks, or None
    draws: Draws | None = None  # the batches as the loop draws them (built in __post_init__)
    spikes: SpikeDetector | None = None  # train.spike_threshold > 0
    rollbacks: int = 0

    def __post_init__(self):
        self.draws = Draws(self.batches)
        tc = self.config.train
        if tc.spike_threshold:
            self.spikes = SpikeDetector(tc.spike_window, tc.spike_threshold, self.device)

    def train_state(self, step: int) -> dict:
        """What a checkpoint holds besides weights and optimizer: the step, the data position, the RNG, and the
        spike recovery's record (draws counted and skipped, the detector's window, rollbacks so far)."""
        recovery = {"drawn": self.draws.drawn, "skipped": self.draws.skipped, "rollbacks": self.rollbacks,
                    "spikes": self.spikes.state_dict() if self.spikes is not None else None}
        return {"step": step, "data": json.dumps(self.batches.state_dict()), "rng": torch.get_rng_state(),
                "recovery": json.dumps(recovery)}

    def load(self, path: Path, verify: bool) -> int:
        """Weights, optimizer and train state from the checkpoint at `path`; returns its step. Checkpoints written
        before spike recovery existed hold no record: no draw was skipped, and grad_accum were drawn per step."""
        template = self.train_state(0)
        if "train.recovery" not in read_checkpoint_metadata(path).state_dict_metadata:
            del template["recovery"]
        state = load_checkpoint(path, self.model, self.optimizers, template, verify=verify,
                                group=self.topology.host_group)
        step = int(state["step"])
        recovery = read_state_record(path, state.get("recovery", "{}"), "spike-recovery record (train.recovery)")
        self.restore_data_position(path, read_state_record(path, state["data"], "data-loader state (train.data)"),
                                   recovery.get("drawn", step * self.config.train.grad_accum),
                                   recovery.get("skipped", []))
        torch.set_rng_state(state["rng"])
        self.rollbacks = recovery.get("rollbacks", 0)
        if self.spikes is not None and recovery.get("spikes"):
            self.spikes.load_state_dict(recovery["spikes"])
        return step

    def restore_data_position(self, path: Path, data_state: dict, drawn: int, skipped: list) -> None:
        """The batches' position from a checkpoint's data-loader state; a state that lacks a field or holds one of
        the wrong type (a damaged or foreign checkpoint) is a CheckpointError naming the checkpoint, and one that
        does not fit this run's data a DataError naming it too."""
        try:
            self.draws.restart(data_state, drawn, skipped)
        except DataError as error:
            raise DataError(f"{path}: {error}") from None
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            detail = f"no {error}" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
            raise CheckpointError(f"{path}: its data-loader state (train.data) is not one this run's batches "
                                  f"read ({detail}); resume from another checkpoint") from None

    @property
    def tokens_per_step(self) -> int:
        tc = self.config.train
        return tc.micro_batch_size * tc.grad_accum * self.topology.dp * self.config.data.seq_len

    def save(self, step: int) -> Path:
        return save_checkpoint(
            Path(self.config.train.run_dir) / "checkpoints", step, self.model, self.optimizers,
            self.train_state(step), self.topology.is_main,
            extra_files={"run_config.json": json.dumps(self.config.to_dict(), indent=2)}, tokenizer=self.tokenizer,
            keep=self.config.checkpoint.keep, run_id=self.run_id, group=self.topology.host_group,
        )

    def describe(self) -> str:
        config, topology = self.config, self.topology
        flops = training_flops_per_token(self.model_config, config.data.seq_len)
        text = (
            f"model {config.model.init_from or config.model.preset}: {count_parameters(self.model_config):,} "
            f"parameters, {flops / 1e9:,.3f} GFLOPs/token | {topology.world} process(es): dp {topology.dp} x "
            f"tp {topology.tp} | {self.tokens_per_step:,} tokens/step x {config.train.steps} steps | device "
            f"{self.device}, {self.peak_note} | "
            + (f"resumed from {self.resume_from} at step {self.start_step}" if self.resume_from else "from scratch")
        )
        if config.parallel.float8 != "off":
            text += "\n" + describe_float8(self.model, config.parallel.float8, self.device.type != "cuda")
        if self.start_step >= config.train.steps:
            text += (f"\nnothing to train: the checkpoint is at step {self.start_step} and train.steps is "
                     f"{config.train.steps} (raise train.steps to continue)")
        return text


def build_run(config: RunConfig, spec: TrainSpec, topology: Topology, resume_from: Path | None, run_id: str) -> Run:
    """Device, model (sharded), optimizer, objective and data; restored from `resume_from` when given. Writes
    nothing to the run folder: a run refused here leaves it as it was."""
    device = resolve_device(config.train.device, topology.local_rank)
    dtype = compute_dtype(config.train.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tokenizer = build_tokenizer(config)
    model_config = build_model_config(config, tokenizer)
    model = build_model(model_config, config, topology, device, dtype)
    fsdp_mixed_precision = topology.dp > 1 and dtype is not None
    # FSDP2 casts parameters itself; otherwise autocast does the mixed precision.
    amp = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype and not fsdp_mixed_precision else nullcontext
    optimizers = build_optimizer(model, config.optim)
    objective = spec.build_objective(config, model_config, tokenizer, device)
    batches, validation = spec.build_data(config, tokenizer, topology, device.type == "cuda")
    run = Run(config, topology, device, amp, tokenizer, model_config, model, optimizers, objective, batches,
              validation, run_id, resume_from, *mfu_peak(config.train.peak_tflops, device, dtype))
    if config.eval.tasks:
        from .harness import TaskEvaluator

        run.tasks = TaskEvaluator(config.eval, tokenizer, topology)
    if resume_from is not None:
        check_resumable(resume_from, config.optim)
        run.start_step = run.load(resume_from, verify=False)
    return run


def train_loop(run: Run, sink: "MetricsSink") -> dict:
    """Steps from run.start_step to train.steps: update, log, validate, sample and checkpoint on their intervals;
    a preemption signal saves a checkpoint and stops; loss spikes may roll the run back (roll_back). Returns the
    last logged record, `preempted`, `elapsed_s`."""
    config, tc, topology = run.config, run.config.train, run.topology
    interval = LogInterval(run)
    summary: dict = {"step": run.start_step, "preempted": False}
    recent_spikes: list[tuple[int, int, int]] = []  # (step index, first draw, end draw) within spike_window
    started = time.perf_counter()
    run.model.train()
    step = run.start_step
    with PreemptionFlag() as preemption:
        while step < tc.steps:
            lr = lr_at(step, config.optim, tc.steps)
            set_lr(run.optimizers, lr)
            first_draw = run.draws.drawn
            try:
                step_loss, grad_norm, finite, parts, spike = training_step(
                    run.model, run.optimizers, run.draws, run.objective, run.amp, config, topology, run.device,
                    run.spikes,
                )
            except torch.OutOfMemoryError as error:
                raise TrainingStopped(oom_message(error, run.device, config)) from error
            interval.add(step_loss, finite, parts, spike, (step, first_draw, run.draws.drawn))
            sink.step_done()
            done = step + 1 == tc.steps
            if (step + 1) % tc.log_every == 0 or done:
                record = interval.record(step + 1, lr, grad_norm, sink)
                if run.validation is not None and ((tc.eval_every and (step + 1) % tc.eval_every == 0) or done):
                    started_validation = time.perf_counter()
                    record["val_loss"] = evaluate(run.model, run.validation, run.device, run.amp)
                    interval.started += time.perf_counter() - started_validation  # not training time
                sink.log(record)
                summary.update(record)
                recent_spikes = [s for s in recent_spikes + interval.spikes if s[0] > step - tc.spike_window]
                if tc.spike_rollback_after and len(recent_spikes) >= tc.spike_rollback_after:
                    step = roll_back(run, sink, recent_spikes, step + 1)
                    recent_spikes, interval = [], LogInterval(run)
                    continue
            if tc.sample_every and (step + 1) % tc.sample_every == 0:
                sink.note("sample: " + sample_text(run.model, run.tokenizer, tc.sample_prompt, tc.sample_tokens,
                                                   run.device, run.amp))
            summary["preempted"] = any_process(preemption.raised, topology)
            every = config.checkpoint.every
            if summary["preempted"] or done or (every and (step + 1) % every == 0):
                sink.note(f"checkpoint saved: {run.save(step + 1)}")
            if summary["preempted"]:
                sink.note(f"stopped by a signal after step {step + 1}; resume with --resume auto")
                break
            if run.tasks is not None and run.tasks.due(step + 1, done):
                # After the checkpoint: an evaluation that fails (a download, memory) costs no training.
                record = {"step": step + 1, "tokens": (step + 1) * run.tokens_per_step,
                          **evaluate_tasks_or_stop(run, step + 1)}
                interval.started += record["eval_seconds"]  # not training time
                sink.log(record)
                summary.update(record)
            step += 1
    summary["elapsed_s"] = time.perf_counter() - started
    return summary


def evaluate_tasks_or_stop(run: Run, step: int) -> dict:
    """The [eval] tasks' results at `step`; a task that fails (a download, its data, memory) stops the run with
    one line naming the tasks and the cause. The checkpoint of the step is already saved, so nothing is lost."""
    try:
        return run.tasks(run.model, run.amp)
    except Exception as error:
        every = run.config.checkpoint.every
        kept = "its checkpoint is saved" if every and step % every == 0 or step == run.config.train.steps \
            else "the last checkpoint is kept"
        raise TrainingStopped(
            f"the evaluation task(s) {', '.join(run.tasks.tasks)} failed at step {step} "
            f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}); "
            f"{kept}: fix eval.tasks (or remove them) and resume with --resume auto"
        ) from error


def roll_back(run: Run, sink: "MetricsSink", spikes: list[tuple[int, int, int]], now: int) -> int:
    """Return to the newest checkpoint of this run saved before the first spike, with the batches drawn from the
    first spike's step to the last one's left out from then on; returns the step to continue from.

    The checkpoint is saved again with the skipped range in its record, so a resume from it (or from any later
    one) skips the same batches. This run's checkpoints after it are set aside as `step-N.rolled-back-K`, never
    resumed from and not deleted; the metrics log loses the records after it, and gains one for the rollback."""
    tc, checkpoints = run.config.train, Path(run.config.train.run_dir) / "checkpoints"
    first_step = spikes[0][0]
    before = [c for c in complete_checkpoints(checkpoints)
              if checkpoint_step(c) <= first_step and run_id_of(c) == run.run_id]
    spike_steps = [s[0] + 1 for s in spikes]
    if not before:
        raise TrainingStopped(f"loss spikes at steps {spike_steps} and no checkpoint of this run before step "
                              f"{first_step + 1} to roll back to: save more often (checkpoint.every)")
    if run.rollbacks >= tc.spike_max_rollbacks:
        raise TrainingStopped(f"loss spikes at steps {spike_steps} after {run.rollbacks} rollback(s) "
                              f"(train.spike_max_rollbacks): lower optim.lr or check the data")
    skipped = run.draws.skipped + [[spikes[0][1], spikes[-1][2]]]
    rollbacks = run.rollbacks + 1
    target = before[-1]
    step = run.load(target, verify=True)
    run.draws.skipped, run.rollbacks = skipped, rollbacks
    if run.topology.is_main:
        for later in complete_checkpoints(checkpoints):
            if checkpoint_step(later) > step and run_id_of(later) == run.run_id:
                later.rename(set_aside_name(later, f"rolled-back-{rollbacks}"))
    run.save(step)  # the barrier inside lets no process read the folder before the renames
    sink.rewind(step)
    sink.log({"step": step, "rolled_back_from": now, "spike_steps": spike_steps,
              "skipped_batches": skipped[-1], "rollbacks": rollbacks})
    return step


class LogInterval:
    """What the steps since the last log left on the device (losses, loss parts, skipped updates), read back once
    per log interval: reading waits for the device, so it is done once, for everything logged."""

    def __init__(self, run: Run):
        self.run = run
        self.skipped = SkippedSteps(run.device)
        self.skipped_before = 0  # the total at the last log
        self.losses: list[torch.Tensor] = []
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.spike_flags: list[torch.Tensor] = []
        self.steps: list[tuple[int, int, int]] = []
        self.spikes: list[tuple[int, int, int]] = []  # the last read interval's spikes: (step index, draws)
        self.spike_total = 0
        self.started = time.perf_counter()
        self.flops_per_token = training_flops_per_token(run.model_config, run.config.data.seq_len)

    def add(self, step_loss: torch.Tensor, finite: torch.Tensor, parts: dict[str, torch.Tensor],
            spike: torch.Tensor, where: tuple[int, int, int]) -> None:
        """One step's figures; `where` is (step index, first draw, end draw) of its batches."""
        self.skipped.update(finite)
        self.losses.append(step_loss)
        self.spike_flags.append(spike)
        self.steps.append(where)
        for name, value in parts.items():
            self.parts.setdefault(name, []).append(value)

    def record(self, step: int, lr: float, grad_norm: torch.Tensor, sink: "MetricsSink") -> dict:
        """The record for the interval ending at `step` (1-based); stops the run after too many non-finite steps
        in a row. Starts the next interval."""
        run, tc = self.run, self.run.config.train
        losses = torch.stack(self.losses).float()
        loss, norm, total_skipped, longest_run, *flags = torch.cat([torch.stack([
            losses.mean(), grad_norm.float(), self.skipped.total.float(), self.skipped.longest_run.float(),
        ]), torch.stack(self.spike_flags).float()]).tolist()
        self.spikes = [where for where, flag in zip(self.steps, flags) if flag]
        if self.spikes:
            values = losses[[i for i, flag in enumerate(flags) if flag]].tolist()
            sink.note("loss spike(s), update skipped: " + ", ".join(
                f"step {where[0] + 1} loss {value:.4f}" for where, value in zip(self.spikes, values)))
        tokens_per_s = len(self.losses) * run.tokens_per_step / (time.perf_counter() - self.started)
        if total_skipped > self.skipped_before:
            sink.note(f"steps {step + 1 - len(self.losses)}-{step}: {int(total_skipped - self.skipped_before)} "
                      f"update(s) skipped for a non-finite loss or gradient norm ({int(total_skipped)} so far)")
        if longest_run >= tc.max_nonfinite_in_a_row:
            raise TrainingStopped(
                f"{int(longest_run)} steps in a row had a non-finite loss or gradient norm (by step {step}); "
                f"lower optim.lr, check the data, or raise train.max_nonfinite_in_a_row "
                f"(now {tc.max_nonfinite_in_a_row})"
            )
        record = {
            "step": step,
            "tokens": step * run.tokens_per_step,
            "loss": loss,
            "lr": lr,
            "grad_norm": norm,
            "tokens_per_s": tokens_per_s,
            "peak_memory_gib": peak_memory_gib(run.device),
            "skipped_steps": int(total_skipped),
        }
        if run.spikes is not None:
            self.spike_total += len(self.spikes)
            record["spikes"] = self.spike_total
        if run.peak_tflops:
            record["mfu"] = self.flops_per_token * tokens_per_s / (run.peak_tflops * 1e12 * run.topology.world)
        if run.config.data.on_error == "skip" and hasattr(run.batches, "skipped"):
            # Streamed rows and files skipped so far, as flat numbers so TensorBoard plots them too.
            record.update({f"data_skipped_{kind}": n for kind, n in run.batches.skipped().items()})
        for name, values in self.parts.items():
            record[name] = _mean_over_ranks(torch.stack(values).mean(), run.topology).item()
        self.skipped.longest_run.zero_()
        self.skipped_before = total_skipped
        self.losses.clear()
        self.parts.clear()
        self.spike_flags.clear()
        self.steps.clear()
        self.started = time.perf_counter()
        return record


def export_final_model(model, model_config: ArgonneConfig, tokenizer, output: Path, topology: Topology) -> None:
    """Gather the full weights and write a Hugging Face folder (safetensors + config + code + tokenizer). Final
    weights holding NaN or Inf are not written: TrainingStopped names them (the main process checks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sharded = topology.mesh is not None
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=sharded, cpu_offload=sharded))
    problem = None
    if topology.is_main:
        try:
            check_finite_weights(state, "the final weights")
        except ModelError as error:
            problem = (f"{error}; {output} was not written (resume from a checkpoint before the weights broke, with "
                       f"--resume PATH)")
    problem = from_main_process(problem, topology)  # every process stops, not the main one alone
    if problem is not None:
        raise TrainingStopped(problem)
    if topology.is_main:
        from .outputs import FOLDER, Output

        plain = ArgonneForCausalLM(model_config)
        plain.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
        # The run's own model/ (an earlier run's was refused or set aside before training): replaced whole, never
        # left half-written by a crash.
        with Output(output, FOLDER, overwrite=True, option="the run's model").staged() as staging:
            plain.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
