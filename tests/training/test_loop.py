"""The training loop (training/loop.py) on tiny data: the loss falls, the run writes its outputs, the step never
reads the device back, a non-finite step changes nothing, the final export."""

import json
import math

import pytest
import torch

from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
from argonne.run_config import load_run_config
from argonne.optim import build_optimizer
from argonne.training.loop import train

from .conftest import streaming_run_args
from ..conftest import BROKEN_TENSORS, SAMPLE_TOKENIZER, break_weights, small_model


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


def three_steps(tmp_path, tiny_run_args, *options) -> dict[int, float]:
    """The losses of a three-step tiny run with `options`, by step."""
    from ..launches import losses

    args = tiny_run_args(tmp_path, "--train.steps=3", "--train.log_every=1", "--train.tensorboard=false",
                         "--data.val_windows=0", *options)
    train(load_run_config(None, args))
    return losses(tmp_path / "run")


@pytest.fixture(scope="module")
def eager_losses(tmp_path_factory, tiny_run_args) -> dict[int, float]:
    return three_steps(tmp_path_factory.mktemp("eager"), tiny_run_args)


@pytest.mark.parametrize("options", [
    ["--parallel.activation_checkpointing=true"],  # the boolean spelling means "full"
    ["--parallel.activation_checkpointing=selective"],
    ["--parallel.compile=true"],
    ["--parallel.compile=true", "--parallel.activation_checkpointing=selective"],
])
@pytest.mark.slow
def test_checkpointing_and_compile_keep_the_losses(tmp_path, tiny_run_args, eager_losses, options):
    from torch._dynamo.utils import counters

    counters.clear()
    changed = three_steps(tmp_path, tiny_run_args, *options)
    assert changed == pytest.approx(eager_losses, rel=1e-4)
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


# Emulated FP8 against the same run without it, over 10 steps of the test model in bf16 (CPU autocast): measured
# 0.09% (tensorwise) and 0.10% (rowwise) at most; docs/training.md quotes this bound.
FLOAT8_LOSS_TOLERANCE = 0.01


def test_float8_trains_within_tolerance_of_bf16_and_its_checkpoints_resume_and_export_without_it(prepared_sample,
                                                                                                tmp_path, capsys):
    """10 steps in bf16 with each FP8 recipe (emulated) stay within FLOAT8_LOSS_TOLERANCE of bf16 at every step
    and are not bf16 (FP8 really rounds); the FP8 run's checkpoint holds the same tensors as bf16's, resumes with
    FP8 off (and bf16's with FP8 on) and exports to a Hugging Face folder equal to the trained weights."""
    from argonne.checkpoint import read_checkpoint_metadata
    from argonne.export import export_model
    from argonne.loading import open_model

    from ..launches import train_here

    def run(name, *extra, steps=10):
        options = ["--train.dtype=bfloat16", "--checkpoint.every=5", "--checkpoint.keep=0", *extra]
        return train_here(prepared_sample, tmp_path / name, steps=steps, micro=4, extra=options)

    bf16, float8 = run("bf16"), {}
    for recipe in ("tensorwise", "rowwise"):
        float8[recipe] = run(recipe, f"--parallel.float8={recipe}")
        distance = [abs(float8[recipe][s] - bf16[s]) / bf16[s] for s in bf16]
        assert len(distance) == 10 and max(distance) < FLOAT8_LOSS_TOLERANCE and max(distance) > 0, distance
        assert (f"float8 {recipe} (emulated: no FP8 matmuls on this device): 14 of 14 block linears in FP8; the "
                "output head in high precision") in capsys.readouterr().out
    run("skip", "--parallel.float8=rowwise", "--parallel.float8_skip=['last']", steps=1)
    assert ("float8 rowwise (emulated: no FP8 matmuls on this device): 7 of 14 block linears in FP8; high precision: "
            "model.layers.1.self_attn.q_proj,") in capsys.readouterr().out
    step_5 = {name: tmp_path / name / "checkpoints" / "step-00000005" for name in ("bf16", "tensorwise")}
    saved = {name: {key: (entry.size, entry.properties.dtype) for key, entry in
                    read_checkpoint_metadata(path).state_dict_metadata.items() if key.startswith("model.")}
             for name, path in step_5.items()}
    assert saved["tensorwise"] == saved["bf16"]
    for name, resume_from, extra, straight in (("fp8 to bf16", "tensorwise", [], float8["tensorwise"]),
                                                ("bf16 to fp8", "bf16", ["--parallel.float8=rowwise"], bf16)):
        resumed = run(name, *extra, "--resume", str(step_5[resume_from]))
        assert sorted(resumed) == list(range(6, 11))
        assert all(abs(resumed[s] - straight[s]) < FLOAT8_LOSS_TOLERANCE * straight[s] for s in resumed)
    export_model(step_5["tensorwise"], "hf", tmp_path / "hf", "fp32")
    exported, _ = open_model(tmp_path / "hf", "cpu", "float32")
    trained, _ = open_model(step_5["tensorwise"], "cpu", "float32")
    assert all(torch.equal(tensor, trained.state_dict()[name]) for name, tensor in exported.state_dict().items())


def test_a_non_finite_step_leaves_every_weight_and_optimizer_state_unchanged():
    """For both optimizers of a Muon run (AdamW's moments and step count, Muon's momentum), on the device."""
    from contextlib import nullcontext

    from argonne.run_config import RunConfig
    from argonne.parallel import Topology
    from argonne.training.build import cross_entropy_objective
    from argonne.training.loop import training_step

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


def test_out_of_memory_is_explained(tmp_path, tiny_run_args, monkeypatch):
    from argonne.modeling_argonne import ArgonneForCausalLM
    from argonne.training.recovery import TrainingStopped

    def exhausted(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ArgonneForCausalLM, "forward", exhausted)
    with pytest.raises(TrainingStopped, match=r"out of memory at micro_batch_size 8 x seq_len 64.*train.grad_accum"):
        train(load_run_config(None, tiny_run_args(tmp_path, "--train.steps=2")))


def test_non_finite_final_weights_are_not_exported_and_samples_say_why(tmp_path):
    from contextlib import nullcontext

    from argonne.parallel import Topology
    from argonne.training.hooks import sample_text
    from argonne.training.loop import export_final_model
    from argonne.training.recovery import TrainingStopped

    model, tokenizer = break_weights(small_model()), load_tokenizer(SAMPLE_TOKENIZER)
    sample = sample_text(model, tokenizer, "The", 2, "cpu", nullcontext)
    assert sample.startswith("(no text: the model produced non-finite logits (NaN or Inf)")
    with pytest.raises(TrainingStopped, match="the final weights: non-finite weights") as error:
        export_final_model(model, model.config, tokenizer, tmp_path / "model", Topology())
    assert all(tensor in str(error.value) for tensor in BROKEN_TENSORS) and "was not written" in str(error.value)
    assert not (tmp_path / "model").exists()
