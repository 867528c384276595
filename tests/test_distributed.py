"""The trainer across layouts and faults, on CPU with gloo: every run is a real `argonne train` (under torchrun
where it has several; the launches its tests share are in launches.py), compared step by step through
metrics.jsonl."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from argonne.checkpoint import latest_checkpoint

from .conftest import env, failure, free_port
from .launches import (
    FLOAT8_LAYOUTS, GRADS, LAYOUTS, MUON, MUON_LAYOUTS, assert_same_losses, by_step, command, launched_run, losses,
    records, train_here,
)

pytestmark = pytest.mark.slow  # every test here launches processes or runs Triton's interpreter

# How the trained weights are split in the layout's checkpoint: (pieces, dimensions split) for a column-parallel
# matrix (q_proj), a row-parallel one (o_proj) and a norm. Equal losses would also come from a layout that silently
# fell back to replication; the saved shards cannot.
SHARDING = {
    "one process": {"q_proj": (1, set()), "o_proj": (1, set()), "input_layernorm": (1, set())},
    "fsdp2": {"q_proj": (2, {0}), "o_proj": (2, {0}), "input_layernorm": (2, {0})},
    "tp2": {"q_proj": (2, {0}), "o_proj": (2, {1}), "input_layernorm": (1, set())},
    "fsdp2xtp2": {"q_proj": (4, {0}), "o_proj": (4, {0, 1}), "input_layernorm": (2, {0})},
}
SHARDING["tp2-selective-checkpointing"] = SHARDING["tp2-sequence-parallel-off"] = SHARDING["tp2"]
SHARDING["fsdp2-full-checkpointing"] = SHARDING["fsdp2"]


def saved_sharding(run_dir, state: str = "") -> dict[str, tuple[int, set[int]]]:
    """(number of pieces, dimensions along which they differ) of layer 0's weights in the run's last checkpoint, or
    of the optimizer's `state` of them (e.g. "momentum_buffer")."""
    from argonne.checkpoint import read_checkpoint_metadata

    metadata = read_checkpoint_metadata(latest_checkpoint(Path(run_dir) / "checkpoints"))
    found = {}
    for key, entry in metadata.state_dict_metadata.items():
        for name in ("q_proj", "o_proj", "input_layernorm"):
            weight = (f"layers.0.self_attn.{name}.weight", f"layers.0.{name}.weight")
            if key.endswith(tuple(w + (f".{state}" if state else "") for w in weight)) and \
                    ("optim" in key) == bool(state):
                offsets = [chunk.offsets for chunk in entry.chunks]
                split = {d for d in range(len(offsets[0])) if len({o[d] for o in offsets}) > 1}
                found[name] = (len(offsets), split)
    return found


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parallel_layouts_match_one_process(one_process, request, layout):
    launch = request.getfixturevalue("four_processes" if LAYOUTS[layout][0] == 4 else "two_processes")
    run_dir = launched_run(launch, layout)
    parallel = losses(run_dir)
    assert_same_losses(one_process[0], parallel)
    assert len(parallel) == 10 and parallel[10] < parallel[1]
    assert saved_sharding(run_dir) == SHARDING[layout]  # the layout really sharded the weights as its plan says
    assert saved_sharding(one_process[1]) == SHARDING["one process"]
    assert (run_dir / "model" / "model.safetensors").is_file()  # gathered from the shards


@pytest.mark.parametrize("layout", MUON_LAYOUTS)
def test_muon_in_parallel_layouts_matches_one_process(muon_one_process, request, layout):
    """Newton-Schulz runs on each whole matrix whatever its sharding: the losses and the block matrices equal one
    process's. (Orthogonalising each shard alone moved the losses by 1e-3 relative at step 10.) Its momentum stays
    sharded as the weights are."""
    from safetensors.torch import load_file

    launch = request.getfixturevalue("four_processes" if LAYOUTS[layout][0] == 4 else "two_processes")
    run_dir = launched_run(launch, f"muon {layout}")
    assert_same_losses(muon_one_process[0], losses(run_dir))
    one, parallel = (load_file(Path(d) / "model" / "model.safetensors") for d in (muon_one_process[1], run_dir))
    matrices = [name for name in one if name.endswith("_proj.weight")]
    assert len(matrices) == 2 * 7
    for name in matrices:
        torch.testing.assert_close(parallel[name], one[name], rtol=0, atol=1e-5, msg=name)
    assert saved_sharding(run_dir, "momentum_buffer") == {k: SHARDING[layout][k] for k in ("q_proj", "o_proj")}


@pytest.mark.parametrize("layout", ["fsdp2xtp2-to-1", "1-to-fsdp2"])
def test_a_muon_checkpoint_resumes_in_another_layout(prepared_sample, muon_one_process, request, tmp_path, layout):
    """Muon's momentum buffers are resharded on resume like AdamW's moments: the 2-D mesh's checkpoint at step 5
    continues in one process, and one process's on FSDP 2, with the uninterrupted run's losses."""
    straight, _ = muon_one_process
    if layout == "1-to-fsdp2":
        resumed = losses(launched_run(request.getfixturevalue("two_processes"), "muon 1-to-fsdp2"))
    else:
        checkpoint = launched_run(request.getfixturevalue("four_processes"), "muon fsdp2xtp2") / "checkpoints"
        resumed = train_here(prepared_sample, tmp_path, extra=[*MUON, "--resume", str(checkpoint / "step-00000005")],
                             plot=False)
    assert sorted(resumed) == list(range(6, 11))
    assert_same_losses({s: straight[s] for s in resumed}, resumed)


# FP8 scales are maxima over what each process quantises: the same over tensor-parallel ranks (torchao takes them
# over the whole DTensor), so tensor parallel differs by float32 summation order only (which can still flip a value
# across an FP8 rounding boundary); each data-parallel rank scales its own batch's activations.
# Measured: 4.7e-5 (tp2), 2.3e-4 (fsdp2), 3.3e-4 (fsdp2xtp2); FP8 against float32 in one process: 4.9e-4.
FLOAT8_TOLERANCE = {"tp2": 1e-4, "fsdp2": 1e-3, "fsdp2xtp2": 1e-3}


@pytest.mark.parametrize("layout", FLOAT8_LAYOUTS)
def test_float8_in_parallel_layouts_matches_one_process(float8_one_process, request, layout):
    """Emulated FP8 composes with tensor parallel and FSDP2 (FP8 weight all-gather): the losses equal one FP8
    process's (tensor parallel) or differ by the data-parallel scaling only; the weights are sharded as without
    FP8; the runs really quantise (their losses differ from the full-precision run's)."""
    launch = request.getfixturevalue("four_processes" if LAYOUTS[layout][0] == 4 else "two_processes")
    run_dir = launched_run(launch, f"float8 {layout}")
    parallel, float8 = losses(run_dir), float8_one_process[0]
    assert_same_losses(float8, parallel, rel=FLOAT8_TOLERANCE[layout])
    without = losses(launched_run(launch, layout))  # the same layout in full precision (equal to one process)
    assert max(abs(parallel[s] - without[s]) / without[s] for s in parallel) > 1e-5  # FP8 really applied
    assert saved_sharding(run_dir) == SHARDING[layout]


def test_a_float8_checkpoint_resumes_in_one_process_without_float8(prepared_sample, float8_one_process,
                                                                   four_processes, tmp_path):
    """The checkpoint of FP8 training on the 2-D mesh holds plain full-precision weights: one process resumes it
    with FP8 off, and its losses stay within FP8's distance of the FP8 run's."""
    checkpoint = launched_run(four_processes, "float8 fsdp2xtp2") / "checkpoints" / "step-00000005"
    resumed = train_here(prepared_sample, tmp_path, extra=["--resume", str(checkpoint)], plot=False)
    assert sorted(resumed) == list(range(6, 11))
    assert_same_losses({s: float8_one_process[0][s] for s in resumed}, resumed, rel=5e-3)


def test_streaming_on_two_processes_matches_one_process(streamed_one_process, two_processes):
    """Each process tokenizes half the stream and both train on the global order: the same losses, validation
    losses (held-out windows, also tokenized in halves) and skip counts as one process reading it all."""
    parallel = records(launched_run(two_processes, "streaming"))
    assert [r["step"] for r in parallel] == [r["step"] for r in streamed_one_process] == list(range(1, 11))
    for one, two in zip(streamed_one_process, parallel):
        for key in ("loss", "val_loss"):
            if key in one or key in two:
                assert abs(one[key] - two[key]) <= 1e-4 * abs(one[key]), (one, two)
    assert parallel[-1]["loss"] < parallel[0]["loss"]


def test_tensor_parallel_gradients_loss_and_logits_equal_one_process(two_processes):
    """A tied and an untied head, QK-norm, the z-loss on the vocabulary-parallel head, document attention and
    GPT-2's layout (learned positions, LayerNorm, biases), with sequence parallel (and once without): each rank's
    norms see half the tokens, evaluation and KV-cache forwards equal one process's, and selective checkpointing's
    recompute adds no collective to the backward (tests/distributed_grads.py)."""
    launched_run(two_processes, "grads")
    for head in GRADS:
        assert f"ok ({head})" in two_processes["stdout"], failure(two_processes["stdout"], two_processes["stderr"])


def test_sequence_parallel_saves_activation_memory_per_rank(two_processes):
    """The bytes one forward saves for the backward on each rank, sequence parallel on against off (both printed;
    benchmarks/sp_memory.py measures it at a larger shape)."""
    launched_run(two_processes, "grads")
    found = re.search(r"ok \(saved-activations\): .* off (\d+), on (\d+)", two_processes["stdout"])
    assert found, failure(two_processes["stdout"], two_processes["stderr"])
    off, on = map(int, found.groups())
    assert on < 0.9 * off, (on, off)


def test_a_tensor_parallel_checkpoint_resumes_with_sequence_parallel_off(one_process, two_processes):
    """Sequence parallel changes no weight: tp2's checkpoint (sequence parallel on) at step 5 continues with it off
    with the uninterrupted run's losses."""
    resumed = losses(launched_run(two_processes, "tp2-to-tp2-sequence-parallel-off"))
    assert sorted(resumed) == list(range(6, 11))
    assert_same_losses({s: one_process[0][s] for s in resumed}, resumed)


def test_a_launch_into_a_run_folder_in_use_is_refused_by_every_rank(two_processes):
    assert two_processes["status"]["in use"] == 2  # the CLI's status for a user's mistake
    for rank in (0, 1):
        assert re.search(rf"\[default{rank}\]:argonne train: error: run folder .* is in use by process "
                         rf"{two_processes['holder']}", two_processes["stderr"]), \
            failure(two_processes["stdout"], two_processes["stderr"])
    assert not (two_processes["root"] / "in use" / "metrics.jsonl").exists()


def test_a_failed_launch_reports_every_rank(tmp_path):
    """A rank other than 0 that fails must be visible in the report (it once showed rank 0's lines only)."""
    script = tmp_path / "second_rank_fails.py"
    script.write_text("import os, sys\n"
                      "print(f'rank {os.environ[\"RANK\"]} started', flush=True)\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    raise SystemExit('rank 1 gives up here')\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--tee", "3", "--nproc-per-node", "2",
                             "--master-port", str(free_port()), str(script)],
                            env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    report = failure(result.stdout, result.stderr)
    assert "--- rank 0 ---" in report and "rank 0 started" in report
    assert "--- rank 1 ---" in report and "rank 1 gives up here" in report


def test_two_node_launch_matches_one_node(prepared_sample, one_process, tmp_path):
    port = free_port()
    nodes = [
        subprocess.Popen(
            command(prepared_sample, tmp_path, steps=10, micro=4, launcher=[
                "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                "--master-addr", "127.0.0.1", "--master-port", str(port)]),
            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, failure(_, err)
    assert_same_losses(one_process[0], losses(tmp_path))


def wait_for_step(run_dir: Path, step: int, process, timeout=120):
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= step:
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def test_kill_9_then_resume_auto_equals_the_uninterrupted_run(prepared_sample, tmp_path):
    straight = train_here(prepared_sample, tmp_path / "straight", steps=16, plot=False)
    run_dir = tmp_path / "killed"
    extra = ["--checkpoint.every=4"]
    process = subprocess.Popen(command(prepared_sample, run_dir, steps=16, extra=extra + ["--train.sample_every=0"]),
                               env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, 10, process)
    process.kill()  # SIGKILL: no handler runs
    process.wait()
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None and checkpoint.name in ("step-00000008", "step-00000012")
    # Resumed in this process (one thread, as the killed process ran): a second process start costs more than the
    # resumed steps, and the killed process is what must be a process of its own.
    resumed = train_here(prepared_sample, run_dir, steps=16, extra=extra + ["--resume", "auto"], plot=False)
    assert resumed == straight  # exactly: same process count, same arithmetic


@pytest.mark.parametrize("before,after", [("fsdp2", 1), ("tp2", 1), (1, 2)], ids=["fsdp2-to-1", "tp2-to-1", "1-to-2"])
def test_resume_with_another_process_count(prepared_sample, one_process, two_processes, tmp_path, before, after):
    """A checkpoint at step 5 of one layout, resumed in another, continues with the uninterrupted run's losses."""
    straight, _ = one_process
    if after == 2:  # resumed in the two-process launch, from one_process's checkpoint
        resumed = losses(launched_run(two_processes, "1-to-2"))
    else:
        checkpoint = launched_run(two_processes, before) / "checkpoints" / "step-00000005"
        resumed = train_here(prepared_sample, tmp_path, extra=["--resume", str(checkpoint)], plot=False)
    assert sorted(resumed) == list(range(6, 11))
    assert_same_losses({s: straight[s] for s in resumed}, resumed)


def test_sigterm_saves_a_checkpoint_and_exits_zero(prepared_sample, tmp_path):
    process = subprocess.Popen(command(prepared_sample, tmp_path, steps=100000), env=env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path, 3, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, failure(out, err)
    last_step = max(losses(tmp_path))
    assert latest_checkpoint(tmp_path / "checkpoints").name == f"step-{last_step:08d}"
    assert "resume with --resume auto" in out + err


def test_a_tensor_parallel_checkpoint_exports_to_every_format(tmp_path, two_processes):
    import gguf
    import numpy as np
    from transformers import LlamaForCausalLM

    from argonne import ArgonneForCausalLM
    from argonne.export import export_model, gguf_tensors

    def logits(model, tokens):
        with torch.no_grad():
            return model(tokens).logits

    run_dir = launched_run(two_processes, "tp2")  # trained with tensor parallel 2 (a launch other tests share)
    checkpoint = run_dir / "checkpoints" / "step-00000010"
    trained = ArgonneForCausalLM.from_pretrained(run_dir / "model")  # gathered by the trainer from the shards
    tokens = torch.randint(3, 8192, (2, 16))
    expected = logits(trained, tokens)
    export_model(checkpoint, "hf", tmp_path / "hf", "fp32")
    assert (logits(ArgonneForCausalLM.from_pretrained(tmp_path / "hf"), tokens) - expected).abs().max() <= 1e-5
    export_model(checkpoint, "llama", tmp_path / "llama", "fp32")
    assert (logits(LlamaForCausalLM.from_pretrained(tmp_path / "llama"), tokens) - expected).abs().max() <= 1e-5
    export_model(checkpoint, "gguf", tmp_path / "gguf", "fp32")
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / "model.gguf"))
    read = {t.name: np.asarray(t.data).reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors}
    assert all(np.array_equal(read[n], t.numpy()) for n, t in gguf_tensors(trained).items())


def test_models_built_on_meta_are_initialised_after_sharding(four_processes):
    """On the 2-D mesh (FSDP 2 x TP 2), so one run covers both kinds of sharding; with QK-norm, whose weights are
    sharded by FSDP and see each tensor-parallel rank's own heads."""
    import json
    import math

    import torch

    from argonne.loading import read_weights

    run_dir = launched_run(four_processes, "meta init")
    steps = losses(run_dir)
    assert abs(steps[1] - math.log(8192)) < 0.2  # a fresh initialisation predicts near-uniformly
    assert all(math.isfinite(v) for v in steps.values())
    assert sum(steps[s] for s in (8, 9, 10)) / 3 < steps[1] - 0.1  # and it trains
    assert json.loads((run_dir / "model" / "config.json").read_text())["qk_norm"] is True
    q_norm = read_weights(run_dir / "model")["model.layers.0.self_attn.q_norm.weight"]
    assert q_norm.shape == (16,) and not torch.equal(q_norm, torch.ones(16))  # initialised to ones, then trained


@pytest.mark.parametrize("layout", ["fsdp2", "tp2", "fsdp2xtp2", "fsdp2 limit 1"])
def test_in_loop_task_metrics_on_the_sharded_model_equal_one_process(eval_one_process, request, layout):
    """lm-eval tasks at steps 5 and 10 on the model as it trains, every process taking part with its shard:
    the metrics of one process (accuracies exactly, perplexities to 1e-4), and the same losses. With one document
    per task ("limit 1") one of the two processes has no request of its own and still takes part."""
    launch = request.getfixturevalue("four_processes" if layout == "fsdp2xtp2" else "two_processes")
    parallel = records(launched_run(launch, f"eval {layout}" if layout.endswith("limit 1") else layout))
    reference = eval_one_process["limit 1" if layout.endswith("limit 1") else "all"]
    assert_same_losses({r["step"]: r["loss"] for r in reference if "loss" in r},
                       {r["step"]: r["loss"] for r in parallel if "loss" in r})
    one = {step: {k: v for k, v in r.items() if k.startswith("eval/")} for step, r in by_step(reference).items()}
    many = {step: {k: v for k, v in r.items() if k.startswith("eval/")} for step, r in by_step(parallel).items()}
    assert [step for step in one if one[step]] == [step for step in many if many[step]] == [5, 10]
    for step in (5, 10):
        assert one[step].keys() == many[step].keys() and "eval/argonne_choice/acc" in one[step]
        for key, value in one[step].items():
            assert abs(many[step][key] - value) <= 1e-4 * max(1.0, abs(value)), (step, key, value, many[step][key])


def test_a_launch_that_times_out_leaves_no_worker_behind(tmp_path):
    """torchrun starts each worker in a session of its own; a hung launch must not leave them running."""
    from .conftest import run_process, torchrun

    script = tmp_path / "hangs.py"
    script.write_text("import time\ntime.sleep(600)\n")
    with pytest.raises(AssertionError, match="timed out after 8 s"):
        run_process(torchrun(2, str(script)), timeout=8)
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True).stdout.split()
    assert left == [], f"workers still running: {left}"
