"""The output policy (argonne/outputs.py) on its own: staging, replacement, and what dead writers leave behind.
Every command's use of it is walked in tests/test_promises.py."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from argonne.outputs import FILE, FOLDER, Output, OutputError

from .conftest import env


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): nothing runs under it now."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_folder_is_staged_beside_the_target_and_replaces_it_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("earlier")
    with pytest.raises(OutputError, match=r"already exists and holds 1 entry \(old\.txt\); pass --overwrite"):
        Output(target, FOLDER)
    output = Output(target, FOLDER, overwrite=True)
    with output.staged() as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.staging-")
        (staging / "new.txt").write_text("new")
        assert (target / "old.txt").read_text() == "earlier"  # untouched until the end
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_write_leaves_the_earlier_output_and_no_staging(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("earlier")
    with pytest.raises(RuntimeError, match="the command failed"):
        with Output(target, FILE, overwrite=True).staged() as staging:
            staging.write_text("half")
            raise RuntimeError("the command failed")
    assert target.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_an_empty_folder_is_no_earlier_output_and_a_new_target_gets_its_parents(tmp_path):
    (tmp_path / "empty").mkdir()
    Output(tmp_path / "empty", FOLDER)  # no refusal
    assert Output(tmp_path / "a" / "b" / "c.json", FILE).write("{}") == tmp_path / "a" / "b" / "c.json"
    assert (tmp_path / "a" / "b" / "c.json").read_text() == "{}"


def test_staging_of_a_dead_writer_is_removed_and_a_live_ones_kept(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".out.staging-{host}-{dead_pid()}"
    alive = tmp_path / f".out.staging-{host}-{os.getpid()}"
    elsewhere = tmp_path / ".out.staging-another-host-1"
    for folder in (dead, alive, elsewhere):
        folder.mkdir()
    Output(tmp_path / "out", FOLDER)
    assert not dead.exists() and alive.exists() and elsewhere.exists()


def test_an_earlier_output_left_aside_by_a_writer_killed_between_its_renames_is_put_back(tmp_path):
    """Killed after the earlier output was renamed aside and before the new one moved in: the target is missing,
    and the next command that writes there puts the earlier one back before it looks."""
    aside = tmp_path / f".out.replaced-{socket.gethostname()}-{dead_pid()}"
    aside.mkdir()
    (aside / "model.safetensors").write_text("the earlier model")
    with pytest.raises(OutputError, match="already exists"):
        Output(tmp_path / "out", FOLDER)
    assert (tmp_path / "out" / "model.safetensors").read_text() == "the earlier model" and not aside.exists()


@pytest.mark.slow
def test_an_export_killed_with_sigkill_leaves_the_earlier_output_and_the_next_one_cleans_up(model_dir,
                                                                                            tmp_path_factory):
    """A real kill -9, at the last instant (the new export complete in staging): the earlier output is as it was,
    the staging is left behind (nothing runs after SIGKILL), and the next export tidies it and succeeds."""
    tmp_path = tmp_path_factory.mktemp("exports")
    target = tmp_path / "exported"
    target.mkdir()
    (target / "keep.txt").write_text("the earlier export")
    script = (
        "import os, signal, sys\n"
        "from argonne.outputs import Output\n"
        "Output.publish = lambda self, staging: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from argonne_cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["export", str(model_dir), "--to", "hf", "--output", str(target), "--overwrite"]
    killed = subprocess.run([sys.executable, "-c", script, *argv], env=env(), capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".exported.staging-")]
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file()
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]

    from argonne_cli import main

    assert main(argv) == 0
    assert (target / "model.safetensors").is_file() and not (target / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


@pytest.mark.parametrize("kind", [FOLDER, FILE])
def test_an_output_another_command_wrote_meanwhile_is_not_replaced_without_overwrite(tmp_path, kind):
    """Two commands writing one target at once: the one that finishes second is refused, not the first's output
    replaced."""
    target = tmp_path / "out"
    output = Output(target, kind)  # checked: nothing there yet
    with pytest.raises(OutputError, match="written by someone else while this command ran; nothing was replaced"):
        with output.staged() as staging:
            (staging / "mine.txt").write_text("second") if kind == FOLDER else staging.write_text("second")
            if kind == FOLDER:
                target.mkdir()
                (target / "theirs.txt").write_text("first")
            else:
                target.write_text("first")
    assert (target / "theirs.txt" if kind == FOLDER else target).read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_with_odd_pids_and_a_folder_made_empty_again(tmp_path):
    host = socket.gethostname()
    for pid in ("99999999999999999999", "0"):  # beyond any pid; 0 (os.kill would signal our own group)
        (tmp_path / f".out.staging-{host}-{pid}").mkdir()
    aside = tmp_path / f".out.replaced-{host}-{dead_pid()}"
    aside.mkdir()
    (aside / "model.safetensors").write_text("the earlier model")
    (tmp_path / "out").mkdir()  # a script's `mkdir -p out` after the writer died between its renames
    with pytest.raises(OutputError, match="already exists"):
        Output(tmp_path / "out", FOLDER)
    assert (tmp_path / "out" / "model.safetensors").read_text() == "the earlier model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_dot_and_dot_dot_name_folders_like_any_other(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    output = Output("../../out", FOLDER)
    assert output.path == tmp_path / "out"
    with output.staged() as staging:
        (staging / "model.txt").write_text("new")
    assert (tmp_path / "out" / "model.txt").read_text() == "new"
    # The current folder (or one holding it) would be renamed away under the shell: refused, saying why.
    for target in (".", ".."):
        with pytest.raises(OutputError, match="is the current folder or holds it"):
            Output(target, FOLDER, overwrite=True)
