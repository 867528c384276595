"""The one rule for turning a device name ("auto", "cpu", "cuda", "cuda:N") into a checked torch.device, and for the
dtype that "auto" means on it.

Training (train.device), generation, chat, evaluation and serving (--device) all go through `resolve_device`, so a
device this machine does not have is one clear error everywhere, not torch's "Torch not compiled with CUDA enabled"
assertion from deep inside the first `.to(device)`.
"""

from __future__ import annotations

import torch

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """A device name torch does not know, or a device this machine does not have; the message says what to use."""


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> the GPU when CUDA is available, else the CPU; "cuda" -> GPU `local_rank` (each process of a torchrun
    node takes its own GPU by LOCAL_RANK); "cuda:N" -> GPU N; "cpu" -> the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # torch: "Expected one of cpu, cuda, ... device type at start of ..."
        raise DeviceError(f"unknown device {name!r}; use {DEVICE_NAMES}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"device {name!r} is not supported; use {DEVICE_NAMES}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch {torch.__version__}"
        raise DeviceError(f"device {name!r} asked for, but no CUDA GPU is available ({build}); "
                          f"use cpu, or auto to take a GPU only where there is one")
    index = local_rank if device.index is None else device.index
    if index >= gpus:
        which = f"GPU {index}" + (f" (LOCAL_RANK {local_rank})" if device.index is None else "")
        raise DeviceError(f"device {name!r} needs {which}, but this machine has {gpus} GPU(s) (cuda:0 to "
                          f"cuda:{gpus - 1}); under torchrun, start at most {gpus} process(es) per node")
    return torch.device("cuda", index)


DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on GPUs, float32 on CPUs (where bfloat16 matmuls are slow); or "bfloat16" / "float32".
    Training computes in it (autocast or FSDP2's mixed precision); loading for inference casts the weights to it."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise DeviceError(f"unknown dtype {name!r}; use auto, {' or '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]
