"""Training runs the distributed tests share: each process count is launched once per test process (tests/launch_runs.py
runs every run of that count in one process group), and one-process references run in the test process itself.
Only tests/test_distributed.py reads the launches: under pytest-xdist each module runs on one worker, and a second
module reading them would launch them again on the other. The fixtures are registered in conftest.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, SAMPLE_TOKENIZER, env, failure, free_port, run_process, torchrun, write_sample_head

MODEL = ("{hidden_size = 64, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, "
         "head_dim = 16, intermediate_size = 128}")


@pytest.fixture(scope="session")
def prepared_sample(tmp_path_factory):
    from argonne import load_tokenizer
    from argonne.data.prepare import PrepareSettings, prepare_dataset

    out = tmp_path_factory.mktemp("prepared")
    prepare_dataset([write_sample_head(tmp_path_factory.mktemp("sample") / "head.parquet")], load_tokenizer(SAMPLE_TOKENIZER), out,
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
        return [sys.executable, "-m", "torch.distributed.run", "--tee", "3", *launcher, "-m", "argonne", *args]
    if nproc == 1:
        return [sys.executable, "-m", "argonne", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--tee", "3", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", "argonne", *args]


def train(prepared, run_dir, **kwargs):
    result = subprocess.run(command(prepared, run_dir, **kwargs), env=env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, failure(result.stdout, result.stderr)
    return losses(run_dir)


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}  # not the [eval] tasks' records


def by_step(records_: list[dict]) -> dict[int, dict]:
    """A step's records merged (training figures, then the [eval] tasks' metrics logged after the checkpoint)."""
    merged: dict[int, dict] = {}
    for record in records_:
        merged.setdefault(record["step"], {}).update(record)
    return merged


def assert_same_losses(a: dict, b: dict, rel=1e-4):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(a[step]), (step, a[step], b[step])


def cli_args(prepared, run_dir, steps=10, micro=8, extra=()) -> list[str]:
    return command(prepared, run_dir, steps=steps, micro=micro, extra=extra)[3:]  # after `python -m argonne`


def train_here(prepared, run_dir, plot=True, **kwargs) -> dict[int, float]:
    """`argonne train` in this process (one process: no launch to pay for), on one thread as a launched process
    runs (env() sets OMP_NUM_THREADS=1), so that its arithmetic is the same to the bit. With plot=False the run
    draws no loss.png (half a second a run; for runs whose plot no test reads)."""
    import torch

    import argonne.plot
    from argonne_cli import main

    threads, drawn = torch.get_num_threads(), argonne.plot.plot_run
    torch.set_num_threads(1)
    if not plot:
        argonne.plot.plot_run = lambda run_dir, output=None, overwrite=False: Path(run_dir) / "loss.png"
    try:
        assert main(cli_args(prepared, run_dir, **kwargs)) == 0
    finally:
        torch.set_num_threads(threads)
        argonne.plot.plot_run = drawn
    return losses(run_dir)


@pytest.fixture(scope="session")
def one_process(prepared_sample, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one")
    return train_here(prepared_sample, run_dir, plot=False, extra=["--checkpoint.every=5", "--checkpoint.keep=0"]), \
        run_dir


@pytest.fixture(scope="session")
def streaming(tmp_path_factory) -> list[str]:
    """Options to stream 120 of the sample's documents, in row groups of 10 so that two processes share them."""
    shard = write_sample_head(tmp_path_factory.mktemp("stream") / "small.parquet", documents=120, row_group_size=10)
    return ["--data.prepared=''", f"--data.inputs=[{str(shard)!r}]", "--data.val_fraction=0.05",
            "--data.val_windows=4", "--train.eval_every=5"]


@pytest.fixture(scope="session")
def streamed_one_process(streaming, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("streamed-one")
    train_here(None, run_dir, plot=False, extra=streaming)
    return records(run_dir)


# layout: (processes, micro-batch for the same global batch of 8 sequences, options)
LAYOUTS = {
    "fsdp2": (2, 4, []),
    "tp2": (2, 8, ["--parallel.tensor_parallel=2"]),  # sequence parallel on (the default)
    "tp2-sequence-parallel-off": (2, 8, ["--parallel.tensor_parallel=2", "--parallel.sequence_parallel=false"]),
    # Selective checkpointing keeps the tensor-parallel collectives' outputs instead of recomputing them.
    "tp2-selective-checkpointing": (2, 8, ["--parallel.tensor_parallel=2",
                                           "--parallel.activation_checkpointing=selective"]),
    "fsdp2-full-checkpointing": (2, 4, ["--parallel.activation_checkpointing=full"]),
    "fsdp2xtp2": (4, 4, ["--parallel.tensor_parallel=2"]),  # the 2D mesh: FSDP over "dp", tensor parallel in "tp"
}


# Layouts whose runs also evaluate tests/harness_tasks.py's tasks in the loop (eval_tasks), which leave training
# untouched: one run proves both the layout's losses and its task metrics.
EVAL_LAYOUTS = ("fsdp2", "tp2", "fsdp2xtp2")


# tests/distributed_grads.py's checks in the two-process launch: sequence parallel is on unless "sp_off".
GRADS = ("tied", "tied+sp_off", "untied", "qk-norm", "tied+z_loss", "untied+document", "learned",
         "qk-norm+selective", "tied+full", "untied+logits", "tied+logits+sp_off", "saved-activations",
         "gathered-dtype")


# Options trained in the layouts that shard them differently, each named "LABEL LAYOUT" in its launch, beside one
# process's run of the same options; checkpoints every 5 steps, for the resume tests.
# Muon (optim.py): its matrices are orthogonalised whole whatever their sharding.
MUON = ["--optim.optimizer=muon"]
MUON_LAYOUTS = ("fsdp2", "tp2", "fsdp2xtp2")
# FP8 (emulated on CPU); tensorwise is the recipe whose scales span processes (tensor-parallel inputs, FSDP2's FP8
# weight all-gather).
FLOAT8 = ["--parallel.float8=tensorwise"]
FLOAT8_LAYOUTS = ("fsdp2", "tp2", "fsdp2xtp2")
EVERY_5 = ["--checkpoint.every=5", "--checkpoint.keep=0"]


def layout_run(prepared, root: Path, label: str, options: list[str], layout: str) -> dict:
    _, micro, extra = LAYOUTS[layout]
    name = f"{label} {layout}"
    return {"name": name, "argv": cli_args(prepared, root / name, micro=micro, extra=[*extra, *options, *EVERY_5])}


def one_process_run(prepared, tmp_path_factory, label: str, options: list[str]):
    run_dir = tmp_path_factory.mktemp(f"{label}-one")
    return train_here(prepared, run_dir, plot=False, extra=[*options, *EVERY_5]), run_dir


@pytest.fixture(scope="session")
def muon_one_process(prepared_sample, tmp_path_factory):
    return one_process_run(prepared_sample, tmp_path_factory, "muon", MUON)


@pytest.fixture(scope="session")
def float8_one_process(prepared_sample, tmp_path_factory):
    return one_process_run(prepared_sample, tmp_path_factory, "float8", FLOAT8)


def launch_runs(folder: Path, nproc: int, plan: list[dict]) -> dict:
    """Every run of `plan` in one torchrun launch (tests/launch_runs.py); returns the launch's output and each
    run's exit status."""
    folder.mkdir(parents=True, exist_ok=True)
    plan_file = folder / "plan.json"
    plan_file.write_text(json.dumps(plan))
    result = run_process(torchrun(nproc, str(REPO / "tests" / "launch_runs.py"), str(plan_file)), timeout=600)
    assert result.returncode == 0, failure(result.stdout, result.stderr)
    status = json.loads((folder / "plan.json.status.json").read_text())
    return {"status": status, "stdout": result.stdout, "stderr": result.stderr}


@pytest.fixture(scope="session")
def eval_tasks(tmp_path_factory) -> list[str]:
    """Options for in-loop lm-eval tasks (tests/harness_tasks.py's three) at steps 5 and 10, 4 requests per
    forward (so that processes with different shares run different numbers of forwards)."""
    from .harness_tasks import TASKS, write_tasks

    folder = write_tasks(tmp_path_factory.mktemp("eval-tasks"))
    return [f"--eval.tasks={list(TASKS)!r}", "--eval.every=5", f"--eval.include_path={str(folder)!r}",
            "--eval.batch_size=4"]


@pytest.fixture(scope="session")
def eval_one_process(prepared_sample, eval_tasks, tmp_path_factory) -> dict[str, list[dict]]:
    """One process's records with the eval tasks: "all" documents, and "limit 1"."""
    runs = {}
    for name, extra in (("all", []), ("limit 1", ["--eval.limit=1"])):
        run_dir = tmp_path_factory.mktemp("eval-one")
        train_here(prepared_sample, run_dir, plot=False, extra=[*eval_tasks, *extra])
        runs[name] = records(run_dir)
    return runs


@pytest.fixture(scope="session")
def two_processes(prepared_sample, one_process, muon_one_process, streaming, eval_tasks, tmp_path_factory):
    """One launch of two processes for every two-process run of this module; for the "in use" run, this test
    process holds the folder's lock (to the launched processes, another process: as a worker left running by a
    killed launcher would)."""
    import os

    from argonne.run_folder import RunLock

    root = tmp_path_factory.mktemp("two")
    plan = [
        {"name": layout, "argv": cli_args(prepared_sample, root / layout, micro=micro, extra=[
            *extra, "--checkpoint.every=5", "--checkpoint.keep=0", *(eval_tasks if layout in EVAL_LAYOUTS else [])])}
        for layout, (nproc, micro, extra) in LAYOUTS.items() if nproc == 2
    ]
    checkpoint = one_process[1] / "checkpoints" / "step-00000005"
    plan += [
        {"name": "1-to-2",
         "argv": cli_args(prepared_sample, root / "1-to-2", micro=4, extra=["--resume", str(checkpoint)])},
        {"name": "streaming", "argv": cli_args(None, root / "streaming", micro=4, extra=streaming)},
        {"name": "in use", "argv": cli_args(prepared_sample, root / "in use", steps=2, micro=4)},
        {"name": "grads", "grads": list(GRADS)},
        # tp2's checkpoint (run above, sequence parallel on) resumed with sequence parallel off.
        {"name": "tp2-to-tp2-sequence-parallel-off", "argv": cli_args(
            prepared_sample, root / "tp2-to-tp2-sequence-parallel-off", micro=8, extra=[
                *LAYOUTS["tp2-sequence-parallel-off"][2], "--resume",
                str(root / "tp2" / "checkpoints" / "step-00000005")])},
        # One document per task: one process has no request of its own.
        {"name": "eval fsdp2 limit 1", "argv": cli_args(prepared_sample, root / "eval fsdp2 limit 1", micro=4,
                                                        extra=[*eval_tasks, "--eval.limit=1"])},
        *(layout_run(prepared_sample, root, "muon", MUON, layout) for layout in MUON_LAYOUTS
          if LAYOUTS[layout][0] == 2),
        {"name": "muon 1-to-fsdp2", "argv": cli_args(prepared_sample, root / "muon 1-to-fsdp2", micro=4, extra=[
            *MUON, "--resume", str(muon_one_process[1] / "checkpoints" / "step-00000005")])},
        *(layout_run(prepared_sample, root, "float8", FLOAT8, layout) for layout in FLOAT8_LAYOUTS
          if LAYOUTS[layout][0] == 2),
    ]
    (root / "in use").mkdir()
    with RunLock(root / "in use"):
        launched = launch_runs(root, 2, plan)
    return {**launched, "root": root, "holder": os.getpid()}


@pytest.fixture(scope="session")
def four_processes(prepared_sample, eval_tasks, tmp_path_factory):
    """One launch of four processes: the 2-D mesh (with the in-loop tasks), the large-model path (built on meta, with
    QK-norm, whose replicated weights see each tensor-parallel rank's own heads), Muon and FP8 on the 2-D mesh."""
    root = tmp_path_factory.mktemp("four")
    nproc, micro, extra = LAYOUTS["fsdp2xtp2"]
    meta_init = [*extra, "--model.overrides.qk_norm=true"]
    plan = [{"name": "fsdp2xtp2", "argv": cli_args(prepared_sample, root / "fsdp2xtp2", micro=micro,
                                                   extra=[*extra, *eval_tasks])},
            {"name": "meta init", "argv": cli_args(prepared_sample, root / "meta init", micro=micro, extra=meta_init),
             "meta_init": True},
            layout_run(prepared_sample, root, "muon", MUON, "fsdp2xtp2"),
            layout_run(prepared_sample, root, "float8", FLOAT8, "fsdp2xtp2")]
    return {**launch_runs(root, nproc, plan), "root": root}


def launched_run(launch: dict, name: str) -> Path:
    assert launch["status"][name] == 0, f"{name}: {launch['status'][name]}\n" + failure(launch["stdout"],
                                                                                        launch["stderr"])
    return launch["root"] / name
