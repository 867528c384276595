"""Which run folder and checkpoint a run starts from: the folder claimed (locked, and checked to overwrite no other
run: `claim_run_folder`), the checkpoint chosen (`choose_checkpoint`: none, `--resume auto` or a path, a branch or
not), and the folder recorded once the run is built (`start_run_folder`). The rules of the folder: run_folder.py."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from ..checkpoint import (
    CheckpointError, checkpoint_step, complete_checkpoints, read_marker, run_id_of, verify_checkpoint,
)
from ..files import write_atomic
from ..parallel import Topology, from_main_process
from ..run_folder import (
    METRICS_FILE,
    RunFolderError,
    RunLock,
    apply_set_aside,
    clear_earlier_run,
    earlier_run,
    new_run_id,
    plan_set_aside,
    read_run_id,
    refuse_fresh_start,
    set_aside_name,
    undo_unsaved_branch,
    write_run_record,
)
from .metrics import log_main


def claim_run_folder(run_dir: Path, resume: str | None, overwrite: bool, topology: Topology) -> RunLock | None:
    """Lock the run folder (main process) and check that the run overwrites no other: a fresh start needs a folder
    without an earlier run (or `overwrite`, which deletes it), and a checkpoint from elsewhere resumes only into
    such a folder. Every process raises the same RunFolderError when the folder cannot be used."""
    from ..outputs import FOLDER, check_place

    lock, problem = None, None
    if topology.is_main:
        lock = RunLock(run_dir)
        try:
            check_place(run_dir, FOLDER, option="train.run_dir")
            lock.acquire()
            found = earlier_run(run_dir)
            if found and resume is None and not overwrite:
                raise refuse_fresh_start(run_dir, found)
            if found and resume is None:
                log_main(0, f"--overwrite: deleted the earlier run in {run_dir}: "
                            f"{', '.join(clear_earlier_run(run_dir))}")
            if found and resume not in (None, "auto") and Path(resume).resolve().parent != \
                    (run_dir / "checkpoints").resolve():
                raise RunFolderError(
                    f"run folder {run_dir} holds an earlier run ({', '.join(found)}), and {resume} is not one of "
                    f"its checkpoints: resume it into an empty train.run_dir, or continue this folder's own run "
                    f"with --resume auto")
        except (RunFolderError, ValueError) as error:  # outputs.OutputError: a file, a link
            lock.release()
            lock, problem = None, str(error)
    problem = from_main_process(problem, topology)
    if problem is not None:
        raise RunFolderError(problem)
    return lock


class RunStart(NamedTuple):
    """How a run starts: from which checkpoint (None: afresh), under which run id, and which checkpoints it sets
    aside once it is built: a branch's newer ones (`newer`) and those `--resume auto` skipped for failing
    verification (`unverified`, kept as `step-N.unverified`: the run would otherwise replace them at their step)."""

    resume_from: Path | None
    run_id: str
    newer: tuple | list = ()  # (checkpoint, its run id)
    unverified: tuple[Path, ...] | list[Path] = ()
    branch: bool = False  # the folder's run steps aside (its newer checkpoints, model and metrics)


def choose_checkpoint(run_dir: Path, resume: str | None, topology: Topology) -> RunStart:
    """The checkpoint to resume from (None: a fresh start), the run's id, and the checkpoints it sets aside, the
    same in every process (the main process lists the folder; verification is shared by all). Nothing is
    written here but the undoing of a branch that never saved (below): the run folder changes only once the run is
    built (`start_run_folder`), so a refused resume leaves it as it was.

    `auto`: the newest checkpoint of this folder's run that verifies; one that does not is skipped, saying why, and
    none verifying is an error (starting over would bury the run). No checkpoint at all starts a new run only in a
    folder with no trace of one; a branch stopped before its first checkpoint is undone first, so auto finds what it
    found before the branch. A path: it must verify. The run id continues the checkpoint's. It is new for a fresh
    start, and for a resume from a checkpoint of this folder older than its run's newest: a branch, for which the
    newer checkpoints, the metrics log and the model are set aside under the old run's id (`plan_set_aside`), never
    deleted. Newer checkpoints that `auto` skipped failed verification: they are set aside too, never replaced."""
    checkpoints, unverified = run_dir / "checkpoints", []
    if resume is None:
        return RunStart(None, from_main_process(new_run_id(), topology))
    if resume == "auto":
        listed, problem = main_decides(lambda: _auto_listing(run_dir), topology)
        if problem is not None:
            raise RunFolderError(problem)
        path, unverified = _first_verified(listed, checkpoints, topology)
        if path is None:
            return RunStart(None, from_main_process(new_run_id(), topology))
    else:
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
        if not verify_checkpoint(path, topology.host_group):
            log_main(topology.rank, f"{path}: written before checkpoints recorded checksums, not verified")
    run_id, newer, branch = main_decides(lambda: _branch_of(run_dir, path, resume), topology)
    return RunStart(path, run_id, newer, unverified, branch)


def main_decides(decide: Callable, topology: Topology):
    """`decide()`'s result, computed by the main process (which lists and reads the run folder), in every process.
    A user error there (a damaged run.json or marker) is raised in every process, not in the main one alone while
    the others wait for its answer."""
    result, problem = None, None
    if topology.is_main:
        try:
            result = decide()
        except (ValueError, OSError) as error:
            if topology.world == 1:
                raise
            problem = f"{type(error).__name__}: {error}"
    result, problem = from_main_process((result, problem), topology)
    if problem is not None:
        raise RunFolderError(problem)
    return result


def _auto_listing(run_dir: Path) -> tuple[list[Path], str | None]:
    """(Main process.) --resume auto's candidates, newest first, or the problem when there are none but the folder
    holds traces of a run (checkpoints without their COMPLETE marker, metrics, a model...)."""
    checkpoints = run_dir / "checkpoints"
    _undo_unsaved_branch(run_dir, "--resume auto")
    candidates = _auto_candidates(checkpoints, read_run_id(run_dir))
    found = earlier_run(run_dir) if not candidates else []
    if found:
        return [], (f"--resume auto: no complete checkpoint of this run in {checkpoints} to continue from, but "
                    f"{run_dir} holds an earlier run ({', '.join(found)}). Resume a checkpoint with --resume PATH, "
                    f"delete the run and start over with --overwrite, or choose another train.run_dir")
    return candidates, None


def _undo_unsaved_branch(run_dir: Path, option: str) -> None:
    """(Main process.) Undo a branch of this folder that stopped before its first checkpoint (run_folder.py)."""
    checkpoints = run_dir / "checkpoints"
    undone = undo_unsaved_branch(run_dir, lambda run_id: any(run_id_of(c) == run_id
                                                             for c in complete_checkpoints(checkpoints)))
    if undone:
        log_main(0, f"{option}: {undone}")


def _auto_candidates(checkpoints: Path, run_id: str | None) -> list[Path]:
    """This folder's run's checkpoints (or all, in a folder without run.json), newest first."""
    return [c for c in reversed(complete_checkpoints(checkpoints)) if run_id is None or run_id_of(c) in (run_id, None)]


def _first_verified(candidates: list[Path], checkpoints: Path, topology: Topology) -> tuple[Path | None, list[Path]]:
    """The newest candidate that verifies, and the newer ones that did not."""
    skipped = []
    for path in candidates:
        try:
            if not verify_checkpoint(path, topology.host_group):
                log_main(topology.rank, f"{path}: written before checkpoints recorded checksums, not verified")
            return path, skipped
        except CheckpointError as error:
            log_main(topology.rank, f"--resume auto: skipping {path.name}: {error}")
            skipped.append(path)
    if candidates:
        raise CheckpointError(
            f"--resume auto: none of the {len(candidates)} checkpoint(s) in {checkpoints} verifies (see above). "
            f"Resume from a good copy of one with --resume PATH; --overwrite would delete this run and start over"
        )
    return None, skipped


def _branch_of(run_dir: Path, path: Path, resume: str) -> tuple[str, list[tuple[Path, str]], bool]:
    """(Main process.) The run id of a run resumed from `path`, and the checkpoints a branch sets aside once it
    starts (`start_run_folder`), each with its run's id: those newer than `path` of its run and of the run the
    folder holds (run.json's, another when resuming an earlier branch's or a set-aside checkpoint). Any such
    checkpoint, or the folder holding another run, makes the resume a branch: a new run id, the folder's model and
    metrics set aside too. A branch stopped before its first checkpoint is undone first."""
    marker = read_marker(path)
    run_id, step = marker.get("run_id"), marker["step"]
    checkpoints = run_dir / "checkpoints"
    if resume == "auto" or path.resolve().parent != checkpoints.resolve():
        return run_id or new_run_id(), [], False
    _undo_unsaved_branch(run_dir, "--resume")
    current = read_run_id(run_dir)
    owners = {run_id, current} - {None}
    newer = [(c, run_id_of(c)) for c in complete_checkpoints(checkpoints)
             if checkpoint_step(c) > step and run_id_of(c) in owners]
    branch = bool(newer) or (current is not None and current != run_id)
    return (new_run_id() if run_id is None or branch else run_id), newer if branch else [], branch


def start_run_folder(run, start: RunStart) -> None:
    """(Main process, once the run is built and restored.) Set aside the checkpoints that `start` names and record
    the run: config.json and run.json. A branch's run.json, with what it sets aside, is written before anything
    moves, so that a branch stopped at any point before its first checkpoint can be undone."""
    run_dir, branch, planned = Path(run.config.train.run_dir), None, []
    for path in start.unverified:
        aside = set_aside_name(path, "unverified")
        path.rename(aside)
        log_main(0, f"--resume auto: {path.name}, which failed verification, is kept as {aside.name}")
    if start.branch:  # the run the folder held (run.json's; the resumed checkpoint's when there is none) steps aside
        old_id = read_run_id(run_dir) or run_id_of(run.resume_from) or "unnamed"
        planned = plan_set_aside(run_dir, old_id, list(start.newer))
        branch = {"run_id": old_id, "step": read_marker(run.resume_from)["step"], "set_aside": planned}
    write_atomic(run_dir / "config.json", json.dumps(run.config.to_dict(), indent=2))
    write_run_record(run_dir, run.run_id, resumed_from=str(run.resume_from) if run.resume_from else None,
                     **({"branched_from": branch} if branch else {}))
    if branch:
        apply_set_aside(run_dir, planned)
        resumed_run = run_id_of(run.resume_from)
        kept_log = run_dir / f"metrics.run-{resumed_run}.jsonl"
        if resumed_run != old_id and kept_log.is_file():  # the resumed run's own log goes on (cut at its step)
            shutil.copyfile(kept_log, run_dir / METRICS_FILE)
        log_main(0, f"resuming from {run.resume_from.name}: a branch of the run in {run_dir}. Kept under the old "
                    f"runs' names: {', '.join(entry['to'] for entry in planned) or 'nothing to keep'}")
