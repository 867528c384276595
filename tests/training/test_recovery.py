"""When training goes wrong (training/recovery.py): non-finite steps, loss spikes and their rollback."""

import json
import math

import pytest
import torch

from argonne import ArgonneForCausalLM
from argonne.run_config import ConfigError, load_run_config
from argonne.run_folder import read_metrics
from argonne.training.loop import train


class WithBadBatches:
    """The training batches with a batch of random tokens (a finite loss spike) drawn in place at each draw number
    in `bad`, the clean batches moving one draw later each time: the stream a run that never saw the bad batches
    would have read, with them inserted. The draw count is part of the data state, as a stream's position is."""

    def __init__(self, batches, bad: set[int]):
        self.batches, self.bad, self.drawn = batches, bad, 0

    def __iter__(self):
        clean = iter(self.batches)
        while True:
            self.drawn += 1
            if self.drawn - 1 in self.bad:
                yield torch.randint(0, 8192, (8, 33), generator=torch.Generator().manual_seed(self.drawn))
            else:
                yield next(clean)

    def state_dict(self):
        return {"clean": self.batches.state_dict(), "drawn": self.drawn}

    def load_state_dict(self, state):
        self.batches.load_state_dict(state["clean"])
        self.drawn = state["drawn"]


SPIKES = ["--train.spike_threshold=3", "--train.spike_window=4", "--train.spike_rollback_after=2",
          "--checkpoint.every=4", "--checkpoint.keep=0"]


def test_loss_spikes_roll_back_and_skip_their_batches_to_end_as_a_run_that_never_saw_them(
        prepared_sample, tmp_path, monkeypatch):
    """Bad batches at steps 12 and 13 are spikes (updates skipped); the second rolls the run back to step 8's
    checkpoint with those two draws skipped; it ends where the clean run ends. A resume from the re-saved step-8
    checkpoint makes the same decision by itself."""
    import argonne.training.build

    from ..launches import records, train_here

    clean = train_here(prepared_sample, tmp_path / "clean", steps=16, extra=SPIKES)
    assert records(tmp_path / "clean")[-1]["spikes"] == 0
    real_data = argonne.training.build.pretraining_data
    monkeypatch.setattr(argonne.training.build, "pretraining_data",
                        lambda *args, **kwargs: (WithBadBatches(real_data(*args, **kwargs)[0], {11, 12}), None))
    recovered = train_here(prepared_sample, tmp_path / "spiky", steps=16, extra=SPIKES)
    log = records(tmp_path / "spiky")
    rollback = next(r for r in log if "rolled_back_from" in r)
    assert rollback == {"step": 8, "rolled_back_from": 13, "spike_steps": [12, 13], "skipped_batches": [11, 13],
                        "rollbacks": 1}
    assert recovered == clean  # to the bit: from step 8 on the same weights see the same batches
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 17))  # the replaced records are gone
    checkpoints = tmp_path / "spiky" / "checkpoints"
    assert (checkpoints / "step-00000012.rolled-back-1").is_dir()  # saved after a spike: set aside, not resumed
    resumed = train_here(prepared_sample, tmp_path / "resumed", steps=16,
                         extra=[*SPIKES, "--resume", str(checkpoints / "step-00000008")])
    assert resumed == {step: loss for step, loss in clean.items() if step > 8}
    assert records(tmp_path / "resumed")[-1]["spikes"] == 0


def test_a_checkpoint_written_before_spike_recovery_still_resumes_exactly(prepared_sample, one_process, tmp_path,
                                                                          monkeypatch):
    """Checkpoints of earlier versions hold no `recovery` record: they resume, as having skipped nothing."""
    import argonne.training.loop

    from ..launches import train_here

    with_record = argonne.training.loop.Run.train_state
    monkeypatch.setattr(argonne.training.loop.Run, "train_state",
                        lambda self, step: {k: v for k, v in with_record(self, step).items() if k != "recovery"})
    train_here(prepared_sample, tmp_path / "old", extra=["--checkpoint.every=5", "--checkpoint.keep=0"])
    monkeypatch.undo()
    checkpoint = tmp_path / "old" / "checkpoints" / "step-00000005"
    resumed = train_here(prepared_sample, tmp_path / "resumed", extra=["--resume", str(checkpoint)])
    straight, _ = one_process
    assert resumed == {step: loss for step, loss in straight.items() if step > 5}


def test_spike_rollback_needs_checkpoints_and_spike_settings_are_checked():
    with pytest.raises(ConfigError, match="train.spike_rollback_after needs checkpoint.every > 0"):
        load_run_config(None, ["--train.spike_threshold=6", "--data.prepared=x"])
    with pytest.raises(ConfigError, match="train.spike_window must be >= 2"):
        load_run_config(None, ["--train.spike_window=1", "--data.prepared=x"])
    load_run_config(None, ["--train.spike_threshold=6", "--train.spike_rollback_after=0", "--data.prepared=x"])


def test_the_spike_detector_skips_finite_spikes_and_keeps_them_out_of_its_window():
    from argonne.training.recovery import SpikeDetector

    detector = SpikeDetector(window=4, threshold=3.0, device="cpu")
    finite = torch.tensor(True)
    flags = [bool(detector(torch.tensor(loss), finite)) for loss in [5.0, 4.9, 5.1, 5.0, 5.05, 9.0, 9.0, 5.0]]
    assert flags == [False, False, False, False, False, True, True, False]
    assert sorted(detector.losses.tolist()) == pytest.approx([5.0, 5.0, 5.05, 5.1])  # the last 4 accepted
    assert not detector(torch.tensor(float("nan")), torch.tensor(False))  # non-finite: skipped elsewhere


@pytest.mark.slow
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, tiny_run_args, monkeypatch):
    from argonne.modeling_argonne import ArgonneForCausalLM
    from argonne.training.recovery import TrainingStopped

    real_forward, calls = ArgonneForCausalLM.forward, []
    poisoned = {3}

    def forward(self, *args, **kwargs):
        output = real_forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) in poisoned:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(ArgonneForCausalLM, "forward", forward)
    config = load_run_config(None, tiny_run_args(tmp_path, "--train.steps=6", "--train.log_every=1",
                                                 "--train.tensorboard=false"))
    train(config)
    records, _ = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert math.isnan(records[2]["loss"]) and all(math.isfinite(r["loss"]) for r in records[3:])
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():  # NaN stays NaN, in valid JSON
        json.loads(line, parse_constant=lambda name: pytest.fail(f"metrics.jsonl holds {name}, which is not JSON"))

    calls.clear()
    poisoned.update(range(1, 100))
    config = load_run_config(None, tiny_run_args(tmp_path / "again", "--train.steps=6",
                                                 "--train.max_nonfinite_in_a_row=2"))
    # Counted on the device and read at the log step (here the last): every one of the 6 steps was skipped.
    with pytest.raises(TrainingStopped, match=r"6 steps in a row had a non-finite loss.*in_a_row \(now 2\)"):
        train(config)


def test_a_rollback_sets_aside_under_a_free_name_when_an_earlier_branch_used_it(tmp_path):
    """A run resumed from before its rollback rolls back again with the same count: the folder the first branch set
    aside stays, and the new one takes the next free name (it crashed with 'Directory not empty')."""
    from argonne.run_folder import set_aside_name

    later = tmp_path / "step-00000012"
    later.mkdir()
    first = set_aside_name(later, "rolled-back-1")
    later.rename(first)
    (first / "COMPLETE").write_text("{}")
    later.mkdir()
    second = set_aside_name(later, "rolled-back-1")
    later.rename(second)
    assert (first.name, second.name) == ("step-00000012.rolled-back-1", "step-00000012.rolled-back-1-2")
    assert (first / "COMPLETE").is_file()
