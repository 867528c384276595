"""Sharded, atomic training checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a folder `CHECKPOINTS/step-NNNNNNNN/` holding:
  - the DCP shards of {"model", "optimizer", "train"} (every rank writes its own shards),
  - `config.json` (the model config), `run_config.json`, the tokenizer files, and
  - `COMPLETE`, written last.
It is written to `step-NNNNNNNN.tmp/` and renamed only after every rank finished and `COMPLETE` exists, so a crash
mid-write leaves the previous checkpoint as the latest and the partial folder is never picked. DCP reshards on load:
a checkpoint saved with one parallel layout loads into any other.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step-{step:08d}"


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(checkpoints: Path) -> Path | None:
    found = complete_checkpoints(checkpoints)
    return found[-1] if found else None


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


def save_checkpoint(
    checkpoints: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict,
    is_main: bool,
    extra_files: dict[str, str] | None = None,
    tokenizer=None,
    keep: int = 0,
) -> Path:
    """Save on every rank; returns the final folder. `keep` > 0 prunes all but the newest `keep` afterwards."""
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
    if is_main:
        model.config.to_json_file(tmp / "config.json")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE).write_text(json.dumps({"step": step}))
        if final.exists():  # the same step saved again (e.g. preempted right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
        if keep > 0:
            for old in complete_checkpoints(checkpoints)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_state: dict) -> dict:
    """Load a checkpoint into an already built (and parallelized) model and optimizer; returns the train state.

    `train_state` gives the structure to read into (same keys as saved)."""
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    # Only the optimizer's per-parameter state (step, moments) is read; its hyperparameters come from the run config
    # (the learning rate is set every step anyway), so how parameters are grouped may differ from the saving run.
    groups = optimizer_state.pop("param_groups")
    state = {"model": model_state, "optimizer": optimizer_state, "train": train_state}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
    optimizer_state["param_groups"] = groups
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optimizer_state)
    return state["train"]


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Only the model part of a checkpoint (for inference and export), into a single-process model."""
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    state = {"model": get_model_state_dict(model, options=StateDictOptions())}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
