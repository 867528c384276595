"""Parallelism applied to a built model from outside, in torchtitan's fixed order:
tensor parallel -> activation checkpointing -> torch.compile -> FSDP2.

The device mesh has two dimensions, ("dp", "tp"). Tensor parallelism shards each block as the original Argonne code
did — q/k/v and gate/up column-wise, o and down row-wise — through DTensor's `parallelize_module`, and splits the
vocabulary: the token embedding and the output head by rows, with a vocabulary-parallel loss (VocabParallelHead).
Norms (and learned position embeddings) stay replicated over "tp": they see identical activations on every
tensor-parallel rank, so their gradients are identical there; QK-norm's see each rank's own heads, so theirs are
summed over "tp" (HeadShardedRMSNorm). FSDP2 (`fully_shard`) shards every parameter over
"dp", per block and then the root, with bf16 compute and fp32 gradient reduction on GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from .config import ACTIVATION_CHECKPOINTING
from .loss_argonne import LOSS_CHUNK_LOGITS, cross_entropy_chunk, linear_cross_entropy
from .modeling_argonne import ArgonneForCausalLM, GeluMLP, RMSNorm, SwiGLUMLP, rms_norm


@dataclass
class Topology:
    """Where this process sits: global rank and world, the local GPU index, and the mesh (None in one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mesh: DeviceMesh | None = None
    dp: int = 1
    tp: int = 1
    host_group: dist.ProcessGroup | None = None
    """A gloo group over all processes for host-side flags (preemption): agreeing on them never waits for a GPU."""

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(tensor_parallel: int, device: torch.device) -> Topology:
    """Join the process group that torchrun set up (or stay single-process) and build the ("dp", "tp") mesh.

    The GPU is chosen by LOCAL_RANK, never by the global rank (which exceeds the GPU count on a second node).
    """
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        if tensor_parallel != 1:
            raise ValueError(f"parallel.tensor_parallel={tensor_parallel} needs that many processes (use torchrun)")
        return Topology()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world % tensor_parallel:
        raise ValueError(f"parallel.tensor_parallel ({tensor_parallel}) must divide the world size ({world})")
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    dp = world // tensor_parallel
    mesh = init_device_mesh(device.type, (dp, tensor_parallel), mesh_dim_names=("dp", "tp"))
    host_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return Topology(rank, world, local_rank, mesh, dp, tensor_parallel, host_group)


def any_process(flag: bool, topology: Topology) -> bool:
    """True when `flag` is set in any process; a host-side collective (gloo), no GPU synchronisation."""
    if topology.world == 1:
        return flag
    tensor = torch.tensor([int(flag)])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=topology.host_group)
    return bool(tensor.item())


def from_main_process(value, topology: Topology):
    """`value` as the main process has it, in every process (a host-side broadcast over gloo)."""
    if topology.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=topology.host_group)
    return box[0]


def check_tensor_parallel(model: ArgonneForCausalLM, tp: int) -> None:
    config, problems = model.config, []
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(config, name) % tp:
            problems.append(f"tensor_parallel ({tp}) must divide {name} ({getattr(config, name)})")
    if problems:
        raise ValueError("; ".join(problems))


def apply_tensor_parallel(model: ArgonneForCausalLM, tp_mesh: DeviceMesh) -> None:
    check_tensor_parallel(model, tp_mesh.size())
    # The vocabulary is split over "tp" by rows: the token embedding (one all-reduce of its output) and the head
    # matrix (the tied embedding or lm_head), which the vocabulary-parallel head below uses slice by slice.
    parallelize_module(model.model, tp_mesh, {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    })
    if not model.config.tie_word_embeddings:
        parallelize_module(model, tp_mesh, {"lm_head": ColwiseParallel()})
    model.output_head = VocabParallelHead(tp_mesh)
    for block in model.model.layers:
        plan = {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        }
        if block.self_attn.q_norm is not None:
            for norm in (block.self_attn.q_norm, block.self_attn.k_norm):
                norm.__class__, norm.tp_group = HeadShardedRMSNorm, tp_mesh.get_group()
        if isinstance(block.mlp, SwiGLUMLP):
            plan["mlp.gate_proj"] = ColwiseParallel()
        else:
            assert isinstance(block.mlp, GeluMLP)
        parallelize_module(block, tp_mesh, plan)


class HeadShardedRMSNorm(RMSNorm):
    """QK-norm under tensor parallelism: its weight is replicated (a plain tensor, like the other norms), but each
    rank normalises only its own heads, so each rank's gradient is its heads' share: summed over "tp" in the
    backward. The state dict is unchanged."""

    tp_group: dist.ProcessGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, _SumGradient.apply(self.weight, self.tp_group), self.eps)


class _SumGradient(torch.autograd.Function):
    """The identity, whose backward sums the gradient over `group` (functional collective: torch.compile traces
    it)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from torch.distributed import _functional_collectives as funcol

        summed = funcol.all_reduce(grad.contiguous(), "sum", ctx.group)
        return funcol.wait_tensor(summed), None  # a plain tensor for the optimizer, not a pending collective


# Selective checkpointing keeps the outputs of matmuls, attention and tensor-parallel all-reduces (so the recompute
# never communicates) and recomputes every other op of a block (norms, RoPE, SiLU, products, casts: memory-bound and
# cheap) in the backward pass.
_SAVED_ATEN_OPS = (
    "mm", "addmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
)


def _selective_checkpoint_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = {getattr(torch.ops.aten, name).default for name in _SAVED_ATEN_OPS if hasattr(torch.ops.aten, name)}
    saved.add(torch.ops._c10d_functional.all_reduce.default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class VocabParallelHead(nn.Module):
    """The model's OutputHead for a head matrix sharded by vocabulary rows over the tensor-parallel group.

    Each process multiplies by its own slice of the vocabulary only (a replicated head would cost every process the
    whole 6 x hidden x vocab FLOPs per token). Logits are gathered whole for generation, evaluation and
    distillation; the training loss never gathers them: per chunk of tokens, the slices' row maxima are combined
    with one [tokens] all-reduce, their sums of exponentials and target logits with one [2, tokens] all-reduce, and
    the hidden-state gradient is summed over the slices once per step.
    """

    def __init__(self, tp_mesh: DeviceMesh):
        super().__init__()
        self.tp_mesh = tp_mesh

    def forward(self, hidden: torch.Tensor, weight: DTensor, targets: torch.Tensor | None = None,
                z_loss: float | None = None):
        local = weight.to_local()  # (rows of this slice, D); the gradient flows back into the sharded parameter
        if targets is None:
            logits = F.linear(hidden, local)
            shape = (*logits.shape[:-1], weight.shape[0])
            stride = tuple(torch.empty(shape, device="meta").stride())
            return DTensor.from_local(logits, self.tp_mesh, [Shard(logits.dim() - 1)], shape=shape,
                                      stride=stride).full_tensor()
        group = self.tp_mesh.get_group()
        all_sum = partial(_all_reduce, op=dist.ReduceOp.SUM, group=group)
        # Shard(0) splits rows as torch.chunk does: ceil(V / tp) rows per process, the last ones fewer.
        start = -(-weight.shape[0] // self.tp_mesh.size()) * self.tp_mesh.get_local_rank()
        slice_loss = partial(cross_entropy_chunk, vocab_start=start, reduce_sum=all_sum,
                             reduce_max=partial(_all_reduce, op=dist.ReduceOp.MAX, group=group))
        return linear_cross_entropy(
            hidden, local, targets, chunk_logits=LOSS_CHUNK_LOGITS,  # the eager chunk size: float32 copies
            chunk_loss=slice_loss, sum_over_slices=all_sum, z_loss=z_loss,
        )


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def apply_activation_checkpointing(model: ArgonneForCausalLM, mode: str = "full") -> None:
    """Recompute block activations in the backward pass instead of keeping them.

    "full" keeps only each block's input and recomputes the whole block (about 1/3 more compute); "selective" keeps
    the matmul and attention outputs and recomputes only the element-wise ops (little extra compute, more memory).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation checkpointing must be one of {ACTIVATION_CHECKPOINTING}, got {mode!r}")
    if mode == "none":
        return
    extra = {"context_fn": _selective_checkpoint_context} if mode == "selective" else {}
    layers = model.model.layers
    for index, block in enumerate(layers):
        layers[index] = checkpoint_wrapper(block, preserve_rng_state=False, **extra)


def apply_compile(model: ArgonneForCausalLM) -> None:
    """torch.compile each block (all blocks share one compiled graph); the head and loss stay eager."""
    for block in model.model.layers:
        block.compile(fullgraph=True)


def apply_fsdp(model: ArgonneForCausalLM, dp_mesh: DeviceMesh, param_dtype: torch.dtype | None) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = model.model.layers
    for index, block in enumerate(layers):
        # The last block's parameters are needed again right away by the backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=index < len(layers) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def parallelize(
    model: ArgonneForCausalLM,
    topology: Topology,
    activation_checkpointing: str,
    compile: bool,
    param_dtype: torch.dtype | None,
) -> ArgonneForCausalLM:
    if topology.tp > 1:
        apply_tensor_parallel(model, topology.mesh["tp"])
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model)
    if topology.mesh is not None and topology.dp > 1:
        apply_fsdp(model, topology.mesh["dp"], param_dtype)
    return model


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Global gradient norm over every shard (DTensor-sharded, FSDP-sharded or replicated), clipped to max_norm.

    Gradients are grouped by device mesh, since a norm over DTensors of different meshes (and plain tensors) cannot
    be taken in one call; each group's norm is made whole (`full_tensor`) and the groups are combined.
    """
    groups: dict = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grads in groups.values():
            local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
            torch._foreach_mul_(local, scale.to(local[0].device))
    return total
