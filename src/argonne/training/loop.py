"""`argonne train CONFIG.toml` (and `argonne sft`, `argonne distill`): the run built (`build_run`), the loop
(`train_loop`: a step, then the hooks that are due), and the trained model exported.

Set up (config, processes, device) -> build (model, parallelism, optimizer, data: build.py) -> run (the loop).
The same code runs in one process and under `torchrun` on one or many nodes: the ("dp", "tp") device mesh decides
what is sharded (see parallel.py). Checkpoints are sharded DCP folders (checkpoint.py); `--resume auto` continues
from the latest complete one, with any number of processes or parallel layout (resume.py).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import (
    CheckpointError, load_checkpoint, read_checkpoint_metadata, read_state_record, save_checkpoint,
)
from ..configuration_argonne import ArgonneConfig
from ..data.batches import split_batch
from ..data.settings import DataError
from ..device import resolve_device
from ..loading import ModelError, check_finite_weights
from ..metrics import count_parameters, training_flops_per_token
from ..modeling_argonne import ArgonneForCausalLM
from ..optim import build_optimizer, check_resumable, lr_at, set_lr
from ..parallel import Topology, clip_grad_norm, describe_float8, from_main_process, init_distributed
from ..run_config import RunConfig, check_command
from ..run_folder import RunFolderError
from .build import PRETRAINING, TrainSpec, build_model, build_model_config, build_tokenizer, compute_dtype
from .hooks import Checkpoints, Log, Samples, SpikeRollback, Tasks, Validation, call_hooks
from .metrics import MetricsSink, log_main, mean_over_ranks, mfu_peak
from .recovery import Draws, PreemptionFlag, SpikeDetector, TrainingStopped
from .resume import RunStart, choose_checkpoint, claim_run_folder, main_decides, start_run_folder


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


def _train(config: RunConfig, spec: TrainSpec, topology: Topology, start: RunStart) -> dict:
    """The run, in a claimed run folder: build it, record it in the folder, loop, then export the trained model."""
    run = build_run(config, spec, topology, start.resume_from, start.run_id)
    main_decides(lambda: start_run_folder(run, start), topology)
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
            from ..plot import plot_run

            plot_run(run_dir)
            log_main(0, finished_line(summary, run_dir))
    return summary


def finished_line(summary: dict, run_dir: Path) -> str:
    """The last line of a finished run: where it ended and where its outputs are."""
    reached = f"loss {summary['loss']:.2f}" if "loss" in summary else ""
    if "val_loss" in summary:
        val = summary["val_loss"]
        reached += f", validation loss {val:.2f} (perplexity {math.exp(min(val, 50)):,.0f})"
    return (f"done after step {summary['step']}: {reached}; the model is in {run_dir / 'model'}, the loss curve in "
            f"{run_dir / 'loss.png'}")


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
    step: int = 0  # the steps done: where the loop is (a rollback moves it back)
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
        from ..harness import TaskEvaluator

        run.tasks = TaskEvaluator(config.eval, tokenizer, topology)
    if resume_from is not None:
        check_resumable(resume_from, config.optim)
        run.start_step = run.load(resume_from, verify=False)
    return run


def train_loop(run: Run, sink: MetricsSink) -> dict:
    """Steps from run.start_step to train.steps, each followed by the hooks that are due, in this order: validation,
    the log record, a rollback after loss spikes, a sample, a checkpoint (and the stop a preemption signal asks for),
    the [eval] tasks (hooks.py). Returns the last records logged, with `preempted` and `elapsed_s`."""
    config, tc = run.config, run.config.train
    started = time.perf_counter()
    with PreemptionFlag() as preemption:
        log, checkpoints = Log(run, sink), Checkpoints(run, sink, preemption)
        hooks = [Validation(run, log), log, SpikeRollback(run, sink, log), Samples(run, sink), checkpoints,
                 Tasks(run, log)]
        run.model.train()
        run.step = run.start_step
        while run.step < tc.steps and not checkpoints.preempted:
            lr = lr_at(run.step, config.optim, tc.steps)
            set_lr(run.optimizers, lr)
            first_draw = run.draws.drawn
            try:
                figures = training_step(run.model, run.optimizers, run.draws, run.objective, run.amp, config,
                                        run.topology, run.device, run.spikes)
            except torch.OutOfMemoryError as error:
                raise TrainingStopped(oom_message(error, run.device, config)) from error
            log.interval.add(lr, *figures, where=(run.step, first_draw, run.draws.drawn))
            sink.step_done()
            run.step += 1
            call_hooks(hooks, run.step, done=run.step == tc.steps)
    return {**log.summary, "preempted": checkpoints.preempted, "elapsed_s": time.perf_counter() - started}


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
    step_loss = mean_over_ranks(step_loss, topology)  # every process then agrees on skipping
    finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
    spike = spikes(step_loss, finite) if spikes is not None else torch.zeros_like(finite)
    found_inf = (~finite | spike).float()
    for optimizer in optimizers:
        optimizer.found_inf = found_inf  # fused AdamW's on-device skip (what GradScaler uses), and Muon's
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, finite, parts, spike


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
        from ..outputs import FOLDER, Output

        plain = ArgonneForCausalLM(model_config)
        plain.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
        # The run's own model/ (an earlier run's was refused or set aside before training): replaced whole, never
        # left half-written by a crash.
        with Output(output, FOLDER, overwrite=True, option="the run's model").staged() as staging:
            plain.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
