"""Argonne's promises about files, each walked through the real commands (`argonne_cli.main`, in-process) on tiny
fixtures built once for the module. docs/claims.md points here.

What is read is checked: every kind of file the project reads is read by one reader of that kind, and a damaged
one — truncated, empty, garbage bytes, JSON of the wrong type — ends the command that reads it with exit status 2
and one line on stderr that names the file, never a traceback (or, for a training run, NaN weights or an index
error deep in the model). FILE_KINDS holds every file kind and every damage that applies to it; each case
damages a fresh copy of a fixture and runs the command.

Nothing is lost: every command the parser knows is either in WRITERS (it writes, through argonne/outputs.py) or in
READS_ONLY (it writes nothing), and a new command in neither fails `test_every_command_is_in_the_table`. For every
writer:
* an existing output is refused without --overwrite, with an error naming it and --overwrite, and left byte-identical;
* an output path that is a file where a folder goes (or the reverse), a symbolic link, or in a place nothing can be
  written gives a one-line error naming the path: no traceback, nothing written through the link;
* a failure at the last instant of the write (the new output complete in staging, about to replace the earlier
  one) leaves the earlier output byte-identical and no staging beside it; then --overwrite replaces it. (A real
  kill -9 there, which leaves the staging for the next command to tidy: tests/test_outputs.py.)
"""

import argparse
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from argonne_cli import main

from .conftest import REPO, SAMPLE_TOKENIZER, write_sample_head

TINY_CONFIG = REPO / "configs" / "tiny.toml"
STEPS = 6  # the training fixture checkpoints every step; step k's data-loader state is DATA_STATES[k - 1]
DATA_STATES = {"truncated": '{"samples": 8, "num_win', "empty": "", "garbage": "\udcff\udcfe garbage",
               "wrong-type": "[8, 64]", "missing-field": '{"bogus": 1}'}


# ================================================================================== what is read is checked

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
    import argonne.training.loop

    run_dir = sources["root"] / "run"
    sound = argonne.training.loop.Run.train_state
    damaged = list(DATA_STATES.values())

    def train_state(self, step):
        state = sound(self, step)
        return {**state, "data": damaged[step - 1]} if step <= len(damaged) and step < STEPS else state

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argonne.training.loop.Run, "train_state", train_state)
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
                               "--output", str(folder), "--workers", "0", "--val-fraction", "0.05",
                               "--seq-len", "64"]
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

# ================================================================================================ nothing is lost

# Commands that write nothing: what each reads, for the reader of this table.
READS_ONLY = {
    "info": "prints a preset's or folder's architecture",
    "generate": "prints text",
    "chat": "prints text",
    "serve": "answers HTTP requests",
    "data inspect": "prints a prepared dataset's manifest and a window",
}


@dataclass
class Writer:
    """How to run one command into `output`: `argv(inputs, output)`; what kind of output it writes; `earlier(path)`
    the earlier output is what the command itself writes, made by running it once."""

    command: str
    argv: object
    kind: str = "folder"
    kill_argv: object = None  # how to rerun it over the earlier output in the kill case (default: argv + --overwrite)
    replaced: str = ""  # the part of the output a rerun replaces whole (a run's model/; its checkpoints and log go on)
    other_argv: object = None  # a run that would replace the earlier output (default: argv); for a resumable command,
    # one with other settings, while argv itself resumes and leaves the finished output as it is
    marks: list = field(default_factory=list)


def _train_args(inputs, output, *extra):
    return ["train", str(REPO / "configs" / "tiny.toml"), "--data.inputs=[]",
            f"--data.prepared={str(inputs / 'prepared')!r}", f"--data.tokenizer={str(SAMPLE_TOKENIZER)!r}",
            f"--train.run_dir={str(output)!r}", "--model.overrides={num_hidden_layers = 1, hidden_size = 64, "
            "num_attention_heads = 4, num_key_value_heads = 2, head_dim = 16, intermediate_size = 128}",
            "--data.seq_len=32", "--data.workers=0", "--train.micro_batch_size=2", "--train.log_every=1",
            "--checkpoint.every=2", "--train.tensorboard=false", "--data.val_windows=0", "--train.peak_tflops=1",
            *extra]


def _sft_args(inputs, output, *extra):
    return ["sft", str(REPO / "configs" / "sft-tiny.toml"), f"--model.init_from={str(inputs / 'model')!r}",
            f"--data.sft=[{str(inputs / 'sft.jsonl')!r}]", f"--data.tokenizer={str(inputs / 'model')!r}",
            f"--train.run_dir={str(output)!r}", "--data.seq_len=32", "--data.val_fraction=0", "--data.val_windows=0",
            "--train.micro_batch_size=2", "--train.log_every=1", "--checkpoint.every=2", "--train.tensorboard=false",
            "--train.peak_tflops=1", "--train.eval_every=0", *extra]


def _distill_args(inputs, output, *extra):
    return ["distill", *_train_args(inputs, output, *extra)[1:],
            f"--distill.teacher={str(inputs / 'model')!r}"]


def _training(command_args):
    """A training command's cases: a 2-step run; the kill case resumes it for one step more (the run's model/ is
    replaced at the end, through the output policy)."""
    return dict(argv=lambda i, o: command_args(i, o, "--train.steps=2"),
                kill_argv=lambda i, o: command_args(i, o, "--train.steps=3", "--resume", "auto"),
                replaced="model", marks=[pytest.mark.slow])


WRITERS = {
    "train": Writer("train", **_training(_train_args)),
    "sft": Writer("sft", **_training(_sft_args)),
    "distill": Writer("distill", **_training(_distill_args)),
    "plot": Writer("plot", lambda i, o: ["plot", str(i / "run"), "--output", str(o)], kind="file"),
    "data prepare": Writer("data prepare", lambda i, o: [
        "data", "prepare", str(i / "head.parquet"), "--tokenizer", str(SAMPLE_TOKENIZER), "--output", str(o),
        "--seq-len", "32", "--workers", "0"], other_argv=lambda i, o: [
        "data", "prepare", str(i / "head.parquet"), "--tokenizer", str(SAMPLE_TOKENIZER), "--output", str(o),
        "--seq-len", "64", "--workers", "0"]),
    "tokenizer train": Writer("tokenizer train", lambda i, o: [
        "tokenizer", "train", str(i / "head.parquet"), "--vocab-size", "300", "--output", str(o)]),
    "export": Writer("export", lambda i, o: ["export", str(i / "model"), "--to", "llama", "--output", str(o)]),
    "export gguf": Writer("export", lambda i, o: ["export", str(i / "model"), "--to", "gguf", "--output", str(o)],
                          kind="file"),
    "import": Writer("import", lambda i, o: ["import", str(i / "model"), "--output", str(o)]),
    "eval perplexity": Writer("eval perplexity", lambda i, o: [
        "eval", "perplexity", str(i / "model"), "--data", str(i / "text.txt"), "--window", "32", "--output", str(o)],
        kind="file"),
    "eval tasks": Writer("eval tasks", lambda i, o: [
        "eval", "tasks", str(i / "model"), "--tasks", "argonne_choice", "--include-path", str(i / "tasks"),
        "--limit", "2", "--output", str(o)], kind="file", marks=[pytest.mark.slow]),
}
def leaf_commands(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    """Every runnable command of the parser: "train", "data prepare", "eval tasks", ..."""
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= leaf_commands(sub, f"{prefix}{name} ") or {f"{prefix}{name}"}
    return found


def test_every_command_is_in_the_table():
    from argonne_cli import build_parser

    commands = leaf_commands(build_parser())
    tabled = {writer.command for writer in WRITERS.values()} | set(READS_ONLY)
    assert commands == tabled, (f"commands in no table: {sorted(commands - tabled)} (a command that writes goes "
                                f"through argonne/outputs.py and into WRITERS); stale entries: {sorted(tabled - commands)}")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Tiny inputs for every writer: a parquet head, a prepared dataset, a model folder, a text, task files, a run."""
    from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
    from argonne.data import DocumentSettings
    from argonne.data.prepare import PrepareSettings, prepare_dataset

    from .harness_tasks import write_tasks

    root = tmp_path_factory.mktemp("writers")
    head = write_sample_head(root / "head.parquet", documents=40, row_group_size=20)
    tokenizer = load_tokenizer(SAMPLE_TOKENIZER)
    prepare_dataset([str(head)], tokenizer, root / "prepared",
                    PrepareSettings(seq_len=32, workers=0, documents=DocumentSettings(val_fraction=0.0)),
                    progress=False)
    torch.manual_seed(0)
    config = ArgonneConfig.from_preset("tiny", num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                       max_position_embeddings=64)
    ArgonneForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "text.txt").write_text("The database stores each row of the table on disk. " * 8)
    (root / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"Count to {n}.", "response": " ".join(
        str(k) for k in range(1, n + 1))}) + "\n" for n in range(2, 12)))
    write_tasks(root / "tasks")
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "tokens": 64 * s, "loss": 9.0 - s}) + "\n" for s in range(1, 5)))
    return root


def run_command(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def state(path: Path) -> dict[str, bytes] | bytes | None:
    """A file's bytes, or every file under a folder with its bytes (but the lock records of a run or a prepare,
    which every process that takes the lock rewrites)."""
    if path.is_file():
        return path.read_bytes()
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
                if p.is_file() and p.name not in ("run.lock", ".prepare.lock")}
    return None


def leftovers_beside(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def target_name(case: str, writer: Writer) -> str:
    return {"export gguf": "model.gguf", "plot": "loss.png"}.get(case, "out.json" if writer.kind == "file" else "out")


class EarlierOutputs(dict):
    """Each writer's earlier output, made by the command itself the first time a case asks for it (so that
    `-m "not slow"` does not pay for the slow writers' outputs)."""

    def __init__(self, inputs: Path, root: Path):
        super().__init__()
        self.inputs, self.root = inputs, root

    def __missing__(self, case: str) -> Path:
        writer = WRITERS[case]
        path = self.root / case.replace(" ", "-") / target_name(case, writer)
        assert main(writer.argv(self.inputs, path)) == 0, case
        self[case] = path
        return path


@pytest.fixture(scope="module")
def earlier_outputs(inputs, tmp_path_factory):
    return EarlierOutputs(inputs, tmp_path_factory.mktemp("earlier"))


def _cases():
    return [pytest.param(case, id=case, marks=writer.marks) for case, writer in WRITERS.items()]


@pytest.mark.parametrize("case", _cases())
def test_an_existing_output_is_refused_without_overwrite_and_left_byte_identical(case, inputs, earlier_outputs,
                                                                                  capsys):
    writer, path = WRITERS[case], earlier_outputs[case]
    before = state(path)
    code, text = run_command((writer.other_argv or writer.argv)(inputs, path), capsys)
    assert code == 2, text
    assert str(path) in text and "--overwrite" in text and "Traceback" not in text
    assert state(path) == before and not leftovers_beside(path)
    if writer.other_argv:  # the same command again resumes: a finished output stays as it is
        assert run_command(writer.argv(inputs, path), capsys)[0] == 0
        assert state(path) == before


@pytest.mark.parametrize("case", _cases())
def test_an_output_that_is_the_wrong_kind_a_link_or_unwritable_is_a_clear_error(case, inputs, tmp_path, capsys):
    writer = WRITERS[case]
    # A folder named like the file (export --to gguf tells a file from a folder by its .gguf suffix).
    wrong = tmp_path / ("a-folder" + Path(target_name(case, writer)).suffix if writer.kind == "file" else "a-file")
    if writer.kind == "file":
        (wrong / "inside").mkdir(parents=True)
    else:
        wrong.write_text("a file, not a folder")
    link, pointed = tmp_path / target_name(case, writer), tmp_path / "elsewhere"
    link.symlink_to(pointed)
    below_a_file = tmp_path / "plain-file" / "out"
    (tmp_path / "plain-file").write_text("a file")
    unwritable = Path("/sys/argonne-test-output")
    places = {wrong: "is a " + ("folder" if writer.kind == "file" else "file"), link: "symbolic link",
              below_a_file: "is a file, not a folder"}
    if not os.access("/sys", os.W_OK) or not _writable("/sys"):
        places[unwritable] = "cannot write in /sys"
    for place, expected in places.items():
        before = state(wrong)
        code, text = run_command(writer.argv(inputs, place), capsys)
        assert code == 2 and expected in text and str(place) in text and "Traceback" not in text, (place, text)
        assert state(wrong) == before
    assert not pointed.exists()  # nothing written through the link


def _writable(folder: str) -> bool:
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(dir=folder))
        return True
    except OSError:
        return False


class Killed(BaseException):
    """The command stopped at the last instant of its write (no `except Exception` of the command catches it)."""


@pytest.mark.parametrize("case", _cases())
def test_a_failure_at_the_last_instant_leaves_the_earlier_output_and_overwrite_then_replaces_it(
        case, inputs, earlier_outputs, tmp_path, capsys, monkeypatch):
    from argonne.outputs import Output

    writer = WRITERS[case]
    path = tmp_path / target_name(case, writer)
    source = earlier_outputs[case]
    (shutil.copytree(source, path, symlinks=True) if source.is_dir() else shutil.copyfile(source, path))
    watched = path / writer.replaced if writer.replaced else path
    # Marked, so that a replacement is seen even where the command writes the same bytes again.
    if watched.is_dir():
        (watched / "written-before").write_text("the earlier output")
    else:
        watched.write_bytes(watched.read_bytes() + b"the earlier output")
    before = state(watched)
    published = []

    def killed(self, staging):
        published.append(self.path)
        raise Killed(f"killed while replacing {self.path}")

    monkeypatch.setattr(Output, "publish", killed)
    argv = writer.kill_argv(inputs, path) if writer.kill_argv else [
        *(writer.other_argv or writer.argv)(inputs, path), "--overwrite"]
    with pytest.raises(Killed):
        run_command(argv, capsys)
    assert published, "the command never reached its output's publish"
    assert state(watched) == before and not leftovers_beside(watched)
    monkeypatch.undo()
    code, text = run_command(argv, capsys)
    assert code == 0, text
    assert state(watched) != before and not leftovers_beside(watched)
