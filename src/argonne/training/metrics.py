"""What a run reports: the metrics log, TensorBoard and the console (`MetricsSink`, `format_record`), the figures of
a log interval read back from the device once (`LogInterval`), and the MFU's peak and the peak memory."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..metrics import training_flops_per_token
from ..parallel import Topology
from ..run_folder import METRICS_FILE, encode_record, keep_metrics_until
from .recovery import SkippedSteps, TrainingStopped


def log_main(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


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


def mean_over_ranks(value: torch.Tensor, topology: Topology) -> torch.Tensor:
    if topology.mesh is None:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, group=topology.mesh["dp"].get_group())
    return total / topology.dp


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


class LogInterval:
    """What the steps since the last log left on the device (losses, loss parts, skipped updates), read back once
    per log interval: reading waits for the device, so it is done once, for everything logged."""

    def __init__(self, run):
        self.run = run
        self.skipped = SkippedSteps(run.device)
        self.skipped_before = 0  # the total at the last log
        self.losses: list[torch.Tensor] = []
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.spike_flags: list[torch.Tensor] = []
        self.steps: list[tuple[int, int, int]] = []
        self.spikes: list[tuple[int, int, int]] = []  # the last read interval's spikes: (step index, draws)
        self.spike_total = 0
        self.lr, self.grad_norm = 0.0, None
        self.started = time.perf_counter()
        self.flops_per_token = training_flops_per_token(run.model_config, run.config.data.seq_len)

    def add(self, lr: float, step_loss: torch.Tensor, grad_norm: torch.Tensor, finite: torch.Tensor,
            parts: dict[str, torch.Tensor], spike: torch.Tensor, where: tuple[int, int, int]) -> None:
        """One step's learning rate and figures (training_step's); `where` is (step index, first draw, end draw)
        of its batches."""
        self.lr, self.grad_norm = lr, grad_norm  # the record shows the last step's
        self.skipped.update(finite)
        self.losses.append(step_loss)
        self.spike_flags.append(spike)
        self.steps.append(where)
        for name, value in parts.items():
            self.parts.setdefault(name, []).append(value)

    def leave_out(self, seconds: float) -> None:
        """Time spent evaluating is not training time: tokens/s and MFU are computed without it."""
        self.started += seconds

    def record(self, step: int, sink: MetricsSink) -> dict:
        """The record for the interval ending at `step` (1-based); stops the run after too many non-finite steps
        in a row. Starts the next interval."""
        run, tc = self.run, self.run.config.train
        losses = torch.stack(self.losses).float()
        loss, norm, total_skipped, longest_run, *flags = torch.cat([torch.stack([
            losses.mean(), self.grad_norm.float(), self.skipped.total.float(), self.skipped.longest_run.float(),
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
            "lr": self.lr,
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
            record[name] = mean_over_ranks(torch.stack(values).mean(), run.topology).item()
        self.skipped.longest_run.zero_()
        self.skipped_before = total_skipped
        self.losses.clear()
        self.parts.clear()
        self.spike_flags.clear()
        self.steps.clear()
        self.started = time.perf_counter()
        return record
