"""Checkpoints are verified before they are trusted, and opening one never runs code from it."""

import hashlib
import json
import os
import pickle
import shutil

import pytest
import torch

from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
from argonne.checkpoint import (
    COMPLETE,
    CheckpointError,
    complete_checkpoints,
    hash_files,
    load_checkpoint,
    load_model_weights,
    prune_checkpoints,
    read_marker,
    save_checkpoint,
    verify_checkpoint,
)
from argonne_cli import main

from .conftest import SAMPLE_TOKENIZER

CONFIG = dict(num_hidden_layers=1, vocab_size=8192, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=128)


def build():
    torch.manual_seed(0)
    model = ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", **CONFIG))
    return model, torch.optim.AdamW(model.parameters())


def saved(folder, step=1, train_state=None, run_id="run-a", keep=0):
    model, optimizer = build()
    state = train_state if train_state is not None else {"step": step, "data": "{}"}
    return save_checkpoint(folder, step, model, optimizer, state, is_main=True, run_id=run_id, keep=keep,
                           tokenizer=load_tokenizer(SAMPLE_TOKENIZER))


class RunsACommand:
    """A pickle payload: unpickling it runs a shell command (what a crafted checkpoint file would carry)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def rehash(path, *names):
    """Record the current checksums of `names`, as an attacker who controls the whole folder would."""
    marker = json.loads((path / COMPLETE).read_text())
    marker["files"].update(hash_files(path, list(names)))
    (path / COMPLETE).write_text(json.dumps(marker))


# ------------------------------------------------------------------------------------------------ no code runs


@pytest.fixture
def planted_metadata(tmp_path):
    """A checkpoint whose .metadata was replaced by a pickle that runs `touch`, checksums updated to match."""
    path = saved(tmp_path / "checkpoints")
    marker = tmp_path / "payload-ran"
    (path / ".metadata").write_bytes(pickle.dumps(RunsACommand(marker)))
    rehash(path, ".metadata")
    return path, marker


def test_planted_metadata_is_refused_by_every_loader(planted_metadata, tmp_path, capsys):
    path, ran = planted_metadata
    with pytest.raises(CheckpointError, match=r"\.metadata: refused.*posix\.system|\.metadata: refused.*system"):
        load_model_weights(path, build()[0])
    model, optimizer = build()
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path, model, optimizer, {"step": 0, "data": ""})
    # The commands that open checkpoints: generate, export, eval perplexity, serve (it loads before it binds).
    text = tmp_path / "doc.txt"
    text.write_text("Some text to score.")
    for argv in (["generate", str(path), "--prompt", "Hi", "--max-new-tokens", "2"],
                 ["export", str(path), "--to", "hf", "--output", str(tmp_path / "out")],
                 ["eval", "perplexity", str(path), "--data", str(text)],
                 ["serve", str(path), "--port", "1"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "refused" in err and "Traceback" not in err, (argv, err)
    assert not ran.exists(), "the payload ran"
    assert not (tmp_path / "out").exists()


def test_planted_metadata_is_refused_by_resume_and_init_from(planted_metadata, tmp_path):
    from argonne.run_config import load_run_config
    from argonne.loading import load_weights
    from argonne.training.loop import train

    from .conftest import SAMPLE_SHARD

    path, ran = planted_metadata
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(build()[0], path)
    config = load_run_config(None, [
        f"--data.inputs=[{str(SAMPLE_SHARD)!r}]", f"--data.tokenizer={str(SAMPLE_TOKENIZER)!r}",
        f"--train.run_dir={str(tmp_path / 'run')!r}", f"--model.overrides={json.dumps(CONFIG).replace(':', '=')}",
        "--data.seq_len=32", "--train.steps=1", "--data.workers=0", "--data.val_windows=0"])
    with pytest.raises(CheckpointError, match="refused"):
        train(config, resume=str(path))
    assert not ran.exists(), "the payload ran"


def test_a_payload_in_a_shard_entry_is_refused(tmp_path):
    """DCP reads non-tensor entries (the step, the data position) with torch.load(weights_only=False)."""
    ran = tmp_path / "payload-ran"
    path = saved(tmp_path / "checkpoints", train_state={"step": RunsACommand(ran), "data": "{}"})
    model, optimizer = build()
    with pytest.raises(CheckpointError, match=r"'train\.step' refused.*posix\.system"):
        load_checkpoint(path, model, optimizer, {"step": 0, "data": ""})
    assert not ran.exists(), "the payload ran"


def pickle_string(text: str) -> bytes:
    return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()


def test_a_metadata_pickle_cannot_change_a_class(tmp_path):
    """BUILD on a class sets its attributes for the whole process: here PosixPath.name, which would defeat the
    check that shard paths stay inside the folder. It must be refused before it happens."""
    import pathlib

    path = saved(tmp_path / "checkpoints")
    real = (path / ".metadata").read_bytes()
    assert real[:2] == b"\x80\x04" and real[2:3] == b"\x95"  # protocol 4, then a FRAME of 9 bytes
    # PosixPath, then (None, {"name": "../elsewhere"}) as its state: BUILD, POP; then the real metadata.
    change_a_class = (b"\x80\x04cpathlib\nPosixPath\nN}" + pickle_string("name") + pickle_string("../elsewhere")
                      + b"s\x86b0")
    (path / ".metadata").write_bytes(change_a_class + real[11:])
    rehash(path, ".metadata")
    with pytest.raises(CheckpointError, match="sets the state of type"):
        load_model_weights(path, build()[0])
    assert pathlib.PosixPath("/a/b").name == "b"


def test_a_linked_file_is_refused(tmp_path):
    path = saved(tmp_path / "checkpoints")
    shard = next(path.glob("*.distcp"))
    copy = tmp_path / "elsewhere.distcp"
    shard.rename(copy)
    shard.symlink_to(copy)  # the same bytes, so the checksum matches: the link itself is the problem
    with pytest.raises(CheckpointError, match=f"{shard.name} is a symbolic link"):
        verify_checkpoint(path)


def test_metadata_pointing_outside_the_folder_is_refused(tmp_path):
    import torch.distributed.checkpoint.metadata  # noqa: F401 (the classes the file refers to)

    path = saved(tmp_path / "checkpoints")
    with open(path / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own file, written just now
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    rehash(path, ".metadata")
    with pytest.raises(CheckpointError, match="points outside the checkpoint folder"):
        load_model_weights(path, build()[0])


# ------------------------------------------------------------------------------------------------ verification


def test_a_saved_checkpoint_records_every_file_and_loads_back(tmp_path):
    path = saved(tmp_path / "checkpoints", step=3)
    marker = read_marker(path)
    files = sorted(p.name for p in path.iterdir() if p.name != COMPLETE)
    assert marker["step"] == 3 and marker["run_id"] == "run-a" and sorted(marker["files"]) == files
    assert ".metadata" in files and "config.json" in files and "tokenizer.json" in files
    config = (path / "config.json").read_bytes()  # one piece: the sha256 of its sha256
    assert marker["files"]["config.json"] == {
        "bytes": len(config), "sha256": hashlib.sha256(hashlib.sha256(config).digest()).hexdigest()}
    assert verify_checkpoint(path) is True
    model, optimizer = build()
    torch.nn.init.zeros_(model.model.embed_tokens.weight)
    assert load_checkpoint(path, model, optimizer, {"step": 0, "data": ""})["step"] == 3
    assert torch.equal(model.model.embed_tokens.weight, build()[0].model.embed_tokens.weight)


def test_a_qk_norm_model_and_its_optimizer_state_load_back(tmp_path):
    """QK-norm's weights and their AdamW moments are in the checkpoint like every other parameter's."""
    torch.manual_seed(0)
    model = ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", **CONFIG, qk_norm=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 8192, (2, 9))
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()  # moves the norms off ones and gives them moments
    path = save_checkpoint(tmp_path / "checkpoints", 1, model, optimizer, {"step": 1, "data": "{}"}, is_main=True,
                           tokenizer=load_tokenizer(SAMPLE_TOKENIZER))
    fresh = ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", **CONFIG, qk_norm=True))
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    assert load_checkpoint(path, fresh, fresh_optimizer, {"step": 0, "data": ""})["step"] == 1
    for name in ("q_norm", "k_norm"):
        saved_norm, loaded = (getattr(m.model.layers[0].self_attn, name).weight for m in (model, fresh))
        assert not torch.equal(saved_norm, torch.ones_like(saved_norm)) and torch.equal(loaded, saved_norm)
        moments = optimizer.state[saved_norm]["exp_avg_sq"], fresh_optimizer.state[loaded]["exp_avg_sq"]
        assert torch.equal(*moments)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def shard(path):
    return next(path.glob("*.distcp"))


def damage_truncate(path):
    file = shard(path)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return rf"{file.name} has [\d,]+ bytes, [\d,]+ were written"


def damage_overwrite(path):
    with open(shard(path), "r+b") as f:  # 4 KB of 0xFF in the middle: the same size, wrong contents
        f.seek(shard(path).stat().st_size // 2)
        f.write(b"\xff" * 4096)
    return f"{shard(path).name} does not match its checksum"


def damage_remove_metadata(path):
    (path / ".metadata").unlink()
    return r"\.metadata is missing"


@pytest.mark.parametrize("damage", [damage_truncate, damage_overwrite, damage_remove_metadata])
def test_a_damaged_checkpoint_is_an_error_naming_the_file(tmp_path, damage):
    path = saved(tmp_path / "checkpoints")
    message = damage(path)
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        load_model_weights(path, build()[0])
    model, optimizer = build()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, model, optimizer, {"step": 0, "data": ""})


def test_a_checkpoint_without_checksums_loads_with_a_warning(tmp_path):
    """Checkpoints written before checksums were recorded still load, saying they were not verified."""
    path = saved(tmp_path / "checkpoints")
    (path / COMPLETE).write_text(json.dumps({"step": 1}))
    assert verify_checkpoint(path) is False
    with pytest.warns(UserWarning, match="loaded without verification"):
        load_model_weights(path, build()[0])


def test_a_garbled_marker_is_an_error(tmp_path):
    path = saved(tmp_path / "checkpoints")
    (path / COMPLETE).write_text('{"step": 1, "files": {"../x": 3}}')
    with pytest.raises(CheckpointError, match="file list is malformed"):
        verify_checkpoint(path)
    (path / COMPLETE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid marker"):
        verify_checkpoint(path)


# ------------------------------------------------------------------------------------------------ pruning


@pytest.mark.slow
def test_pruning_deletes_only_older_checkpoints_of_the_same_run(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (10, 20, 30):  # an earlier run that went further
        saved(checkpoints, step, run_id="earlier")
    for step in (2, 4):
        saved(checkpoints, step, run_id="now", keep=2)
    saved(checkpoints, 6, run_id="now", keep=2)
    steps = {p.name: read_marker(p)["run_id"] for p in complete_checkpoints(checkpoints)}
    assert steps == {"step-00000004": "now", "step-00000006": "now", "step-00000010": "earlier",
                     "step-00000020": "earlier", "step-00000030": "earlier"}
    # The just-saved checkpoint is never pruned, whatever `keep` says, nor a newer one of the same run.
    saved(checkpoints, 40, run_id="now")
    assert prune_checkpoints(checkpoints, 1, "now", newest_step=6) == [checkpoints / "step-00000004"]
    assert (checkpoints / "step-00000006").is_dir() and (checkpoints / "step-00000040").is_dir()


def test_saving_a_step_that_another_run_saved_keeps_that_one_aside(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    saved(checkpoints, 4, run_id="abandoned")
    saved(checkpoints, 4, run_id="branch")
    assert read_marker(checkpoints / "step-00000004")["run_id"] == "branch"
    kept = checkpoints / "step-00000004.run-abandoned"
    assert read_marker(kept)["run_id"] == "abandoned" and verify_checkpoint(kept)
    shutil.rmtree(kept)


@pytest.mark.parametrize("text, problem", [
    ('{"bogus": 1}', r"is not one this run's batches read \(no 'samples'\)"),
    ("{not json", r"is not valid JSON"),
    ("[1, 2]", r"is a JSON list, not an object"),
], ids=["missing-field", "not-json", "wrong-type"])
def test_a_bad_data_loader_state_is_an_error_naming_the_checkpoint(tmp_path, text, problem):
    """The data-loader state is a JSON string inside the DCP checkpoint (train.data): read by the one reader of
    that record, then restored into the run's batches."""
    from types import SimpleNamespace

    import numpy as np

    from argonne.checkpoint import read_state_record
    from argonne.data.batches import InMemoryTokens, TokenWindows, WindowBatches
    from argonne.training.loop import Run
    from argonne.training.recovery import Draws

    path = tmp_path / "step-00000002"
    run = SimpleNamespace(draws=Draws(WindowBatches(TokenWindows(InMemoryTokens(np.arange(100)), 8), 2)))
    with pytest.raises(CheckpointError, match=rf"{path}: its data-loader state \(train.data\) {problem}"):
        Run.restore_data_position(run, path, read_state_record(path, text, "data-loader state (train.data)"), 0, [])
