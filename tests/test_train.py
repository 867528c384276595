"""The single-process trainer on tiny data: config handling, schedule, and that the loss falls."""

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
from argonne.run_config import ConfigError, OptimSection, check_command, load_run_config
from argonne.run_folder import read_metrics
from argonne.optim import build_optimizer
from argonne.train import train

from .conftest import (BROKEN_TENSORS, REPO, SAMPLE_SHARD, SAMPLE_TOKENIZER, break_weights, small_model,
                       write_sample_head)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from argonne import load_tokenizer
    from argonne.data import DocumentSettings
    from argonne.data.prepare import PrepareSettings, prepare_dataset

    out = tmp_path_factory.mktemp("prepared")
    prepare_dataset([write_sample_head(tmp_path_factory.mktemp("sample") / "head.parquet")], load_tokenizer(SAMPLE_TOKENIZER), out,
                    PrepareSettings(seq_len=64, workers=0, documents=DocumentSettings(val_fraction=0.02)),
                    progress=False)
    return out


def streaming_run_args(tmp_path, *extra):
    return [
        f"--data.inputs=[{str(write_sample_head(tmp_path / 'sample-head.parquet'))!r}]",
        f"--data.tokenizer={str(SAMPLE_TOKENIZER)!r}",
        f"--train.run_dir={str(tmp_path / 'run')!r}",
        "--model.overrides={num_hidden_layers = 2, hidden_size = 128, intermediate_size = 344}",
        "--data.seq_len=64",
        "--data.val_fraction=0.02",
        "--train.micro_batch_size=8",
        "--train.peak_tflops=1",
        *extra,
    ]


@pytest.fixture
def tiny_run_args(prepared):
    """Arguments for a quick run on prepared data (streaming costs a tokenization pass per run)."""

    def args(tmp_path, *extra):
        return [a for a in streaming_run_args(tmp_path) if not a.startswith(("--data.inputs", "--data.val_fraction"))] + [
            "--data.inputs=[]", f"--data.prepared={str(prepared)!r}", "--data.workers=0", *extra]

    return args


def test_shipped_quickstart_config_loads():
    config = load_run_config(REPO / "configs" / "tiny.toml")
    assert config.model.preset == "tiny" and config.data.tokenizer.endswith("sample-bpe-8k")


def test_overrides_are_typed_and_checked(tmp_path):
    config = load_run_config(None, ["--optim.lr=1e-2", "--train.steps=7", "--data.inputs=['a.parquet']"])
    with pytest.raises(ConfigError, match="exactly one of data.inputs"):
        load_run_config(None, ["--data.inputs=['a.parquet']", "--data.prepared=out"])
    assert (config.optim.lr, config.train.steps, config.data.inputs) == (1e-2, 7, ["a.parquet"])
    with pytest.raises(ConfigError, match=r"\[optim\] has unknown field\(s\) \['learning_rate'\]"):
        load_run_config(None, ["--optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="train.steps must be > 0"):
        load_run_config(None, ["--train.steps=0"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_run_config(tmp_path / "missing.toml")
    inputs = "--data.inputs=['a.parquet']"
    for given, meant in (("true", "full"), ("false", "none"), ("selective", "selective")):
        config = load_run_config(None, [inputs, f"--parallel.activation_checkpointing={given}"])
        assert config.parallel.activation_checkpointing == meant
    with pytest.raises(ConfigError, match="activation_checkpointing must be none, full or selective, got 'some'"):
        load_run_config(None, [inputs, "--parallel.activation_checkpointing=some"])


@pytest.mark.slow
def test_a_wsd_run_resumed_mid_decay_equals_the_uninterrupted_run(prepared_sample, tmp_path):
    from .launches import records, train_here

    wsd = ["--optim.schedule=wsd", "--optim.decay_fraction=0.5", "--checkpoint.every=3", "--checkpoint.keep=0"]
    straight = train_here(prepared_sample, tmp_path / "straight", steps=10, extra=wsd)
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-00000006"  # the decay runs from step 5
    resumed = train_here(prepared_sample, tmp_path / "resumed", steps=10, extra=[*wsd, "--resume", str(checkpoint)])
    lrs = [{r["step"]: r["lr"] for r in records(tmp_path / run) if "lr" in r} for run in ("straight", "resumed")]
    assert {s: l for s, l in straight.items() if s > 6} == resumed and min(resumed) == 7
    assert {s: l for s, l in lrs[0].items() if s > 6} == lrs[1]
    assert lrs[0][4] == lrs[0][5] > lrs[0][7] > lrs[0][10]  # held, then decaying


def test_z_loss_trains_with_the_cross_entropy_and_is_logged_apart(prepared_sample, one_process, tmp_path):
    """The first step's cross-entropy is the plain run's loss (same weights, same batch); the logged loss is
    ce + c * z; distillation, whose loss has no z term, refuses the option."""
    from .launches import records, train_here

    train_here(prepared_sample, tmp_path / "z", steps=3, extra=["--train.z_loss=0.01"])
    logged = [r for r in records(tmp_path / "z") if "loss" in r]
    plain, _ = one_process
    assert abs(logged[0]["ce"] - plain[1]) <= 1e-6 * plain[1]
    for record in logged:
        assert record["z_loss"] > 1.0  # log(vocab)^2 at the start, about 81
        assert abs(record["loss"] - (record["ce"] + 0.01 * record["z_loss"])) <= 1e-5 * record["loss"]
    with pytest.raises(ConfigError, match="train.z_loss is not part of the distillation loss"):
        check_command(load_run_config(None, ["--distill.teacher=t", "--train.z_loss=1e-4", "--data.prepared=x"]),
                      "distill")


# Emulated FP8 against the same run without it, over 20 steps of the test model in bf16 (CPU autocast): measured
# 0.06% (tensorwise) and 0.02% (rowwise) at most; docs/training.md quotes this bound.
FLOAT8_LOSS_TOLERANCE = 0.01


def test_float8_trains_within_tolerance_of_bf16_and_its_checkpoints_resume_and_export_without_it(prepared_sample,
                                                                                                tmp_path, capsys):
    """20 steps in bf16 with each FP8 recipe (emulated) stay within FLOAT8_LOSS_TOLERANCE of bf16 at every step
    and are not bf16 (FP8 really rounds); the FP8 run's checkpoint holds the same tensors as bf16's, resumes with
    FP8 off (and bf16's with FP8 on) and exports to a Hugging Face folder equal to the trained weights."""
    from argonne.checkpoint import read_checkpoint_metadata
    from argonne.export import export_model
    from argonne.loading import open_model

    from .launches import train_here

    def run(name, *extra, steps=20):
        options = ["--train.dtype=bfloat16", "--checkpoint.every=10", "--checkpoint.keep=0", *extra]
        return train_here(prepared_sample, tmp_path / name, steps=steps, micro=4, extra=options)

    bf16, float8 = run("bf16"), {}
    for recipe in ("tensorwise", "rowwise"):
        float8[recipe] = run(recipe, f"--parallel.float8={recipe}")
        distance = [abs(float8[recipe][s] - bf16[s]) / bf16[s] for s in bf16]
        assert len(distance) == 20 and max(distance) < FLOAT8_LOSS_TOLERANCE and max(distance) > 0, distance
        assert (f"float8 {recipe} (emulated: no FP8 matmuls on this device): 14 of 14 block linears in FP8; the "
                "output head in high precision") in capsys.readouterr().out
    run("skip", "--parallel.float8=rowwise", "--parallel.float8_skip=['last']", steps=1)
    assert ("float8 rowwise (emulated: no FP8 matmuls on this device): 7 of 14 block linears in FP8; high precision: "
            "model.layers.1.self_attn.q_proj,") in capsys.readouterr().out
    step_10 = {name: tmp_path / name / "checkpoints" / "step-00000010" for name in ("bf16", "tensorwise")}
    saved = {name: {key: (entry.size, entry.properties.dtype) for key, entry in
                    read_checkpoint_metadata(path).state_dict_metadata.items() if key.startswith("model.")}
             for name, path in step_10.items()}
    assert saved["tensorwise"] == saved["bf16"]
    for name, resume_from, extra, straight in (("fp8 to bf16", "tensorwise", [], float8["tensorwise"]),
                                                ("bf16 to fp8", "bf16", ["--parallel.float8=rowwise"], bf16)):
        resumed = run(name, *extra, "--resume", str(step_10[resume_from]))
        assert sorted(resumed) == list(range(11, 21))
        assert all(abs(resumed[s] - straight[s]) < FLOAT8_LOSS_TOLERANCE * straight[s] for s in resumed)
    export_model(step_10["tensorwise"], "hf", tmp_path / "hf", "fp32")
    exported, _ = open_model(tmp_path / "hf", "cpu", "float32")
    trained, _ = open_model(step_10["tensorwise"], "cpu", "float32")
    assert all(torch.equal(tensor, trained.state_dict()[name]) for name, tensor in exported.state_dict().items())


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
    import argonne.train

    from .launches import records, train_here

    clean = train_here(prepared_sample, tmp_path / "clean", steps=16, extra=SPIKES)
    assert records(tmp_path / "clean")[-1]["spikes"] == 0
    real_data = argonne.train.pretraining_data
    monkeypatch.setattr(argonne.train, "pretraining_data",
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
    import argonne.train

    from .launches import train_here

    with_record = argonne.train.Run.train_state
    monkeypatch.setattr(argonne.train.Run, "train_state",
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
    from argonne.train import SpikeDetector

    detector = SpikeDetector(window=4, threshold=3.0, device="cpu")
    finite = torch.tensor(True)
    flags = [bool(detector(torch.tensor(loss), finite)) for loss in [5.0, 4.9, 5.1, 5.0, 5.05, 9.0, 9.0, 5.0]]
    assert flags == [False, False, False, False, False, True, True, False]
    assert sorted(detector.losses.tolist()) == pytest.approx([5.0, 5.0, 5.05, 5.1])  # the last 4 accepted
    assert not detector(torch.tensor(float("nan")), torch.tensor(False))  # non-finite: skipped elsewhere


@pytest.mark.slow
def test_a_muon_run_resumed_mid_run_equals_the_uninterrupted_run(prepared_sample, muon_one_process, tmp_path,
                                                                  capsys):
    """Muon's momentum buffers are in the checkpoint (the uninterrupted run is the distributed tests' one-process
    reference, checkpointed at step 5); an AdamW run may not resume its state."""
    from argonne_cli import main

    from .launches import MUON, cli_args, train_here

    straight, run_dir = muon_one_process
    checkpoint = run_dir / "checkpoints" / "step-00000005"
    resumed = train_here(prepared_sample, tmp_path / "resumed", extra=[*MUON, "--resume", str(checkpoint)])
    assert {s: l for s, l in straight.items() if s > 5} == resumed and min(resumed) == 6
    assert straight[10] < straight[1]

    assert main(cli_args(prepared_sample, tmp_path / "as adamw", extra=["--resume", str(checkpoint)])) == 2
    assert "its optimizer state is muon's (written with optim.optimizer = 'muon') and this run has " \
           "optim.optimizer = 'adamw'" in capsys.readouterr().err
    assert not (tmp_path / "as adamw" / "metrics.jsonl").exists()


def test_a_non_finite_step_leaves_every_weight_and_optimizer_state_unchanged():
    """For both optimizers of a Muon run (AdamW's moments and step count, Muon's momentum), on the device."""
    from contextlib import nullcontext

    from argonne.run_config import RunConfig
    from argonne.parallel import Topology
    from argonne.train import cross_entropy_objective, training_step

    torch.manual_seed(0)
    model = ArgonneForCausalLM(ArgonneConfig.from_preset(
        "tiny", num_hidden_layers=2, vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16))
    config = RunConfig()
    config.optim.optimizer = "muon"
    optimizers = build_optimizer(model, config.optim)
    batch = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))

    def step(objective):
        return training_step(model, optimizers, lambda: batch, objective, nullcontext, config, Topology(),
                             torch.device("cpu"))

    def snapshot():
        states = [{k: v.clone() for k, v in o.state[p].items()} for o in optimizers for g in o.param_groups
                  for p in g["params"]]
        return {n: p.detach().clone() for n, p in model.named_parameters()}, states

    step(cross_entropy_objective)  # optimizer state to keep
    before = snapshot()
    assert any("momentum_buffer" in state for state in before[1])
    finite = step(lambda *args: (cross_entropy_objective(*args)[0] * float("nan"), {}))[2]
    assert not finite
    after = snapshot()
    assert after[0].keys() == before[0].keys() and all(torch.equal(after[0][n], before[0][n]) for n in before[0])
    for old, new in zip(before[1], after[1]):
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    finite = step(cross_entropy_objective)[2]
    assert finite and not torch.equal(model.model.layers[0].self_attn.q_proj.weight, before[0][
        "model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.slow
def test_tiny_training_run_lowers_the_loss_and_saves_a_model(tmp_path):
    config = load_run_config(None, streaming_run_args(tmp_path, "--train.steps=30", "--train.log_every=5",
                                                 "--optim.warmup_steps=5", "--data.val_windows=8"))
    summary = train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert records[0]["loss"] > records[-1]["loss"] + 1.0, records
    assert math.isfinite(summary["val_loss"]) and summary["val_loss"] < math.log(8192)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "model" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_tokenizer_larger_than_the_vocabulary_is_an_error(tmp_path, tiny_run_args):
    config = load_run_config(None, tiny_run_args(tmp_path, "--model.overrides={vocab_size = 1000}"))
    with pytest.raises(ConfigError, match="8192 tokens but model preset 'tiny' has vocab_size 1000"):
        train(config)


def test_bad_text_column_names_the_file(tmp_path, tiny_run_args):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"content": ["hello"]}), bad)
    config = load_run_config(None, streaming_run_args(tmp_path, f"--data.inputs=[{str(bad)!r}]"))
    with pytest.raises(ValueError, match=r"bad.parquet: no column 'text'"):
        train(config)


@pytest.mark.slow
def test_quickstart_run_writes_plot_checkpoint_and_tensorboard(tmp_path, tiny_run_args):
    config = load_run_config(None, tiny_run_args(tmp_path, "--train.steps=4", "--train.log_every=2"))
    train(config)
    run = tmp_path / "run"
    assert (run / "loss.png").stat().st_size > 10_000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    checkpoint = run / "checkpoints" / "step-00000004"
    assert (checkpoint / "COMPLETE").is_file() and (checkpoint / "config.json").is_file()
    assert (checkpoint / "tokenizer.json").is_file() and (checkpoint / "run_config.json").is_file()


def test_plot_command(tmp_path, capsys):
    from argonne_cli import main

    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "tokens": 100 * s, "loss": 5.0 / s} for s in range(1, 6)]
    records[-1]["val_loss"] = 1.5
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["plot", str(run)]) == 0
    assert (run / "loss.png").is_file()
    assert main(["plot", str(tmp_path / "nothing")]) == 2


@pytest.mark.slow
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, tiny_run_args, monkeypatch):
    from argonne.modeling_argonne import ArgonneForCausalLM
    from argonne.train import TrainingStopped

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


@pytest.mark.slow
def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, tiny_run_args, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from argonne.checkpoint import latest_checkpoint

    real_save, saves = dcp.save, []

    def dying_save(state, checkpoint_id):
        saves.append(checkpoint_id)
        if len(saves) == 2:
            Path(checkpoint_id, "__0_0.distcp").write_bytes(b"half a shard")
            raise KeyboardInterrupt("killed while saving")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(dcp, "save", dying_save)
    args = tiny_run_args(tmp_path, "--train.steps=6", "--checkpoint.every=2",                          "--train.tensorboard=false")
    with pytest.raises(KeyboardInterrupt):
        train(load_run_config(None, args))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "step-00000004.tmp").is_dir()
    assert latest_checkpoint(checkpoints).name == "step-00000002"
    monkeypatch.setattr(dcp, "save", real_save)
    summary = train(load_run_config(None, args), resume="auto")
    assert summary["step"] == 6
    assert latest_checkpoint(checkpoints).name == "step-00000006"


@pytest.mark.parametrize("options", [
    ["--parallel.activation_checkpointing=true"],  # the boolean spelling means "full"
    ["--parallel.activation_checkpointing=selective"],
    ["--parallel.compile=true"],
    ["--parallel.compile=true", "--parallel.activation_checkpointing=selective"],
])
@pytest.mark.slow
def test_checkpointing_and_compile_keep_the_losses(tmp_path, tiny_run_args, options):
    def run(name, *extra):
        args = tiny_run_args(tmp_path / name, "--train.steps=3", "--train.log_every=1", "--train.tensorboard=false",
                             "--data.val_windows=0", *extra)
        train(load_run_config(None, args))
        return [json.loads(line)["loss"] for line in (tmp_path / name / "run" / "metrics.jsonl").open()]

    from torch._dynamo.utils import counters

    eager = run("eager")
    counters.clear()
    changed = run("changed", *options)
    assert changed == pytest.approx(eager, rel=1e-4)
    # Equal losses would also come from a compile that silently stayed eager: dynamo must have made graphs.
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0 if "--parallel.compile=true" in options else compiled == 0, dict(counters["stats"])


@pytest.mark.slow
def test_the_loop_reads_device_values_only_at_log_steps(tmp_path, tiny_run_args, monkeypatch):
    """No host synchronisation inside a step: the number of device-to-host reads does not grow with the number
    of steps between two logs (on a GPU each read would stall the queue of work)."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, **kwargs):
            reads.append(1)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def reads_in_a_run(steps: int) -> int:
        reads.clear()
        train(load_run_config(None, tiny_run_args(
            tmp_path / str(steps), f"--train.steps={steps}", f"--train.log_every={steps}", "--data.val_windows=0",
            "--train.tensorboard=false", "--train.micro_batch_size=2", "--train.grad_accum=2")))
        return len(reads)

    assert reads_in_a_run(2) == reads_in_a_run(7)


def test_out_of_memory_is_explained(tmp_path, tiny_run_args, monkeypatch):
    from argonne.modeling_argonne import ArgonneForCausalLM
    from argonne.train import TrainingStopped

    def exhausted(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ArgonneForCausalLM, "forward", exhausted)
    with pytest.raises(TrainingStopped, match=r"out of memory at micro_batch_size 8 x seq_len 64.*train.grad_accum"):
        train(load_run_config(None, tiny_run_args(tmp_path, "--train.steps=2")))


def test_shipped_configs_load_and_fit_their_presets():
    from argonne import ArgonneConfig

    for name in ("tiny", "small", "argonne-2.0", "tiny-plus", "small-plus"):
        config = load_run_config(REPO / "configs" / f"{name}.toml")
        model = ArgonneConfig.from_preset(config.model.preset, **config.model.overrides)
        tp = config.parallel.tensor_parallel
        assert model.num_key_value_heads % tp == 0 and model.intermediate_size % tp == 0
    original = load_run_config(REPO / "configs" / "argonne-2.0.toml")
    assert (original.parallel.tensor_parallel, original.train.grad_accum, original.data.seq_len) == (8, 4, 4096)
    assert (original.optim.lr, original.optim.min_lr, original.optim.warmup_steps) == (1e-4, 1e-5, 2000)
    assert (original.optim.weight_decay, original.optim.grad_clip) == (0.1, 1.0)
    for name in ("tiny", "small"):  # the -plus configs: the original's, with the ablation's winner
        plain, plus = (load_run_config(REPO / "configs" / f"{n}.toml").to_dict() for n in (name, f"{name}-plus"))
        assert plus["model"]["preset"] == f"{name}-plus" and plus["optim"]["optimizer"] == "muon"
        assert plain["optim"]["optimizer"] == "adamw"
        for section, field in (("model", "preset"), ("optim", "optimizer"), ("train", "run_dir")):
            plus[section][field] = plain[section][field]
        assert plus == plain


def test_a_checkpoint_resumes_into_a_differently_grouped_optimizer(tmp_path):
    """The AdamW state is restored per parameter; hyperparameters come from the new run's config, so a checkpoint
    whose optimizer grouped parameters differently (an older version, another layout) still resumes."""
    from argonne import ArgonneConfig, ArgonneForCausalLM
    from argonne.checkpoint import load_checkpoint, save_checkpoint

    config = ArgonneConfig.from_preset("tiny", num_hidden_layers=1, vocab_size=512)
    torch.manual_seed(0)
    saved_model = ArgonneForCausalLM(config)
    params = list(saved_model.parameters())
    one_group_each_half = [{"params": params[::2]}, {"params": params[1::2], "weight_decay": 0.5}]
    saved_optimizer = torch.optim.AdamW(one_group_each_half, lr=1e-3)
    tokens = torch.randint(0, 512, (2, 17))
    saved_model(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward()
    saved_optimizer.step()
    path = save_checkpoint(tmp_path, 1, saved_model, saved_optimizer, {"step": 1}, is_main=True)

    model = ArgonneForCausalLM(config)
    [optimizer] = build_optimizer(model, OptimSection(weight_decay=0.1))
    assert load_checkpoint(path, model, optimizer, {"step": 0})["step"] == 1
    for (name, param), saved in zip(model.named_parameters(), params):
        assert torch.equal(param, saved), name
        assert torch.equal(optimizer.state[param]["exp_avg"], saved_optimizer.state[saved]["exp_avg"]), name
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0, 0.0]  # from the new config


@pytest.mark.slow
def test_streamed_rows_skipped_are_counted_in_the_metrics(tmp_path):
    texts = pq.read_table(SAMPLE_SHARD, columns=["text"]).column("text").to_pylist()[:40]
    bad = tmp_path / "bad-rows.parquet"
    pq.write_table(pa.table({"text": [texts[0], None, *texts[1:]]}), bad, row_group_size=8)
    config = load_run_config(None, streaming_run_args(
        tmp_path, f"--data.inputs=[{str(bad)!r}]", "--data.on_error='skip'", "--data.val_fraction=0",
        "--data.val_windows=0", "--data.workers=0", "--train.steps=2", "--train.log_every=1",
        "--train.tensorboard=false"))
    train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["data_skipped_null_text"], r["data_skipped_invalid_utf8"], r["data_skipped_files"])
            for r in records] == [(1, 0, 0), (1, 0, 0)]


# ------------------------------------------------------------------------------------------------ the run folder


def run_steps(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")[0]}


@pytest.mark.slow
def test_a_fresh_start_in_a_used_run_folder_is_refused_until_overwrite(tmp_path, tiny_run_args, capsys):
    from argonne_cli import main
    from argonne.run_folder import RunFolderError

    args = tiny_run_args(tmp_path, "--train.steps=4", "--train.log_every=1", "--checkpoint.every=1",
                         "--checkpoint.keep=3", "--train.tensorboard=false", "--data.val_windows=0")
    train(load_run_config(None, args))
    run = tmp_path / "run"
    before = (run / "metrics.jsonl").read_text(), sorted(p.name for p in (run / "checkpoints").iterdir())
    assert before[1] == ["step-00000002", "step-00000003", "step-00000004"]
    shorter = load_run_config(None, args + ["--train.steps=2"])
    with pytest.raises(RunFolderError, match=r"holds an earlier run \(3 checkpoint folder\(s\), metrics\.jsonl "
                                             r"\(4 records\), a trained model/, loss\.png\).*--resume auto.*"
                                             r"--overwrite"):
        train(shorter)
    assert main(["train", str(REPO / "configs" / "tiny.toml"), *args]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert ((run / "metrics.jsonl").read_text(), sorted(p.name for p in (run / "checkpoints").iterdir())) == before
    with pytest.raises(RunFolderError, match="choose one"):
        train(shorter, resume="auto", overwrite=True)

    train(shorter, overwrite=True)  # deletes the earlier run, then trains afresh
    assert sorted(run_steps(run)) == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]


@pytest.mark.slow
def test_resume_auto_skips_a_damaged_checkpoint_and_a_torn_metrics_line(tmp_path, tiny_run_args, capsys):
    from argonne.checkpoint import CheckpointError

    def args(run_dir, steps):
        return tiny_run_args(run_dir, f"--train.steps={steps}", "--train.log_every=1", "--checkpoint.every=2",
                             "--checkpoint.keep=0", "--train.tensorboard=false", "--data.val_windows=0")

    straight = tmp_path / "straight"
    train(load_run_config(None, args(straight, 6)))
    run = tmp_path / "interrupted"
    train(load_run_config(None, args(run, 4)))
    checkpoints = run / "run" / "checkpoints"
    newest = next((checkpoints / "step-00000004").glob("*.distcp"))
    with open(newest, "r+b") as f:  # 4 KB of 0xFF in the middle of the newest shard
        f.seek(newest.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    damaged = newest.read_bytes()
    with open(run / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.')  # a crash mid-write
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="step-00000004: failed verification: .*does not match its checksum"):
        train(load_run_config(None, args(run, 6)), resume=str(checkpoints / "step-00000004"))
    train(load_run_config(None, args(run, 6)), resume="auto")
    out = capsys.readouterr().out
    assert "--resume auto: skipping step-00000004" in out and "does not match its checksum" in out
    assert "resumed from" in out and "step-00000002 at step 2" in out and "torn last line" in out
    assert run_steps(run / "run") == run_steps(straight / "run")  # steps 3-6 replayed exactly
    assert read_marker_step(checkpoints / "step-00000004") == 4  # a good one saved on the way
    assert "step-00000004, which failed verification, is kept as step-00000004.unverified" in out
    assert (checkpoints / "step-00000004.unverified" / newest.name).read_bytes() == damaged  # never deleted
    from argonne.checkpoint import verify_checkpoint

    assert verify_checkpoint(checkpoints / "step-00000004")
    for path in checkpoints.iterdir():  # and when none verifies, auto does not start over silently
        for shard in path.glob("*.distcp"):
            shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="none of the 3 checkpoint.*verifies.*--overwrite"):
        train(load_run_config(None, args(run, 8)), resume="auto")


def read_marker_step(path) -> int:
    from argonne.checkpoint import read_marker

    return read_marker(path)["step"]


@pytest.mark.slow
def test_a_second_trainer_on_the_same_run_folder_is_refused(tmp_path, tiny_run_args, capsys):
    import subprocess
    import sys
    import time

    from argonne_cli import main

    args = tiny_run_args(tmp_path, "--train.steps=100000", "--train.log_every=1", "--train.tensorboard=false",
                         "--data.val_windows=0")
    first = subprocess.Popen([sys.executable, "-m", "argonne", "train", str(REPO / "configs" / "tiny.toml"),
                              *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists():  # it holds the lock and trains
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.1)
        assert main(["train", str(REPO / "configs" / "tiny.toml"), *args, "--resume", "auto"]) == 2
        assert f"is in use by process {first.pid}" in capsys.readouterr().err
    finally:
        first.kill()  # SIGKILL: its lock goes with it
        first.wait()
    summary = train(load_run_config(None, args + ["--train.steps=1"]), overwrite=True)
    assert summary["step"] == 1


@pytest.mark.slow
def test_mfu_is_reported_only_against_a_sound_peak(tmp_path, tiny_run_args, capsys):
    """On a CPU the matmul rate measured at start is no sound peak (MFU above 1 was printed): MFU is left out,
    saying why, unless train.peak_tflops gives the peak."""
    for name, peak in (("measured", 0), ("given", 1)):
        train(load_run_config(None, tiny_run_args(tmp_path / name, "--train.steps=2", "--train.log_every=1",
                                                  "--train.tensorboard=false", "--data.val_windows=0",
                                                  f"--train.peak_tflops={peak}")))
    out = capsys.readouterr().out
    assert "MFU not reported: no sound peak on a CPU (set train.peak_tflops)" in out
    measured = read_metrics(tmp_path / "measured" / "run" / "metrics.jsonl")[0]
    given = read_metrics(tmp_path / "given" / "run" / "metrics.jsonl")[0]
    assert all("mfu" not in r for r in measured) and all(0 < r["mfu"] < 1 for r in given)


@pytest.mark.slow
def test_a_checkpoint_from_elsewhere_resumes_only_into_an_unused_folder(tmp_path, tiny_run_args):
    from argonne.run_folder import RunFolderError

    def args(name, steps):
        return tiny_run_args(tmp_path / name, f"--train.steps={steps}", "--train.log_every=1",
                             "--checkpoint.every=2", "--train.tensorboard=false", "--data.val_windows=0")

    train(load_run_config(None, args("other", 2)))
    train(load_run_config(None, args("mine", 4)))
    mine = tmp_path / "mine" / "run"
    records = (mine / "metrics.jsonl").read_text()
    foreign = tmp_path / "other" / "run" / "checkpoints" / "step-00000002"
    with pytest.raises(RunFolderError, match="holds an earlier run .* is not one of its checkpoints"):
        train(load_run_config(None, args("mine", 6)), resume=str(foreign))
    assert (mine / "metrics.jsonl").read_text() == records
    train(load_run_config(None, args("fresh", 3)), resume=str(foreign))  # an unused folder: fine
    assert sorted(run_steps(tmp_path / "fresh" / "run")) == [3]


@pytest.mark.slow
def test_resuming_an_older_checkpoint_of_the_run_sets_the_later_one_aside(tmp_path, tiny_run_args, capsys):
    from argonne.checkpoint import read_marker

    def args(steps):
        return tiny_run_args(tmp_path, f"--train.steps={steps}", "--train.log_every=1", "--checkpoint.every=2",
                             "--checkpoint.keep=0", "--train.tensorboard=false", "--data.val_windows=0")

    train(load_run_config(None, args(4)))
    run = tmp_path / "run"
    train(load_run_config(None, args(4)), resume="auto")  # at its last step already
    assert "nothing to train: the checkpoint is at step 4" in capsys.readouterr().out
    original = (run / "metrics.jsonl").read_text()
    first_id = read_marker(run / "checkpoints" / "step-00000004")["run_id"]
    train(load_run_config(None, args(6)), resume=str(run / "checkpoints" / "step-00000002"))
    assert "a branch" in capsys.readouterr().out
    kept = run / "checkpoints" / f"step-00000004.run-{first_id}"
    assert read_marker(kept)["run_id"] == first_id  # set aside, not pruned or replaced
    assert (run / f"metrics.run-{first_id}.jsonl").read_text() == original
    assert (run / f"model.run-{first_id}" / "model.safetensors").is_file()
    assert sorted(run_steps(run)) == [1, 2, 3, 4, 5, 6]
    assert read_marker(run / "checkpoints" / "step-00000006")["run_id"] != first_id

    # Again from step 2 (the first run's): the branch now in the folder steps aside whole — its newer checkpoints,
    # its model and metrics — though none of its checkpoints shares the resumed one's run id.
    second_id = read_marker(run / "checkpoints" / "step-00000006")["run_id"]
    branch_model = (run / "model" / "model.safetensors").read_bytes()
    branch_metrics = (run / "metrics.jsonl").read_text()
    train(load_run_config(None, args(3)), resume=str(run / "checkpoints" / "step-00000002"))
    assert (run / f"model.run-{second_id}" / "model.safetensors").read_bytes() == branch_model
    assert (run / f"metrics.run-{second_id}.jsonl").read_text() == branch_metrics
    assert read_marker(run / "checkpoints" / f"step-00000006.run-{second_id}")["run_id"] == second_id
    # And from a checkpoint set aside earlier (its name no step folder's): one more branch, no traceback.
    train(load_run_config(None, args(5)), resume=str(kept))
    assert sorted(run_steps(run)) == [1, 2, 3, 4, 5] and (run / "checkpoints" / "step-00000005").is_dir()


def test_a_sequence_longer_than_the_model_context_is_refused(tmp_path, tiny_run_args):
    config = load_run_config(None, tiny_run_args(tmp_path, "--data.seq_len=2048"))  # tiny: 1024 positions
    with pytest.raises(ConfigError, match=r"data.seq_len \(2048\) exceeds the model's context"):
        train(config)


@pytest.mark.slow
def test_init_from_brings_its_tokenizer_and_another_one_is_an_error(tmp_path, qwen_tokenizer_dir):
    from argonne.train import build_tokenizer

    base = tmp_path / "base"
    ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", num_hidden_layers=1)).save_pretrained(base)
    load_tokenizer(SAMPLE_TOKENIZER).save_pretrained(base)
    config = load_run_config(None, [f"--model.init_from={str(base)!r}", "--data.inputs=['a.parquet']"])
    assert build_tokenizer(config).name_or_path == str(base)  # the default: init_from's own
    config.data.tokenizer = str(SAMPLE_TOKENIZER)  # the same vocabulary under another name: fine
    assert len(build_tokenizer(config)) == 8192
    config.data.tokenizer = str(qwen_tokenizer_dir)
    with pytest.raises(ConfigError, match=rf"data.tokenizer '{qwen_tokenizer_dir}' \(151,665 tokens\) is not the "
                                          rf"tokenizer of model.init_from '{base}' \(8,192 tokens\)"):
        build_tokenizer(config)


def folder_state(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (but the lock's owner record, rewritten by every trainer that takes
    it): equal before and after means nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "run.lock"}


@pytest.mark.slow
def test_a_refused_resume_or_an_unsaved_branch_leaves_the_run_and_auto_never_starts_over_on_its_traces(
        tmp_path, tiny_run_args, monkeypatch, capsys):
    from argonne.checkpoint import CheckpointError
    from argonne.run_folder import RunFolderError
    from argonne.train import Run

    def args(steps, *extra):
        return tiny_run_args(tmp_path, f"--train.steps={steps}", "--train.log_every=1", "--checkpoint.every=2",
                             "--checkpoint.keep=0", "--train.tensorboard=false", "--data.val_windows=0", *extra)

    train(load_run_config(None, args(4)))
    run, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    finished = folder_state(run)

    # A resume refused for its optimizer writes nothing (config.json was rewritten before).
    with pytest.raises(CheckpointError, match="optimizer state is adamw's"):
        train(load_run_config(None, args(6, "--optim.optimizer=muon")), resume="auto")
    assert folder_state(run) == finished

    # A branch killed before its first save: auto then finds what it found before the branch began.
    def killed(self, step):
        raise KeyboardInterrupt("killed before the branch's first save")

    monkeypatch.setattr(Run, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train(load_run_config(None, args(6)), resume=str(checkpoints / "step-00000002"))
    assert not (checkpoints / "step-00000004").exists()  # set aside by the branch
    monkeypatch.undo()
    capsys.readouterr()
    train(load_run_config(None, args(4)), resume="auto")
    out = capsys.readouterr().out
    assert "stopped before its first checkpoint; restored" in out
    assert "resumed from" in out and "step-00000004 at step 4" in out and "nothing to train" in out
    assert (run / "metrics.jsonl").read_bytes() == finished["metrics.jsonl"]
    assert (run / "model" / "model.safetensors").read_bytes() == finished["model/model.safetensors"]
    assert list(run.glob("metrics.run-*.jsonl"))  # the branch's own records, kept aside

    # No complete checkpoint, but traces of a run: --resume auto is an error naming them, and touches nothing.
    for marker in checkpoints.glob("step-*/COMPLETE"):
        marker.unlink()
    before = folder_state(run)
    with pytest.raises(RunFolderError, match=r"no complete checkpoint.*holds an earlier run \(2 checkpoint folder"
                                             r"\(s\), metrics\.jsonl.*a trained model/, loss\.png\).*--overwrite"):
        train(load_run_config(None, args(4)), resume="auto")
    import shutil

    shutil.rmtree(checkpoints)
    with pytest.raises(RunFolderError, match=r"holds an earlier run \(metrics\.jsonl"):
        train(load_run_config(None, args(4)), resume="auto")
    assert folder_state(run) == {k: v for k, v in before.items() if not k.startswith("checkpoints/")}


def test_a_run_dir_that_is_a_file_or_a_link_is_a_clear_error(tmp_path, tiny_run_args, capsys):
    from argonne_cli import main

    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    for run_dir, expected in (("file", "is a file"), ("file/run", "is a file, not a folder"),
                              ("link", "is a symbolic link")):
        args = tiny_run_args(tmp_path, f"--train.run_dir={str(tmp_path / run_dir)!r}")
        assert main(["train", str(REPO / "configs" / "tiny.toml"), *args]) == 2
        err = capsys.readouterr().err
        assert f"train.run_dir {tmp_path / run_dir}" in err and expected in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "not a folder" and not (tmp_path / "elsewhere").exists()


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


def test_an_evaluation_task_that_fails_stops_the_run_with_one_line_naming_it():
    from types import SimpleNamespace

    from argonne.train import TrainingStopped, evaluate_tasks_or_stop

    class FailingTasks:
        tasks = ["arc_easy", "broken"]

        def __call__(self, model, amp):
            raise RuntimeError("dataset 'broken' not found\nmore lines of lm-eval's")

    run = SimpleNamespace(tasks=FailingTasks(), model=None, amp=None,
                          config=SimpleNamespace(checkpoint=SimpleNamespace(every=5), train=SimpleNamespace(steps=10)))
    with pytest.raises(TrainingStopped, match=r"the evaluation task\(s\) arc_easy, broken failed at step 5 "
                                              r"\(RuntimeError: dataset 'broken' not found\); its checkpoint is saved: "
                                              r".*--resume auto"):
        evaluate_tasks_or_stop(run, 5)


def test_non_finite_final_weights_are_not_exported_and_samples_say_why(tmp_path):
    from contextlib import nullcontext

    from argonne.parallel import Topology
    from argonne.train import TrainingStopped, export_final_model, sample_text

    model, tokenizer = break_weights(small_model()), load_tokenizer(SAMPLE_TOKENIZER)
    sample = sample_text(model, tokenizer, "The", 2, "cpu", nullcontext)
    assert sample.startswith("(no text: the model produced non-finite logits (NaN or Inf)")
    with pytest.raises(TrainingStopped, match="the final weights: non-finite weights") as error:
        export_final_model(model, model.config, tokenizer, tmp_path / "model", Topology())
    assert all(tensor in str(error.value) for tensor in BROKEN_TENSORS) and "was not written" in str(error.value)
    assert not (tmp_path / "model").exists()


def test_a_sample_is_the_prompt_and_the_engines_greedy_continuation_and_leaves_the_model_as_it_was():
    import copy
    from contextlib import nullcontext

    from argonne.inference.engine import Engine
    from argonne.inference.sampling import SamplingParams
    from argonne.train import sample_text

    model, tokenizer = small_model().train(), load_tokenizer(SAMPLE_TOKENIZER)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = tokenizer("The database", add_special_tokens=False).input_ids
    reference = Engine(copy.deepcopy(model), tokenizer)
    expected = reference.complete([ids], SamplingParams(max_new_tokens=6, temperature=0))[0].text
    assert sample_text(model, tokenizer, "The database", 6, "cpu", nullcontext) == "The database" + expected
    assert model.training and model.model.layers[0].self_attn.qkv is None  # borrowed as training has it: not merged
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())
    assert expected  # (some text to compare)
