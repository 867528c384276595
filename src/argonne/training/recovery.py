"""When training goes wrong: updates skipped for non-finite figures (`SkippedSteps`) and for loss spikes
(`SpikeDetector`), on the device; the batches counted as drawn, with the ranges a rollback leaves out (`Draws`); the
rollback to the checkpoint before the spikes (`roll_back`); the stop a preemption signal asks for
(`PreemptionFlag`); and `TrainingStopped`, when the run cannot go on."""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from ..checkpoint import checkpoint_step, complete_checkpoints, run_id_of
from ..run_folder import set_aside_name


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps in a row, out of memory)."""


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


def roll_back(run, sink, spikes: list[tuple[int, int, int]], now: int) -> None:
    """Return to the newest checkpoint of this run saved before the first spike, with the batches drawn from the
    first spike's step to the last one's left out from then on: `run` (the loop's Run) goes on from that
    checkpoint's step, and `sink` (its MetricsSink) from its records.

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
    run.step = step


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
