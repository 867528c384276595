"""Sharded, atomic, verified training checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a folder `CHECKPOINTS/step-NNNNNNNN/` holding:
  - the DCP shards of {"model", "optimizer", "train"} (every rank writes its own shards) and DCP's `.metadata`,
  - `config.json` (the model config), `run_config.json`, the tokenizer files, and
  - `COMPLETE`, written last: the step, the id of the run that wrote it, and the size and sha256 of every other file.
It is written to `step-NNNNNNNN.tmp/` and renamed only after every rank finished and `COMPLETE` exists, so a crash
mid-write leaves the previous checkpoint as the latest and the partial folder is never picked. DCP reshards on load:
a checkpoint saved with one parallel layout loads into any other.

Opening a checkpoint never runs code from it. DCP reads `.metadata` with plain `pickle.load` and the non-tensor
entries of the shards with `torch.load(weights_only=False)`: either would run whatever a crafted file asks. Here
`.metadata` is read by an unpickler that admits only DCP's metadata types, and every non-tensor entry must load
under `weights_only=True` before DCP may read it. Before a checkpoint is loaded its files are checked against the
sizes and checksums in `COMPLETE`, so a truncated or overwritten shard is an error naming the file, not NaN weights.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from .files import CHECKSUM, hash_files, read_json

COMPLETE = "COMPLETE"
METADATA = ".metadata"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or read; the message names the folder (and file) and why."""


def step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step-{step:08d}"


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    found = complete_checkpoints(checkpoints)
    return found[-1] if found else None


def is_checkpoint(path: Path) -> bool:
    """Whether a folder is a training checkpoint (complete or not) rather than a Hugging Face folder."""
    return (Path(path) / COMPLETE).is_file() or (Path(path) / METADATA).is_file()


def read_marker(path: Path) -> dict:
    """The COMPLETE marker: {"step", "run_id", "checksum" (the scheme), "files": {name: {"bytes", "sha256"}}}
    ("step" alone in checkpoints written before checksums were recorded)."""
    marker = Path(path) / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    record = read_json(marker, CheckpointError, "marker")
    if not isinstance(record.get("step"), int):
        raise CheckpointError(f"{marker}: not a valid marker (no step)")
    files = record.get("files")
    if files is not None and not (isinstance(files, dict) and all(
            Path(name).name == name and isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("sha256"), str) for name, entry in files.items())):
        raise CheckpointError(f"{marker}: not a valid marker (its file list is malformed)")
    return record


def read_state_record(path: Path, text, what: str) -> dict:
    """A JSON record stored as a string in a checkpoint's train state (the data-loader state `train.data`, the
    spike recovery's `train.recovery`): anything but a JSON object is a CheckpointError naming the checkpoint."""
    if not isinstance(text, str):
        raise CheckpointError(f"{path}: its {what} is {type(text).__name__}, not a JSON string")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: its {what} is not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: its {what} is a JSON {type(record).__name__}, not an object")
    return record


# ------------------------------------------------------------------------------------------------ reading safely

# Every global a DCP `.metadata` pickle refers to (torch 2.6 - 2.13): the metadata dataclasses, torch.Size, dtypes
# and layouts, and the path the checkpoint was saved under. Anything else is refused.
_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    *(("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
}


def _metadata_classes() -> tuple[type, ...]:
    """The classes whose instances a metadata pickle may set the state of (BUILD)."""
    from torch.distributed.checkpoint import filesystem, metadata

    names = ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
             "ChunkStorageMetadata", "TensorProperties")
    return (*(getattr(metadata, name) for name in names if hasattr(metadata, name)), filesystem._StorageInfo)


class _MetadataUnpickler(pickle._Unpickler):
    """Python's own unpickler (not the C one: its opcodes can be overridden) admitting only the metadata globals,
    and setting state (BUILD) only on instances of the metadata classes: on a class, BUILD would set attributes of
    that class for the whole process (PosixPath.name, say), before anything could refuse the file."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not a checkpoint metadata type")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent id, which checkpoint metadata never does")

    def load_build(self):
        target = self.stack[-2]
        if type(target) not in _metadata_classes():
            raise pickle.UnpicklingError(f"it sets the state of {type(target).__name__} {target!r:.60}, which "
                                         f"checkpoint metadata never does")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build


def read_checkpoint_metadata(path: Path) -> Metadata:
    """DCP's `.metadata` of a checkpoint folder, unpickled with only the metadata types admitted; its shard paths
    must be plain file names inside the folder."""
    file = Path(path) / METADATA
    if not file.is_file():
        raise CheckpointError(f"{path}: no {METADATA} file (not a DCP checkpoint, or an incomplete copy)")
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as error:  # anything a damaged or crafted pickle raises
        raise CheckpointError(
            f"{file}: refused, not DCP checkpoint metadata: {error}. Loading it with plain pickle could run code "
            f"from the file; re-save the checkpoint with Argonne where it came from"
        ) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{file}: refused, it unpickles to {type(metadata).__name__}, not DCP metadata")
    for info in metadata.storage_data.values():
        relative = getattr(info, "relative_path", None)
        if not isinstance(relative, str) or Path(relative).name != relative or relative in (".", ".."):
            raise CheckpointError(f"{file}: refused, it points outside the checkpoint folder ({relative!r})")
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by the restricted unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_checkpoint_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, except that a non-tensor entry (step, data position, optimizer scalars) must load with
    `weights_only=True` first: DCP itself reads them with `weights_only=False`, which runs a crafted pickle."""

    def load_bytes(self, read_item, value) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as error:
            found = re.search(r"GLOBAL (\S+)", str(error))
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"entry {read_item.dest_index.fqn!r} refused: it needs arbitrary Python objects{what} to load, "
                f"which could run code; a checkpoint holds only tensors and plain values"
            ) from None
        value.seek(0)
        super().load_bytes(read_item, value)  # now known to hold only plain data


def _dcp_load(state: dict, path: Path) -> None:
    """dcp.load through the safe reader and planner; its failures become one CheckpointError naming the folder."""
    from torch.distributed.checkpoint.api import CheckpointException

    read_checkpoint_metadata(path)  # refused here, with one message (inside dcp.load it logs tracebacks first)
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=_SafeReader(str(path)), planner=_SafeLoadPlanner())
    except CheckpointException as error:
        causes = [failure[0] if isinstance(failure, tuple) else failure for failure in error.failures.values()]
        ours = next((c for c in causes if isinstance(c, CheckpointError)), None)
        if ours is not None:
            raise _naming(ours, path) from None
        detail = "; ".join(f"{type(c).__name__}: {c}" for c in causes[:2])
        raise CheckpointError(f"{path}: could not be loaded into this model ({detail})") from None
    except CheckpointError as error:
        raise _naming(error, path) from None


def _naming(error: CheckpointError, path: Path) -> CheckpointError:
    """The error, its message starting with the checkpoint's folder (once)."""
    return error if str(error).startswith(str(path)) else CheckpointError(f"{path}: {error}")


# ------------------------------------------------------------------------------------------------ checksums


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather_objects(value, group=None) -> list:
    """`value` from every process (in rank order); [value] in one process."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def _hash_shards(folder: Path, group=None) -> dict[str, dict]:
    """Checksums of the DCP shard files, each process hashing its share (the files are on a shared filesystem)."""
    rank, world = _rank_and_world()
    shards = sorted(p.name for p in folder.glob("*.distcp"))
    merged: dict[str, dict] = {}
    for part in gather_objects(hash_files(folder, shards[rank::world]), group):
        merged.update(part)
    return merged


def _file_problems(folder: Path, files: dict[str, dict]) -> list[str]:
    """What differs between `folder` and the recorded {name: {"bytes", "sha256"}}: sizes first (a truncated or
    missing file is found without reading it), then the checksums of the rest."""
    problems, same_size = [], []
    for name, expected in files.items():
        file = folder / name
        if file.is_symlink():  # a checkpoint holds its own files; a link may lead anywhere
            problems.append(f"{name} is a symbolic link")
        elif not file.is_file():
            problems.append(f"{name} is missing")
        elif (size := file.stat().st_size) != expected["bytes"]:
            problems.append(f"{name} has {size:,} bytes, {expected['bytes']:,} were written")
        else:
            same_size.append(name)
    for name, found in hash_files(folder, same_size).items():
        if found["sha256"] != files[name]["sha256"]:
            problems.append(f"{name} does not match its checksum (changed or damaged since it was written)")
    return problems


def verify_checkpoint(path: Path, group=None) -> bool:
    """Check every file of a checkpoint against the sizes and checksums in its COMPLETE marker, each process
    checking its share; raises CheckpointError naming what failed (in every process). Returns False for a
    checkpoint written before checksums were recorded (nothing to check it against), True once verified."""
    path = Path(path)
    marker = read_marker(path)
    files = marker.get("files")
    if files is None:
        return False
    if marker.get("checksum") != CHECKSUM:
        raise CheckpointError(f"{path}: its checksums are of another kind ({marker.get('checksum')!r}); "
                              f"this Argonne computes {CHECKSUM!r}")
    rank, world = _rank_and_world()
    mine = _file_problems(path, {name: files[name] for name in sorted(files)[rank::world]})
    problems = [problem for part in gather_objects(mine, group) for problem in part]
    if problems:
        raise CheckpointError(f"{path}: failed verification: {'; '.join(problems)}")
    unlisted = sorted({info.relative_path for info in read_checkpoint_metadata(path).storage_data.values()}
                      - set(files))
    if unlisted:
        raise CheckpointError(f"{path}: failed verification: {METADATA} refers to unverified files {unlisted}")
    return True


def check_before_use(path: Path, verify: bool = True, group=None) -> None:
    """Verify a checkpoint before anything of it is used, warning when it predates checksums."""
    if verify and not verify_checkpoint(path, group):
        warnings.warn(f"{path}: written before checkpoints recorded checksums; loaded without verification",
                      stacklevel=3)


# ------------------------------------------------------------------------------------------------ save and load


@contextmanager
def _single_process_quiet():
    """DCP warns that it "assumes a single process" whenever no process group exists; that is the intent here."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_file(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    checkpoints: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
    train_state: dict,
    is_main: bool,
    extra_files: dict[str, str] | None = None,
    tokenizer=None,
    keep: int = 0,
    run_id: str | None = None,
    group=None,
) -> Path:
    """Save on every rank; returns the final folder. `optimizer`: one, or a list (AdamW and Muon), whose states are
    saved together, keyed by parameter name. `keep` > 0 then deletes this run's (`run_id`'s) checkpoints
    older than this one beyond the newest `keep`; checkpoints of other runs are never touched. `group`: a process
    group for the checksums' host-side gathering (default: the world)."""
    final = step_dir(checkpoints, step)
    tmp = final.with_name(final.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_state, "optimizer": optimizer_state, "train": train_state}, checkpoint_id=str(tmp))
    _barrier()
    shard_sums = _hash_shards(tmp, group)
    if is_main:
        model.config.to_json_file(tmp / "config.json")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        others = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name not in shard_sums)
        files = shard_sums | hash_files(tmp, others)
        marker = {"step": step, "run_id": run_id, "checksum": CHECKSUM, "files": files}
        _write_file(tmp / COMPLETE, json.dumps(marker, indent=1))
        if final.exists() and run_id_of(final) not in (run_id, None):
            # Another run's checkpoint of this step (a run resumed from an older checkpoint): kept, out of the way.
            final.rename(final.with_name(f"{final.name}.run-{run_id_of(final)}"))
        if final.exists():  # the same step saved again (e.g. preempted right after a periodic save)
            replaced = final.with_name(final.name + ".replaced")
            shutil.rmtree(replaced, ignore_errors=True)
            final.rename(replaced)  # a crash from here leaves the previous step as the latest, never nothing
            tmp.rename(final)
            shutil.rmtree(replaced)
        else:
            tmp.rename(final)
        if keep > 0 and run_id is not None:
            prune_checkpoints(checkpoints, keep, run_id, step)
    _barrier()
    return final


def run_id_of(path: Path) -> str | None:
    try:
        return read_marker(path).get("run_id")
    except CheckpointError:
        return None


def prune_checkpoints(checkpoints: Path, keep: int, run_id: str, newest_step: int) -> list[Path]:
    """Delete run `run_id`'s checkpoints older than `newest_step`, keeping `keep` in all (`newest_step`'s included).
    Checkpoints of another run, without a run id, or newer than `newest_step` are left alone. Returns the deleted."""
    older = [path for path in complete_checkpoints(checkpoints)
             if checkpoint_step(path) < newest_step and run_id_of(path) == run_id]
    doomed = older[: max(0, len(older) - (keep - 1))]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def load_checkpoint(path: Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer], train_state: dict,
                    verify: bool = True, group=None) -> dict:
    """Load a checkpoint into an already built (and parallelized) model and optimizer (or list of optimizers, as
    saved); returns the train state.

    `train_state` gives the structure to read into (same keys as saved). `verify=False` when the caller has just
    verified the checkpoint itself."""
    path = Path(path)
    check_before_use(path, verify, group)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    # Only the optimizer's per-parameter state (step, moments) is read; its hyperparameters come from the run config
    # (the learning rate is set every step anyway), so how parameters are grouped may differ from the saving run.
    groups = optimizer_state.pop("param_groups")
    state = {"model": model_state, "optimizer": optimizer_state, "train": train_state}
    _dcp_load(state, path)
    optimizer_state["param_groups"] = groups
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optimizer_state)
    return state["train"]


def load_model_weights(path: Path, model: torch.nn.Module, verify: bool = True) -> None:
    """Only the model part of a checkpoint (for inference, export and starting weights), verified first
    (`verify=False`: the caller has just verified it, before trusting its config.json)."""
    path = Path(path)
    check_before_use(path, verify)
    state = {"model": get_model_state_dict(model, options=StateDictOptions())}
    _dcp_load(state, path)
    model.load_state_dict(state["model"])
