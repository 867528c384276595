"""The periodic actions of the training loop, as hooks. After each step the loop calls `call_hooks`, which asks each
hook in turn whether it is `due(step, done)` (`step` counts the steps done; `done` is true after the last one) and
calls it if so. A call that returns True ends the step there (a rollback, a stop): the later hooks are not asked."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import torch

from ..data.batches import split_batch
from ..inference.sampling import NonFiniteLogits, SamplingParams
from ..parallel import any_process
from .metrics import LogInterval, MetricsSink
from .recovery import PreemptionFlag, TrainingStopped, roll_back


class Hook(Protocol):
    def due(self, step: int, done: bool) -> bool: ...

    def __call__(self, step: int, done: bool) -> bool | None: ...


def call_hooks(hooks: Sequence[Hook], step: int, done: bool) -> bool:
    """The hooks due after `step`, called in order until one ends the step; returns whether one did."""
    for hook in hooks:
        if hook.due(step, done) and hook(step, done):
            return True
    return False


class Log:
    """The log step, every train.log_every steps and after the last: the interval's record, with what the hooks
    before this one measured for it (validation's loss), written to the metrics log. The records written make the
    loop's summary."""

    def __init__(self, run, sink: MetricsSink):
        self.run, self.sink = run, sink
        self.interval = LogInterval(run)
        self.pending: dict = {}  # figures for this step's record
        self.summary: dict = {"step": run.start_step}

    def due(self, step: int, done: bool) -> bool:
        return step % self.run.config.train.log_every == 0 or done

    def __call__(self, step: int, done: bool) -> None:
        record = {**self.interval.record(step, self.sink), **self.pending}
        self.pending = {}
        self.write(record)

    def write(self, record: dict) -> None:
        self.sink.log(record)
        self.summary.update(record)

    def restart(self) -> None:
        """A new interval, after a rollback."""
        self.interval = LogInterval(self.run)


class Validation:
    """The held-out loss, on the log steps that train.eval_every (or the end) picks; its time is not training
    time."""

    def __init__(self, run, log: Log):
        self.run, self.log = run, log

    def due(self, step: int, done: bool) -> bool:
        every = self.run.config.train.eval_every
        return (self.run.validation is not None and self.log.due(step, done)
                and (bool(every and step % every == 0) or done))

    def __call__(self, step: int, done: bool) -> None:
        started = time.perf_counter()
        self.log.pending["val_loss"] = evaluate(self.run.model, self.run.validation, self.run.device, self.run.amp)
        self.log.interval.leave_out(time.perf_counter() - started)


class SpikeRollback:
    """At a log step: when train.spike_rollback_after loss spikes fell within the last train.spike_window steps,
    the run returns to the checkpoint before them (recovery.roll_back) and this step ends."""

    def __init__(self, run, sink: MetricsSink, log: Log):
        self.run, self.sink, self.log = run, sink, log
        self.recent: list[tuple[int, int, int]] = []  # (step index, first draw, end draw) within spike_window

    def due(self, step: int, done: bool) -> bool:
        return bool(self.run.config.train.spike_rollback_after) and self.log.due(step, done)

    def __call__(self, step: int, done: bool) -> bool:
        tc = self.run.config.train
        self.recent = [s for s in self.recent + self.log.interval.spikes if s[0] >= step - tc.spike_window]
        if len(self.recent) < tc.spike_rollback_after:
            return False
        roll_back(self.run, self.sink, self.recent, step)
        self.recent = []
        self.log.restart()
        return True


class Samples:
    """A greedy continuation of train.sample_prompt every train.sample_every steps, on the console."""

    def __init__(self, run, sink: MetricsSink):
        self.run, self.sink = run, sink

    def due(self, step: int, done: bool) -> bool:
        every = self.run.config.train.sample_every
        return bool(every and step % every == 0)

    def __call__(self, step: int, done: bool) -> None:
        run, tc = self.run, self.run.config.train
        self.sink.note("sample: " + sample_text(run.model, run.tokenizer, tc.sample_prompt, tc.sample_tokens,
                                                run.device, run.amp))


class Checkpoints:
    """A checkpoint every checkpoint.every steps, after the last, and when a preemption signal came to any process;
    then the run stops (`preempted`), saying how to resume. `due` asks every process, once a step."""

    def __init__(self, run, sink: MetricsSink, preemption: PreemptionFlag):
        self.run, self.sink, self.preemption = run, sink, preemption
        self.preempted = False

    def due(self, step: int, done: bool) -> bool:
        self.preempted = any_process(self.preemption.raised, self.run.topology)
        every = self.run.config.checkpoint.every
        return self.preempted or done or bool(every and step % every == 0)

    def __call__(self, step: int, done: bool) -> bool:
        self.sink.note(f"checkpoint saved: {self.run.save(step)}")
        if self.preempted:
            self.sink.note(f"stopped by a signal after step {step}; resume with --resume auto")
        return self.preempted


class Tasks:
    """The [eval] tasks (harness.TaskEvaluator) when eval.every says, in a record of their own. After the
    checkpoint: an evaluation that fails costs no training. Their time is not training time."""

    def __init__(self, run, log: Log):
        self.run, self.log = run, log

    def due(self, step: int, done: bool) -> bool:
        return self.run.tasks is not None and self.run.tasks.due(step, done)

    def __call__(self, step: int, done: bool) -> None:
        record = {"step": step, "tokens": step * self.run.tokens_per_step, **evaluate_tasks_or_stop(self.run, step)}
        self.log.interval.leave_out(record["eval_seconds"])
        self.log.write(record)


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
    from ..inference.engine import Engine, EngineSettings
    from ..inference.uncached import greedy_uncached

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


def evaluate_tasks_or_stop(run, step: int) -> dict:
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
