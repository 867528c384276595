"""Argonne's promises about files, each walked through the real commands.

What is read is checked: every kind of file the project reads is read by one reader of that kind, and a damaged
one — truncated, empty, garbage bytes, JSON of the wrong type — ends the command that reads it with exit status 2
and one line on stderr that names the file, never a traceback (or, for a training run, NaN weights or an index
error deep in the model). The table below holds every file kind and every damage that applies to it; each case
damages a fresh copy of a fixture built once for the module and runs the command in-process.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from argonne.cli import main

from .conftest import REPO, SAMPLE_TOKENIZER, write_sample_head

TINY_CONFIG = REPO / "configs" / "tiny.toml"
STEPS = 6  # the training fixture checkpoints every step; step k's data-loader state is DATA_STATES[k - 1]
DATA_STATES = {"truncated": '{"samples": 8, "num_win', "empty": "", "garbage": "\udcff\udcfe garbage",
               "wrong-type": "[8, 64]", "missing-field": '{"bogus": 1}'}


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The inputs every fixture is made from: a parquet head of the sample and a prepared dataset of it."""
    from argonne import load_tokenizer
    from argonne.data import DocumentSettings
    from argonne.data.prepare import PrepareSettings, prepare_dataset

    root = tmp_path_factory.mktemp("promises")
    parquet = write_sample_head(root / "head.parquet")
    prepare_dataset([str(parquet)], load_tokenizer(SAMPLE_TOKENIZER), root / "prepared",
                    PrepareSettings(seq_len=64, workers=0, documents=DocumentSettings(val_fraction=0.05)),
                    progress=False)
    return {"parquet": parquet, "prepared": root / "prepared", "root": root}


def run_args(prepared: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", str(TINY_CONFIG), f"--data.prepared={str(prepared)!r}", "--data.inputs=[]",
            f"--data.tokenizer={str(SAMPLE_TOKENIZER)!r}", f"--train.run_dir={str(run_dir)!r}",
            "--model.overrides={num_hidden_layers = 2, hidden_size = 64, intermediate_size = 172}",
            "--data.seq_len=32", "--data.workers=0", "--data.val_windows=0", "--train.micro_batch_size=2",
            "--train.log_every=1", "--train.tensorboard=false", "--train.peak_tflops=1", "--checkpoint.every=1",
            "--checkpoint.keep=0", "--train.sample_every=0", *extra]


@pytest.fixture(scope="module")
def trained(sources):
    """A run of STEPS tiny steps (a checkpoint at each, its data-loader state damaged as DATA_STATES says) and
    its trained model folder; the last checkpoint is sound."""
    import argonne.train

    run_dir = sources["root"] / "run"
    sound = argonne.train.Run.train_state
    damaged = list(DATA_STATES.values())

    def train_state(self, step):
        state = sound(self, step)
        return {**state, "data": damaged[step - 1]} if step <= len(damaged) and step < STEPS else state

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argonne.train.Run, "train_state", train_state)
        assert main(run_args(sources["prepared"], run_dir, f"--train.steps={STEPS}")) == 0
    return run_dir


@pytest.fixture(scope="module")
def model_folder(sources):
    """A tiny model folder (safetensors, config, tokenizer) and one with torch.save weights instead."""
    from argonne import load_tokenizer

    from .conftest import small_model

    folder = sources["root"] / "model"
    model = small_model()
    model.save_pretrained(folder)
    load_tokenizer(SAMPLE_TOKENIZER).save_pretrained(folder)
    with_bin = sources["root"] / "model-bin"
    shutil.copytree(folder, with_bin)
    (with_bin / "model.safetensors").unlink()
    torch.save(model.state_dict(), with_bin / "pytorch_model.bin")
    index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in model.state_dict()}}
    with_index = sources["root"] / "model-index"
    shutil.copytree(folder, with_index)
    (with_index / "model.safetensors.index.json").write_text(json.dumps(index))
    return {"safetensors": folder, "bin": with_bin, "index": with_index}


# ------------------------------------------------------------------------------------------------ damage


def truncated(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def empty(file: Path) -> None:
    file.write_bytes(b"")


def garbage(file: Path) -> None:
    """4 KB of 0xFF every 64 KB (the whole file when smaller): the size kept, the content not text, not JSON."""
    size = file.stat().st_size
    with open(file, "r+b") as f:
        for offset in range(0, size, 64 << 10):
            f.seek(offset)
            f.write(b"\xff" * min(4096, size - offset))


def wrong_type(file: Path) -> None:
    file.write_text("[1, 2, 3]\n")


DAMAGE = {"truncated": truncated, "empty": empty, "garbage": garbage, "wrong-type": wrong_type}


# ------------------------------------------------------------------------------------------------ the table


def prepared_copy(sources, tmp_path) -> Path:
    return shutil.copytree(sources["prepared"], tmp_path / "prepared")


def model_copy(kind):
    def copy(model_folder, tmp_path):
        return shutil.copytree(model_folder[kind], tmp_path / "model")
    return copy


def generate(folder: Path) -> list[str]:
    return ["generate", str(folder), "--prompt", "Hello", "--max-new-tokens", "1", "--device", "cpu"]


# file kind -> (the fixture it lives in, a copy of that fixture, the file in the copy, the command that reads it,
# the damages that apply). A prepared shard has no JSON type; a run config is TOML (an empty one is the defaults).
FILE_KINDS = {
    "manifest": ("sources", prepared_copy, "manifest.json", lambda d: ["data", "inspect", str(d)], DAMAGE),
    "token-shard": ("sources", prepared_copy, "shards/00000.train.bin", lambda d: ["data", "inspect", str(d)],
                    ["truncated", "empty", "garbage"]),
    "shard-done-record": ("sources", prepared_copy, "shards/00000.json", None, DAMAGE),
    "checkpoint-marker": ("trained", None, "checkpoints/step-00000006/COMPLETE", None, DAMAGE),
    "model-config": ("model_folder", model_copy("safetensors"), "config.json", generate, DAMAGE),
    "safetensors": ("model_folder", model_copy("safetensors"), "model.safetensors", generate,
                    ["truncated", "empty", "garbage"]),
    "safetensors-index": ("model_folder", model_copy("index"), "model.safetensors.index.json", generate, DAMAGE),
    "torch-bin": ("model_folder", model_copy("bin"), "pytorch_model.bin", generate, ["truncated", "empty", "garbage"]),
    "tokenizer-json": ("model_folder", model_copy("safetensors"), "tokenizer.json", generate, DAMAGE),
    "run-record": ("trained", None, "run.json", None, DAMAGE),
    "metrics": ("trained", None, "metrics.jsonl", lambda d: ["plot", str(d)], ["garbage", "wrong-type"]),
    "run-config": ("sources", None, "run.toml", None, ["truncated", "garbage"]),
}
CASES = [pytest.param(kind, damage, id=f"{kind}-{damage}")
         for kind, (*_, damages) in FILE_KINDS.items() for damage in damages]


def case_command(kind: str, request, tmp_path) -> tuple[Path, list[str]]:
    """(the file to damage, the command that reads it) on a fresh copy of the kind's fixture."""
    fixture_name, copy, name, command, _ = FILE_KINDS[kind]
    fixture = request.getfixturevalue(fixture_name)
    sources = request.getfixturevalue("sources")
    if kind == "shard-done-record":  # prepare again: a finished shard's record is read to skip it
        folder = copy(fixture, tmp_path)
        return folder / name, ["data", "prepare", str(sources["parquet"]), "--tokenizer", str(SAMPLE_TOKENIZER),
                               "--output", str(folder), "--workers", "0", "--val-fraction", "0.05"]
    if kind == "run-config":
        config = tmp_path / name
        config.write_text(f'[data]\nprepared = "{sources["prepared"]}"\nseq_len = 32\n\n[train]\nsteps = 1\n')
        return config, ["train", str(config), f"--train.run_dir={str(tmp_path / 'run')!r}"]
    if fixture_name == "trained":
        run_dir = shutil.copytree(fixture, tmp_path / "run")
        if kind == "checkpoint-marker":
            return run_dir / name, generate(run_dir / "checkpoints" / "step-00000006")
        if kind == "run-record":  # resuming the run reads its id, to resume its own checkpoints only
            return run_dir / name, [*run_args(sources["prepared"], run_dir, f"--train.steps={STEPS + 1}"),
                                    "--resume", "auto"]
        return run_dir / name, command(run_dir)
    folder = copy(fixture, tmp_path)
    return folder / name, command(folder)


def assert_named_error(code: int, captured, file: Path) -> None:
    output = captured.out + captured.err
    assert "Traceback" not in output, output
    assert code == 2, output
    error = re.search(r"argonne [\w ]+: error: .*", captured.err)  # after any progress bar on the same line
    assert error, captured.err
    assert str(file) in error.group() or file.name in error.group(), captured.err


@pytest.mark.parametrize("kind, damage", CASES)
def test_a_damaged_file_is_an_error_naming_it(kind, damage, request, tmp_path, capsys):
    file, command = case_command(kind, request, tmp_path)
    DAMAGE[damage](file)
    capsys.readouterr()
    code = main(command)
    assert_named_error(code, capsys.readouterr(), file)


@pytest.mark.parametrize("damage", list(DATA_STATES))
def test_a_damaged_data_loader_state_is_an_error_naming_the_checkpoint(damage, trained, sources, tmp_path, capsys):
    """The data-loader state is a JSON string inside a checkpoint's DCP files (train.data): the fixture's run
    wrote step k's damaged, and resuming from it reads it."""
    step = list(DATA_STATES).index(damage) + 1
    checkpoint = trained / "checkpoints" / f"step-{step:08d}"
    capsys.readouterr()
    code = main([*run_args(sources["prepared"], tmp_path / "run", f"--train.steps={STEPS + 1}"),
                 "--resume", str(checkpoint)])
    captured = capsys.readouterr()
    assert_named_error(code, captured, checkpoint)
    assert "data-loader state (train.data)" in captured.err
