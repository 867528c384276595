"""The run folder: one trainer at a time, no earlier run overwritten by accident, a metrics log that stays valid."""

import errno
import json
import math
import socket
import subprocess
import sys

import pytest

from argonne import run_folder
from argonne.run_folder import (
    RunFolderError,
    RunLock,
    clear_earlier_run,
    earlier_run,
    encode_record,
    keep_metrics_until,
    read_metrics,
)

HOLD_LOCK = """
import sys, time
from argonne.run_folder import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def hold_lock_in_another_process(run_dir):
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


@pytest.mark.slow
def test_a_second_locker_is_refused_and_a_dead_ones_lock_is_free(tmp_path):
    holder = hold_lock_in_another_process(tmp_path)
    try:
        with pytest.raises(RunFolderError, match=rf"in use by process {holder.pid} on host {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: nothing released it; the kernel drops its lock
        holder.wait()
    with RunLock(tmp_path):
        with pytest.raises(RunFolderError, match="in use"):  # the same process twice is refused too
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released on exit from the first
        pass


@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem without locks (NFS without its lock daemon, Lustre mounted without flock)."""
    import fcntl

    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)


def test_without_flock_the_lock_is_a_directory_with_its_owner(tmp_path, no_flock):
    lock = RunLock(tmp_path)
    lock.acquire()
    owner = json.loads((tmp_path / "run.lock.d" / "owner.json").read_text())
    assert owner["host"] == socket.gethostname()
    with pytest.raises(RunFolderError, match="in use by process"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / "run.lock.d").exists()
    with RunLock(tmp_path):
        pass


def test_without_flock_a_dead_owner_on_this_host_is_taken_over(tmp_path, no_flock):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run.lock.d").mkdir()
    (tmp_path / "run.lock.d" / "owner.json").write_text(json.dumps(
        {"pid": int(dead.stdout), "host": socket.gethostname(), "since": "earlier"}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / "run.lock.d" / "owner.json").read_text())["pid"] != int(dead.stdout)


def test_without_flock_an_owner_on_another_host_is_named(tmp_path, no_flock):
    (tmp_path / "run.lock.d").mkdir()
    (tmp_path / "run.lock.d" / "owner.json").write_text(json.dumps(
        {"pid": 4242, "host": "node-17", "since": "2026-12-01 10:00:00"}))
    with pytest.raises(RunFolderError, match=r"process 4242 on host node-17 .*delete .*run\.lock\.d"):
        RunLock(tmp_path).acquire()


def test_earlier_run_lists_what_a_fresh_start_would_overwrite_and_clear_deletes_only_that(tmp_path):
    assert earlier_run(tmp_path) == []
    (tmp_path / "checkpoints" / "step-00000010").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 10}\n{"step": 20}\n')
    (tmp_path / "model").mkdir()
    (tmp_path / "notes.txt").write_text("the user's own file")
    found = earlier_run(tmp_path)
    assert found == ["1 checkpoint folder(s)", "metrics.jsonl (2 records)", "a trained model/"]
    assert sorted(clear_earlier_run(tmp_path)) == ["checkpoints", "metrics.jsonl", "model"]
    assert earlier_run(tmp_path) == [] and (tmp_path / "notes.txt").read_text() == "the user's own file"


def test_a_folder_that_is_no_run_is_not_taken_for_an_empty_one(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a model folder, say
    assert earlier_run(tmp_path) == ["a config.json that is not a run's (no run.json beside it)"]
    (tmp_path / "run.json").write_text('{"run_id": "x"}')  # an earlier start that trained nothing
    assert earlier_run(tmp_path) == []
    (tmp_path / "loss.png").write_bytes(b"png")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events").write_bytes(b"")
    assert earlier_run(tmp_path) == ["TensorBoard events", "loss.png"]


def test_overwrite_removes_links_without_following_them(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "step-00000001").mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(elsewhere)
    assert earlier_run(run) == ["1 checkpoint folder(s)"]
    assert clear_earlier_run(run) == ["checkpoints"]
    assert not (run / "checkpoints").exists() and (elsewhere / "step-00000001").is_dir()


def test_non_finite_metrics_are_valid_json_and_read_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": -math.inf}, {"step": 2, "loss": 1.5}]
    path.write_text("".join(encode_record(r) + "\n" for r in records))
    for line in path.read_text().splitlines():  # strict JSON: no bare NaN / Infinity
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    read, torn = read_metrics(path)
    assert not torn and math.isnan(read[0]["loss"]) and read[0]["grad_norm"] == math.inf
    assert read[0]["lr"] == -math.inf and read[1] == {"step": 2, "loss": 1.5}


def test_a_torn_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    records, torn = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2] and torn
    assert keep_metrics_until(path, 1) == (1, True)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n'
    path.write_text('{"step": 1}\n{"step": 2}\n')  # a complete last line without its newline is kept
    assert [r["step"] for r in read_metrics(path)[0]] == [1, 2]


def test_a_bad_line_before_the_end_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(RunFolderError, match=r"metrics\.jsonl:2: not a JSON record"):
        read_metrics(path)


def test_run_ids_are_recorded(tmp_path):
    run_folder.write_run_record(tmp_path, "abc", resumed_from=None)
    assert run_folder.read_run_id(tmp_path) == "abc"
    assert run_folder.read_run_id(tmp_path / "nowhere") is None
    assert len({run_folder.new_run_id() for _ in range(5)}) == 5


def test_a_second_branch_sets_aside_beside_the_first_never_over_it(tmp_path):
    """Two branches of one run set aside the same run's later checkpoints, metrics and model: the second set gets
    names of its own (-2), and the first set's metrics are not overwritten."""
    from argonne.run_folder import apply_set_aside, plan_set_aside

    run = tmp_path / "run"
    for step in (2, 3):
        (run / "checkpoints" / f"step-0000000{step}").mkdir(parents=True)
    (run / "model").mkdir()
    (run / "metrics.jsonl").write_text('{"step": 3}\n')
    first = plan_set_aside(run, "X", [(run / "checkpoints" / "step-00000003", "X")])
    apply_set_aside(run, first)
    (run / "model").mkdir()
    (run / "metrics.jsonl").write_text('{"step": 2}\n')
    second = plan_set_aside(run, "X", [(run / "checkpoints" / "step-00000002", "X")])
    apply_set_aside(run, second)
    assert [e["to"] for e in first] == ["checkpoints/step-00000003.run-X", "model.run-X", "metrics.run-X.jsonl"]
    assert [e["to"] for e in second] == ["checkpoints/step-00000002.run-X", "model.run-X-2", "metrics.run-X-2.jsonl"]
    assert (run / "metrics.run-X.jsonl").read_text() == '{"step": 3}\n'
    assert (run / "metrics.run-X-2.jsonl").read_text() == '{"step": 2}\n'


@pytest.mark.parametrize("stopped_after", ["record", "one move", "all moves", "the undo's moves"])
def test_a_branch_stopped_at_any_point_before_its_first_checkpoint_is_undone_whole(tmp_path, stopped_after):
    """run.json records what a branch sets aside before anything moves; killed after the record, midway through
    the moves, after them, or during an earlier undo itself, the next undo leaves the folder as before the
    branch."""
    from argonne.run_folder import (apply_set_aside, plan_set_aside, read_run_id, undo_unsaved_branch,
                                    write_run_record)

    run = tmp_path / "run"
    for step in (2, 4):
        (run / "checkpoints" / f"step-0000000{step}").mkdir(parents=True)
    (run / "model").mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 4}\n')
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*")), (run / "metrics.jsonl").read_text()
    planned = plan_set_aside(run, "OLD", [(run / "checkpoints" / "step-00000004", "OLD")])
    write_run_record(run, "BRANCH", branched_from={"run_id": "OLD", "step": 2, "set_aside": planned})
    if stopped_after != "record":
        apply_set_aside(run, planned[:1] if stopped_after == "one move" else planned)
    if stopped_after in ("all moves", "the undo's moves"):  # the branch logs once everything is set aside
        (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 3}\n')
    if stopped_after == "the undo's moves":  # an undo killed before it rewrote run.json: it runs again
        undo_unsaved_branch(run, lambda run_id: False)
        write_run_record(run, "BRANCH", branched_from={"run_id": "OLD", "step": 2, "set_aside": planned})
    assert "restored the run it branched from" in undo_unsaved_branch(run, lambda run_id: False)
    assert read_run_id(run) == "OLD"
    assert (run / "metrics.jsonl").read_text() == before[1]
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if not p.name.startswith("metrics.run-"))
    assert left == sorted(before[0] + ["run.json"])
