"""Resuming (training/resume.py): runs resumed equal uninterrupted ones; the run folder's checkpoints, branches
and lock."""

from pathlib import Path

import pytest
import torch

from argonne import ArgonneConfig, ArgonneForCausalLM
from argonne.run_config import OptimSection, load_run_config
from argonne.optim import build_optimizer
from argonne.run_folder import read_metrics
from argonne.training.loop import train

from ..conftest import REPO


@pytest.mark.slow
def test_a_wsd_run_resumed_mid_decay_equals_the_uninterrupted_run(prepared_sample, tmp_path):
    from ..launches import records, train_here

    wsd = ["--optim.schedule=wsd", "--optim.decay_fraction=0.5", "--checkpoint.every=3", "--checkpoint.keep=0"]
    straight = train_here(prepared_sample, tmp_path / "straight", steps=10, extra=wsd)
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-00000006"  # the decay runs from step 5
    resumed = train_here(prepared_sample, tmp_path / "resumed", steps=10, extra=[*wsd, "--resume", str(checkpoint)])
    lrs = [{r["step"]: r["lr"] for r in records(tmp_path / run) if "lr" in r} for run in ("straight", "resumed")]
    assert {s: l for s, l in straight.items() if s > 6} == resumed and min(resumed) == 7
    assert {s: l for s, l in lrs[0].items() if s > 6} == lrs[1]
    assert lrs[0][4] == lrs[0][5] > lrs[0][7] > lrs[0][10]  # held, then decaying


@pytest.mark.slow
def test_a_muon_run_resumed_mid_run_equals_the_uninterrupted_run(prepared_sample, muon_one_process, tmp_path,
                                                                  capsys):
    """Muon's momentum buffers are in the checkpoint (the uninterrupted run is the distributed tests' one-process
    reference, checkpointed at step 5); an AdamW run may not resume its state."""
    from argonne_cli import main

    from ..launches import MUON, cli_args, train_here

    straight, run_dir = muon_one_process
    checkpoint = run_dir / "checkpoints" / "step-00000005"
    resumed = train_here(prepared_sample, tmp_path / "resumed", extra=[*MUON, "--resume", str(checkpoint)])
    assert {s: l for s, l in straight.items() if s > 5} == resumed and min(resumed) == 6
    assert straight[10] < straight[1]

    assert main(cli_args(prepared_sample, tmp_path / "as adamw", extra=["--resume", str(checkpoint)])) == 2
    assert "its optimizer state is muon's (written with optim.optimizer = 'muon') and this run has " \
           "optim.optimizer = 'adamw'" in capsys.readouterr().err
    assert not (tmp_path / "as adamw" / "metrics.jsonl").exists()


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
    from argonne.training.loop import Run

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
