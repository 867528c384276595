"""The optimizers and the learning-rate schedule of a training run.

`optim.optimizer = "adamw"`: fused AdamW for every parameter. `"muon"`: Muon for the weight matrices of the
transformer blocks (q/k/v/o, gate/up/down) and the same fused AdamW for the rest (embeddings, the output head, norms,
biases). Both take the same learning rate and weight decay: Muon's update is scaled to AdamW's RMS (Moonlight's
0.2 * sqrt(max(rows, cols))), so one lr and one schedule serve both.

Muon is our own step rather than `torch.optim.Muon`, for three reasons. It skips a non-finite step on the device
(`found_inf`, like fused AdamW); torch's has no such input. It orthogonalises a sharded matrix whole with one
gather (see `Muon`); torch's, given DTensors, runs Newton-Schulz on DTensors, which is correct only through a
collective per matmul (11 to 16 per matrix per step, measured on 2.13) and all-reduces bfloat16 partial sums. And
its arithmetic is ours to keep the same across torch versions (2.11 on the GPU machines, 2.13 here). On plain
tensors it computes what `torch.optim.Muon(adjust_lr_fn="match_rms_adamw")` computes (tests/test_optim.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, Replicate

from .run_config import OptimSection

# Keller Jordan's quintic Newton-Schulz coefficients (also torch.optim.Muon's): the slope at zero is maximised, so
# five steps bring every singular value into roughly [0.7, 1.2], which trains as well as an exact U V^T.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def lr_at(step: int, optim: OptimSection, total_steps: int) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then the schedule's decay to min_lr at total_steps: cosine over
    all the remaining steps, or ("wsd") lr held until the last decay_fraction of the steps, then linear. A function
    of the step alone, so a resumed run, in any phase, continues the same schedule."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "wsd":
        decay_start = max(optim.warmup_steps, total_steps - round(optim.decay_fraction * total_steps))
        if step < decay_start:
            return optim.lr
        progress = (step - decay_start) / max(1, total_steps - decay_start)
        return optim.lr + (optim.min_lr - optim.lr) * min(1.0, progress)
    progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return optim.min_lr + (optim.lr - optim.min_lr) * cosine


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    """The schedule's lr for every group of every optimizer (Muon's is scaled per matrix inside its step)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


def muon_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weight matrices of the transformer blocks: every Linear's weight under model.model.layers. The head
    (tied or not) and the embeddings stay with AdamW: they map tokens, not hidden states, and Muon's authors keep
    them out."""
    return [module.weight for module in model.model.layers.modules() if isinstance(module, torch.nn.Linear)]


def build_optimizer(model: torch.nn.Module, optim: OptimSection) -> list[torch.optim.Optimizer]:
    """[fused AdamW] or, with optim.optimizer = "muon", [fused AdamW, Muon]: the training step steps each.

    AdamW decays matrices only: norms, biases and embeddings are not decayed. Its three groups — linear weights
    (decayed); the token embedding and linear biases; norms and position tables — hold the same kinds of tensors in
    every parallel layout (tensor parallelism shards the first two and replicates the third), so the fused kernel
    never mixes DTensors with plain tensors, and checkpoints resume across layouts.
    """
    to_muon = {id(p) for p in muon_matrices(model)} if optim.optimizer == "muon" else set()
    groups: list[list[torch.nn.Parameter]] = [[], [], []]
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in to_muon:
                continue
            if isinstance(module, torch.nn.Linear):
                groups[0 if name == "weight" else 1].append(param)
            elif module is model.get_input_embeddings():
                groups[1].append(param)
            else:
                groups[2].append(param)
    decays = (optim.weight_decay, 0.0, 0.0)
    # Fused on every device: one kernel per group, and an update it skips on the device (`found_inf`).
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(
        [{"params": params, "weight_decay": decay} for params, decay in zip(groups, decays) if params],
        lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=True,
    )]
    if to_muon:
        optimizers.append(Muon(muon_matrices(model), lr=optim.lr, weight_decay=optim.weight_decay,
                               momentum=optim.muon_momentum, nesterov=optim.muon_nesterov,
                               ns_steps=optim.muon_ns_steps))
    return optimizers


# ------------------------------------------------------------------------------------------------------- Muon


def ns_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU (the iteration is stable in it, and it runs at the bf16 matmul rate); float32 elsewhere,
    where CPUs without bf16 matmul units run bfloat16 some 50 times slower (9 s a step for the tiny model)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def newton_schulz(matrix: torch.Tensor, steps: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An approximately orthogonal matrix with `matrix`'s singular vectors (U S' V^T, S' near 1): the quintic
    Newton-Schulz iteration, in `dtype`. Normalised by the Frobenius norm first, so that every singular value starts
    below 1."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=NS_EPS)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def orthogonalized(update: torch.Tensor, param: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Newton-Schulz of the whole matrix whose local part `update` is (of `param`'s layout), returned as this
    process's part. A DTensor's shards (tensor parallel over "tp", FSDP2 over "dp", or both) are gathered into the
    whole matrix and every process orthogonalises it (the same arithmetic everywhere, so the same result), then
    keeps its own part: orthogonalising a shard alone would be another, wrong, update."""
    if not isinstance(param, DTensor):
        return newton_schulz(update, steps, dtype)
    mesh, placements = param.device_mesh, param.placements
    # Gathered in Newton-Schulz's dtype (its first step casts anyway): bfloat16 on GPUs halves the traffic.
    whole = DTensor.from_local(update.to(dtype), mesh, placements, shape=param.shape,
                               stride=param.stride()).full_tensor()
    replicated = DTensor.from_local(newton_schulz(whole, steps, dtype), mesh, [Replicate()] * mesh.ndim,
                                    run_check=False)
    return replicated.redistribute(mesh, placements).to_local()  # a local slice: no communication


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan, 2024; scaled as Moonlight, 2025) for 2-D weight matrices:

        B <- momentum * B + (1 - momentum) * G          (the momentum buffer, an EMA of the gradient)
        U <- (1 - momentum) * G + momentum * B          (nesterov; else U = B)
        W <- W * (1 - lr * weight_decay) - lr * 0.2 * sqrt(max(rows, cols)) * NewtonSchulz(U)

    The momentum buffer has the parameter's layout (sharded like it, resharded by checkpoints like AdamW's moments);
    only the Newton-Schulz input is gathered whole (see `orthogonalized`). `found_inf` (a device tensor, 1.0 when
    the step must be skipped), as fused AdamW reads it: the step then changes neither weights nor momentum, and
    nothing is read back to the host. `ns_dtype`: Newton-Schulz's dtype (default: `ns_dtype` of the device).
    """

    def __init__(self, params, lr: float, weight_decay: float, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_dtype: torch.dtype | None = None):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "nesterov": nesterov, "ns_steps": ns_steps})
        self.ns_dtype = ns_dtype  # not a group setting: it belongs to the device, not to the checkpoint
        for group in self.param_groups:
            for param in group["params"]:
                if param.ndim != 2:
                    raise ValueError(f"Muon takes matrices; got a parameter of shape {tuple(param.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    keep = torch.ones((), dtype=torch.bool, device=param.device) if found_inf is None \
                        else found_inf.to(param.device) == 0
                    self._update(param, group, keep)
        return None

    def _update(self, param: torch.Tensor, group: dict, keep: torch.Tensor) -> None:
        lr, momentum = group["lr"], group["momentum"]
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        weight, grad, buffer = _local(param), _local(param.grad), _local(state["momentum_buffer"])
        new_buffer = buffer.lerp(grad, 1 - momentum)
        update = grad.lerp(new_buffer, momentum) if group["nesterov"] else new_buffer
        buffer.copy_(torch.where(keep, new_buffer, buffer))
        # A skipped step orthogonalises zeros (exactly zero: the norm is clamped), never a NaN.
        dtype = self.ns_dtype or ns_dtype(weight.device)
        update = orthogonalized(torch.where(keep, update, 0.0), param, group["ns_steps"], dtype)
        weight.mul_(torch.where(keep, 1 - lr * group["weight_decay"], 1.0))
        weight.add_(update.to(weight.dtype), alpha=-lr * 0.2 * math.sqrt(max(param.shape)))


def checkpoint_optimizer(path: Path) -> str:
    """The optimizer whose state a training checkpoint holds: "muon" when it has momentum buffers, else "adamw"
    (from DCP's metadata, read by the restricted unpickler)."""
    from .checkpoint import read_checkpoint_metadata

    keys = read_checkpoint_metadata(path).state_dict_metadata
    return "muon" if any(k.startswith("optimizer.state.") and k.endswith(".momentum_buffer") for k in keys) \
        else "adamw"


def check_resumable(path: Path, optim: OptimSection) -> None:
    """Refuse to resume a checkpoint whose optimizer state is another optimizer's: AdamW's moments are no Muon
    momentum (nor the reverse), and training on with a zeroed state for half the weights would be a silent change
    of recipe."""
    from .checkpoint import CheckpointError

    saved = checkpoint_optimizer(path)
    if saved != optim.optimizer:
        raise CheckpointError(
            f"{path}: its optimizer state is {saved}'s (written with optim.optimizer = {saved!r}) and this run has "
            f"optim.optimizer = {optim.optimizer!r}: the state does not carry over. Resume with "
            f"--optim.optimizer={saved}, or start a new run from its weights with model.init_from"
        )
