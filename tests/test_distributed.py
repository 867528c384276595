"""The trainer across layouts and faults, on CPU with gloo: every run is a real `argonne train` process
(under torchrun where it has several), compared step by step through metrics.jsonl."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from argonne import load_tokenizer
from argonne.checkpoint import latest_checkpoint
from argonne.data.prepare import PrepareSettings, prepare_dataset

from .conftest import REPO, SAMPLE_SHARD, SAMPLE_TOKENIZER, env, failure, free_port, torchrun

pytestmark = pytest.mark.slow  # every test here launches processes or runs Triton's interpreter

MODEL = ("{hidden_size = 64, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, "
         "head_dim = 16, intermediate_size = 128}")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare_dataset([SAMPLE_SHARD], load_tokenizer(SAMPLE_TOKENIZER), out,
                    PrepareSettings(seq_len=32, workers=0), progress=False)
    return out


def command(prepared, run_dir, steps=10, nproc=1, micro=8, extra=(), launcher=None):
    args = [
        "train", str(REPO / "configs" / "tiny.toml"),
        f"--data.prepared={str(prepared)!r}", "--data.inputs=[]", f"--data.tokenizer={str(SAMPLE_TOKENIZER)!r}",
        f"--model.overrides={MODEL}", "--data.seq_len=32", f"--train.steps={steps}", "--train.log_every=1",
        "--optim.warmup_steps=2", "--data.val_windows=0", "--data.workers=0", "--train.peak_tflops=1",
        "--train.tensorboard=false", f"--train.micro_batch_size={micro}", f"--train.run_dir={str(run_dir)!r}",
        *extra,
    ]
    if launcher is not None:
        return [sys.executable, "-m", "torch.distributed.run", "--tee", "3", *launcher, "-m", "argonne.cli", *args]
    if nproc == 1:
        return [sys.executable, "-m", "argonne.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--tee", "3", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", "argonne.cli", *args]


def train(prepared, run_dir, **kwargs):
    result = subprocess.run(command(prepared, run_dir, **kwargs), env=env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, failure(result.stdout, result.stderr)
    return losses(run_dir)


def losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def assert_same_losses(a: dict, b: dict, rel=1e-4):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(a[step]), (step, a[step], b[step])


@pytest.fixture(scope="module")
def one_process(prepared, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one")
    return train(prepared, run_dir, steps=10, extra=["--checkpoint.every=5", "--checkpoint.keep=0"]), run_dir


# layout: (processes, micro-batch for the same global batch of 8 sequences, options)
LAYOUTS = {
    "fsdp2": (2, 4, []),
    "tp2": (2, 8, ["--parallel.tensor_parallel=2"]),
    # Selective checkpointing keeps the tensor-parallel all-reduce outputs instead of recomputing them.
    "tp2-selective-checkpointing": (2, 8, ["--parallel.tensor_parallel=2",
                                           "--parallel.activation_checkpointing=selective"]),
    "fsdp2-full-checkpointing": (2, 4, ["--parallel.activation_checkpointing=full"]),
    "fsdp2xtp2": (4, 4, ["--parallel.tensor_parallel=2"]),  # the 2D mesh: FSDP over "dp", tensor parallel in "tp"
}


# How the trained weights are split in the layout's checkpoint: (pieces, dimensions split) for a column-parallel
# matrix (q_proj), a row-parallel one (o_proj) and a norm. Equal losses would also come from a layout that silently
# fell back to replication; the saved shards cannot.
SHARDING = {
    "one process": {"q_proj": (1, set()), "o_proj": (1, set()), "input_layernorm": (1, set())},
    "fsdp2": {"q_proj": (2, {0}), "o_proj": (2, {0}), "input_layernorm": (2, {0})},
    "tp2": {"q_proj": (2, {0}), "o_proj": (2, {1}), "input_layernorm": (1, set())},
    "fsdp2xtp2": {"q_proj": (4, {0}), "o_proj": (4, {0, 1}), "input_layernorm": (2, {0})},
}
SHARDING["tp2-selective-checkpointing"] = SHARDING["tp2"]
SHARDING["fsdp2-full-checkpointing"] = SHARDING["fsdp2"]


def saved_sharding(run_dir) -> dict[str, tuple[int, set[int]]]:
    """(number of pieces, dimensions along which they differ) of layer 0's weights in the run's last checkpoint."""
    from argonne.checkpoint import read_checkpoint_metadata

    metadata = read_checkpoint_metadata(latest_checkpoint(Path(run_dir) / "checkpoints"))
    found = {}
    for key, entry in metadata.state_dict_metadata.items():
        for name in ("q_proj", "o_proj", "input_layernorm"):
            if key.endswith(f"layers.0.self_attn.{name}.weight") or key.endswith(f"layers.0.{name}.weight"):
                if "optim" not in key:
                    offsets = [chunk.offsets for chunk in entry.chunks]
                    split = {d for d in range(len(offsets[0])) if len({o[d] for o in offsets}) > 1}
                    found[name] = (len(offsets), split)
    return found


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parallel_layouts_match_one_process(prepared, one_process, tmp_path, layout):
    nproc, micro, extra = LAYOUTS[layout]
    parallel = train(prepared, tmp_path, steps=10, nproc=nproc, micro=micro, extra=extra)
    assert_same_losses(one_process[0], parallel)
    assert len(parallel) == 10 and parallel[10] < parallel[1]
    assert saved_sharding(tmp_path) == SHARDING[layout]  # the layout really sharded the weights as its plan says
    assert saved_sharding(one_process[1]) == SHARDING["one process"]
    assert (tmp_path / "model" / "model.safetensors").is_file()  # gathered from the shards


def test_tensor_parallel_gradients_loss_and_logits_equal_one_process():
    """A tied and an untied head, in one launch."""
    result = subprocess.run(torchrun(2, str(REPO / "tests" / "distributed_grads.py"), "tied", "untied"),
                            env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, failure(result.stdout, result.stderr)
    for head in ("tied", "untied"):
        assert f"ok ({head})" in result.stdout, failure(result.stdout, result.stderr)


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


def test_a_launch_into_a_run_folder_in_use_is_refused_by_every_rank(prepared, tmp_path):
    from .test_run_folder import hold_lock_in_another_process

    holder = hold_lock_in_another_process(tmp_path)  # e.g. a worker left running by a killed launcher
    try:
        result = subprocess.run(command(prepared, tmp_path, steps=2, nproc=2, micro=4), env=env(),
                                capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    for rank in (0, 1):
        assert re.search(rf"\[default{rank}\]:argonne train: error: run folder .* is in use by process {holder.pid}",
                         result.stderr), failure(result.stdout, result.stderr)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_two_node_launch_matches_one_node(prepared, one_process, tmp_path):
    port = free_port()
    nodes = [
        subprocess.Popen(
            command(prepared, tmp_path, steps=10, micro=4, launcher=[
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


def test_kill_9_then_resume_auto_equals_the_uninterrupted_run(prepared, tmp_path):
    straight = train(prepared, tmp_path / "straight", steps=16)
    run_dir = tmp_path / "killed"
    extra = ["--checkpoint.every=4"]
    process = subprocess.Popen(command(prepared, run_dir, steps=16, extra=extra + ["--train.sample_every=0"]),
                               env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, 10, process)
    process.kill()  # SIGKILL: no handler runs
    process.wait()
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None and checkpoint.name in ("step-00000008", "step-00000012")
    resumed = train(prepared, run_dir, steps=16, extra=extra + ["--resume", "auto"])
    assert resumed == straight  # exactly: same process count, same arithmetic


@pytest.mark.parametrize("before,after", [("fsdp2", 1), ("tp2", 1), (1, 2)], ids=["fsdp2-to-1", "tp2-to-1", "1-to-2"])
def test_resume_with_another_process_count(prepared, one_process, tmp_path, before, after):
    straight, straight_dir = one_process
    if before == 1:
        first_dir = straight_dir
    else:
        first_dir = tmp_path / "first"
        tp = ["--parallel.tensor_parallel=2"] if before == "tp2" else []
        train(prepared, first_dir, steps=10, nproc=2, micro=8 if tp else 4,
              extra=["--checkpoint.every=5", "--checkpoint.keep=0", *tp])
    run_dir = tmp_path / "resumed"
    checkpoint = first_dir / "checkpoints" / "step-00000005"
    resumed = train(prepared, run_dir, steps=10, nproc=after, micro=8 // after,
                    extra=["--resume", str(checkpoint)])
    assert sorted(resumed) == list(range(6, 11))
    assert_same_losses({s: straight[s] for s in resumed}, resumed)


def test_sigterm_saves_a_checkpoint_and_exits_zero(prepared, tmp_path):
    process = subprocess.Popen(command(prepared, tmp_path, steps=100000), env=env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path, 3, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, failure(out, err)
    last_step = max(losses(tmp_path))
    assert latest_checkpoint(tmp_path / "checkpoints").name == f"step-{last_step:08d}"
    assert "resume with --resume auto" in out + err


def test_models_built_on_meta_are_initialised_after_sharding(prepared, tmp_path):
    """On the 2-D mesh (FSDP 2 x TP 2), so one launch covers both kinds of sharding."""
    import math

    args = command(prepared, tmp_path, steps=10, nproc=4, micro=4, extra=["--parallel.tensor_parallel=2"])
    script = args.index("-m", args.index("torch.distributed.run") + 1)  # the second -m runs argonne.cli
    args[script:script + 2] = [str(REPO / "tests" / "train_with_meta_init.py")]
    result = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, failure(result.stdout, result.stderr)
    steps = losses(tmp_path)
    assert abs(steps[1] - math.log(8192)) < 0.2  # a fresh initialisation predicts near-uniformly
    assert all(math.isfinite(v) for v in steps.values())
    assert sum(steps[s] for s in (8, 9, 10)) / 3 < steps[1] - 0.1  # and it trains
