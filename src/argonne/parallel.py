"""Parallelism applied to a built model from outside, in torchtitan's fixed order:
FP8 linears -> tensor parallel -> activation checkpointing -> torch.compile -> FSDP2.

The device mesh has two dimensions, ("dp", "tp"). Tensor parallelism shards each block as the original Argonne code
did — q/k/v and gate/up column-wise, o and down row-wise — through DTensor's `parallelize_module`, and splits the
vocabulary: the token embedding and the output head by rows, with a vocabulary-parallel loss (VocabParallelHead).
Norms (and learned position embeddings) keep replicated weights over "tp"; QK-norm's see each rank's own heads, so
their gradients are summed over "tp" (HeadShardedRMSNorm). With sequence parallelism (apply_sequence_parallel, on by
default) the residual stream between the tensor-parallel regions is sharded along the sequence: each rank norms only
its share of the tokens, so those norms' gradients are summed over "tp" too (SequenceShardedRMSNorm). Async TP
(enable_async_tensor_parallel) lets inductor overlap those collectives with the matmuls. FSDP2 (`fully_shard`) shards
every parameter over "dp", per block and then the root, with bf16 compute and fp32 gradient reduction on GPUs. FP8
(torchao's float8 training) swaps the blocks' linears first, so that tensor parallel, compile and FSDP2 all see the
FP8 modules; torchao takes its scales over a whole DTensor, so the plain parallel styles keep one process's scaling.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from .run_config import ActivationCheckpointing, Float8Recipe
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


def apply_tensor_parallel(model: ArgonneForCausalLM, tp_mesh: DeviceMesh, sequence_parallel: bool = True) -> None:
    check_tensor_parallel(model, tp_mesh.size())
    sharding = SequenceSharding(tp_mesh.size()) if sequence_parallel else None
    # Row-parallel outputs are partial sums over "tp": all-reduced (Replicate), or reduce-scattered along the
    # sequence when the forward is sequence-sharded (SequenceShardedOutput).
    rowwise = partial(SequenceShardedOutput, sharding) if sharding else RowwiseParallel
    # The vocabulary is split over "tp" by rows: the token embedding (one all-reduce or reduce-scatter of its output)
    # and the head matrix (the tied embedding or lm_head), which the vocabulary-parallel head below uses slice by slice.
    parallelize_module(model.model, tp_mesh, {"embed_tokens": rowwise(input_layouts=Replicate())})
    if not model.config.tie_word_embeddings:
        parallelize_module(model, tp_mesh, {"lm_head": ColwiseParallel()})
    model.output_head = VocabParallelHead(tp_mesh)
    for block in model.model.layers:
        plan = {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": rowwise(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": rowwise(),
        }
        if block.self_attn.q_norm is not None:
            for norm in (block.self_attn.q_norm, block.self_attn.k_norm):
                norm.__class__, norm.tp_group = HeadShardedRMSNorm, tp_mesh.get_group()
        if isinstance(block.mlp, SwiGLUMLP):
            plan["mlp.gate_proj"] = ColwiseParallel()
        else:
            assert isinstance(block.mlp, GeluMLP)
        parallelize_module(block, tp_mesh, plan)
    if sharding:
        apply_sequence_parallel(model, tp_mesh, sharding)


# ------------------------------------------------------------------------------------------ sequence parallel


class SequenceSharding:
    """Whether the current forward runs sequence-sharded: set by a hook at the start of every decoder forward, read
    by the hooks and norms inside it. Only a sequence that divides by tp is sharded; other forwards (decoding one
    token with a KV cache, evaluation batches of any length, inputs_embeds) run as plain tensor parallel, with the
    same weights. A block's recompute (activation checkpointing) reads the flag its own forward set: every
    backward runs before the next forward of the model."""

    def __init__(self, tp: int):
        self.tp = tp
        self.active = False

    def decide(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds", args[4] if len(args) > 4 else None)
        self.active = input_ids is not None and embeds is None and input_ids.shape[1] % self.tp == 0


class SequenceShardedOutput(RowwiseParallel):
    """RowwiseParallel whose partial output is reduce-scattered along the sequence (Shard(1)) in a sequence-sharded
    forward: the same bytes as the all-reduce's reduce-scatter half, and no all-gather (the next region gathers);
    all-reduced (Replicate) otherwise."""

    def __init__(self, sharding: SequenceSharding, **kwargs):
        super().__init__(**kwargs)
        self.sharding = sharding

    def _prepare_output_fn(self, output_layouts, use_local_output, mod, outputs, device_mesh):
        layouts = (Shard(1),) if self.sharding.active else output_layouts
        return RowwiseParallel._prepare_output_fn(layouts, use_local_output, mod, outputs, device_mesh)


def apply_sequence_parallel(model: ArgonneForCausalLM, tp_mesh: DeviceMesh, sharding: SequenceSharding) -> None:
    """Between the tensor-parallel regions (the residual stream, the norms) each rank keeps 1/tp of the tokens:
    attention's and the MLP's input is all-gathered along the sequence (its gradient reduce-scattered), o_proj and
    down_proj reduce-scatter (SequenceShardedOutput), and the final hidden states are gathered whole for the
    vocabulary-parallel head (whose hidden-state gradient is already summed over the slices). Weights, and so the
    state dict, are those of plain tensor parallel."""
    decoder = model.model
    decoder.register_forward_pre_hook(sharding.decide, with_kwargs=True)
    gather = partial(_gather_sequence_input, sharding, tp_mesh)
    for block in decoder.layers:
        block.self_attn.register_forward_pre_hook(gather)
        block.mlp.register_forward_pre_hook(gather)
    for norm in _residual_norms(decoder):
        norm.__class__ = SEQUENCE_SHARDED_NORMS[type(norm)]
        norm.sharding, norm.tp_group = sharding, tp_mesh.get_group()
    if hasattr(decoder, "embed_positions"):  # learned positions: each rank adds its own tokens' rows
        decoder.embed_positions.register_forward_hook(partial(_sequence_shard_output, sharding, tp_mesh))
    decoder.register_forward_hook(partial(_gather_sequence_output, sharding, tp_mesh))


def _residual_norms(decoder) -> list[nn.Module]:
    return [decoder.norm, *(norm for block in decoder.layers
                            for norm in (block.input_layernorm, block.post_attention_layernorm))]


def _gather_sequence_input(sharding: SequenceSharding, mesh: DeviceMesh, module, args):
    """Attention's or the MLP's input (B, T / tp, D) -> a Replicate DTensor (B, T, D): the column-parallel
    projections' partial input gradients are then reduce-scattered back to the sequence shards."""
    if not sharding.active:
        return None
    x, *rest = args
    if torch.is_autocast_enabled(x.device.type):  # gather what the matmuls read: bf16, not the float32 residual stream
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return (DTensor.from_local(x, mesh, [Shard(1)], run_check=False).redistribute(mesh, [Replicate()]), *rest)


def _sequence_shard_output(sharding: SequenceSharding, mesh: DeviceMesh, module, args, output):
    """A replicated output (B, T, D) -> this rank's sequence shard; its gradient is all-gathered, so the replicated
    weight's gradient is whole (and identical) on every rank."""
    if not sharding.active:
        return None
    return DTensor.from_local(output, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()


def _gather_sequence_output(sharding: SequenceSharding, mesh: DeviceMesh, module, args, output):
    """The final hidden states' shard -> (B, T, D) whole; the backward keeps this rank's rows of the gradient,
    which the vocabulary-parallel head has already summed over its slices (on both of its paths)."""
    if not sharding.active:
        return None
    return DTensor.from_local(output, mesh, [Shard(1)], run_check=False).full_tensor()


class SequenceShardedRMSNorm(RMSNorm):
    """A residual-stream RMSNorm under sequence parallelism: its weight is replicated (a plain tensor), and in a
    sequence-sharded forward each rank norms its own tokens, so the gradient is summed over "tp". The state dict
    is unchanged."""

    sharding: SequenceSharding
    tp_group: dist.ProcessGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, _summed_if_sharded(self.weight, self), self.eps)


class SequenceShardedLayerNorm(nn.LayerNorm):
    """SequenceShardedRMSNorm's LayerNorm (weight and bias)."""

    sharding: SequenceSharding
    tp_group: dist.ProcessGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, _summed_if_sharded(self.weight, self),
                            _summed_if_sharded(self.bias, self), self.eps)


def _summed_if_sharded(weight: torch.Tensor | None, norm) -> torch.Tensor | None:
    if weight is None or not norm.sharding.active:
        return weight
    return _SumGradient.apply(weight, norm.tp_group)


SEQUENCE_SHARDED_NORMS = {RMSNorm: SequenceShardedRMSNorm, nn.LayerNorm: SequenceShardedLayerNorm}


# ---------------------------------------------------------------------------------------------- async TP


def check_async_tensor_parallel(device_type: str) -> None:
    """Async TP (inductor's micro-pipelined collective matmuls) runs on symmetric memory: CUDA only."""
    if device_type != "cuda":
        raise ValueError(f"parallel.async_tp needs CUDA devices (symmetric memory), not {device_type!r}: set "
                         f"parallel.async_tp = false")


def enable_async_tensor_parallel(tp_mesh: DeviceMesh) -> None:
    """Let inductor split each all-gather -> matmul and matmul -> reduce-scatter of the compiled blocks into
    pieces that overlap communication with compute (torchtitan's async TP), over symmetric memory of the TP group."""
    check_async_tensor_parallel(tp_mesh.device_type)
    import torch._inductor.config
    from torch.distributed import _symmetric_memory

    torch._inductor.config._micro_pipeline_tp = True
    enable = getattr(_symmetric_memory, "enable_symm_mem_for_group", None)
    if enable is not None:  # torch 2.11 to 2.13 need it; a later torch may enable symmetric memory on first use
        enable(tp_mesh.get_group().group_name)


@dataclass(frozen=True)
class Float8Plan:
    """Which FP8 recipe the blocks' linears train with (parallel.float8), which stay in high precision
    (parallel.float8_skip) and whether the matmuls are emulated (any device without FP8 tensor cores: the CPU)."""

    recipe: Float8Recipe = "off"
    skip: tuple[str, ...] = field(default_factory=tuple)
    emulate: bool = False

    @classmethod
    def for_device(cls, recipe: Float8Recipe, skip, device: torch.device, dtype: torch.dtype | None) -> "Float8Plan":
        """`recipe` and `skip` as the run config checked them; what the device needs is checked here."""
        if recipe != "off" and device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
            if capability < (8, 9):
                raise ValueError(
                    f"parallel.float8={recipe!r} needs FP8 tensor cores (compute capability 8.9+: H100, H200, L40S); "
                    f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: set parallel.float8 "
                    "to \"off\"")
            if dtype != torch.bfloat16:
                raise ValueError(f"parallel.float8={recipe!r} computes in bf16: set train.dtype to \"auto\" or "
                                 "\"bfloat16\"")
        return cls(recipe, tuple(skip), emulate=device.type != "cuda")


def import_torchao_float8():
    """torchao.float8 (the package's import silences torchao's notes about kernels float8 training does not use)."""
    try:
        import torchao.float8
    except ImportError as error:
        raise ValueError("parallel.float8 needs torchao: pip install 'argonne[float8]' (or torchao)") from error
    return torchao.float8


# torch._scaled_mm multiplies FP8 matrices only when both dimensions of the (local) weight divide by 16.
FLOAT8_DIVISOR = 16


def apply_float8(model: ArgonneForCausalLM, plan: Float8Plan, tp: int = 1, dp: int = 1) -> list[str]:
    """Swap the blocks' nn.Linear modules for torchao's Float8Linear (dynamic scaling: the same weight parameters,
    so the state dict, the optimizer and checkpoints are unchanged); returns the names of the linears kept in high
    precision (plan.skip, and those whose local shard under tensor parallel does not divide by 16).

    The output head is never converted: the chunked loss multiplies by its weight slice by slice (no nn.Linear
    call), and FP8 recipes keep the last projection into the vocabulary in high precision (as torchtitan does).
    Under FSDP2, "tensorwise" all-gathers the weights in FP8 (torchao's weight wrapper casts before the gather).
    """
    float8 = import_torchao_float8()
    layers = len(model.model.layers)
    patterns = [{"first": "model.layers.0.*", "last": f"model.layers.{layers - 1}.*"}.get(p, p) for p in plan.skip]
    linears = {name: module for name, module in model.named_modules()
               if name.startswith("model.layers.") and isinstance(module, nn.Linear)}
    unmatched = [given for given, pattern in zip(plan.skip, patterns)
                 if not any(name == pattern or fnmatchcase(name, pattern) for name in linears)]
    if unmatched:
        raise ValueError(f"parallel.float8_skip: {unmatched} match no linear of the blocks (names look like "
                         f"{next(iter(linears))!r}; \"first\" and \"last\" name the first and last blocks)")

    def local_shape(name: str, linear: nn.Linear) -> tuple[int, int]:
        row_parallel = name.endswith(("o_proj", "down_proj"))  # split along their input under tensor parallel
        return linear.out_features // (1 if row_parallel else tp), linear.in_features // (tp if row_parallel else 1)

    kept = sorted(name for name, linear in linears.items()
                  if any(name == p or fnmatchcase(name, p) for p in patterns)
                  or any(size % FLOAT8_DIVISOR for size in local_shape(name, linear)))
    residual = [name for name, linear in linears.items() if getattr(linear, "writes_residual", False)]
    config = replace(float8.Float8LinearConfig.from_recipe_name(plan.recipe), emulate=plan.emulate,
                     enable_fsdp_float8_all_gather=plan.recipe == "tensorwise" and dp > 1)
    float8.convert_to_float8_training(model, config=config,
                                      module_filter_fn=lambda module, name: name in linears and name not in kept)
    for name in residual:  # Float8Linear is a new module: keep the mark that init_module reads (meta init)
        model.get_submodule(name).writes_residual = True
    return kept


def describe_float8(model: nn.Module, recipe: str, emulated: bool) -> str:
    """One line for the run's start: the recipe, and which of the blocks' linears compute in FP8."""
    Float8Linear = import_torchao_float8().float8_linear.Float8Linear
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and ".layers." in name]
    high = [name.replace("._checkpoint_wrapped_module", "") for name in names
            if not isinstance(model.get_submodule(name), Float8Linear)]
    return (f"float8 {recipe}{' (emulated: no FP8 matmuls on this device)' if emulated else ''}: "
            f"{len(names) - len(high)} of {len(names)} block linears in FP8"
            + (f"; high precision: {', '.join(high)}" if high else "") + "; the output head in high precision")


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


# Selective checkpointing keeps the outputs of matmuls (FP8 ones too), attention and tensor-parallel collectives
# (plain TP's all-reduces, sequence parallel's all-gathers and reduce-scatters: the recompute never communicates; the
# waits on kept outputs it reruns wait for nothing) and recomputes every other op of a block (norms, RoPE, SiLU,
# products, casts: memory-bound and cheap) in the backward pass.
_SAVED_ATEN_OPS = (
    "mm", "addmm", "_scaled_mm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
)

_SAVED_COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor")


def _selective_checkpoint_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = {getattr(torch.ops.aten, name).default for name in _SAVED_ATEN_OPS if hasattr(torch.ops.aten, name)}
    saved.update(getattr(torch.ops._c10d_functional, name).default for name in _SAVED_COLLECTIVES)

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
            if hidden.requires_grad:  # a loss on the logits (distillation): each slice gives part of hidden's gradient
                hidden = _SumGradient.apply(hidden, self.tp_mesh.get_group())
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


def apply_activation_checkpointing(model: ArgonneForCausalLM, mode: ActivationCheckpointing = "full") -> None:
    """Recompute block activations in the backward pass instead of keeping them.

    "full" keeps only each block's input and recomputes the whole block (about 1/3 more compute); "selective" keeps
    the matmul and attention outputs and recomputes only the element-wise ops (little extra compute, more memory).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

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
    activation_checkpointing: ActivationCheckpointing,
    compile: bool,
    param_dtype: torch.dtype | None,
    float8: Float8Plan = Float8Plan(),
    sequence_parallel: bool = True,
    async_tp: bool = False,
) -> ArgonneForCausalLM:
    """`sequence_parallel` and `async_tp` act only with tensor parallelism (async TP: compiled, sequence-parallel
    blocks on CUDA; the run config checks the rest)."""
    if float8.recipe != "off":
        apply_float8(model, float8, topology.tp, topology.dp)
    if topology.tp > 1:
        apply_tensor_parallel(model, topology.mesh["tp"], sequence_parallel)
        if async_tp:
            enable_async_tensor_parallel(topology.mesh["tp"])
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
