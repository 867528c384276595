"""Triton matrix-vector kernels for decoding one token at a time on GPUs, applied to a model as a plan.

At batch 1 every matmul of a decoding step multiplies a weight matrix by one vector (a GEMV): its time is the time
to read the matrix, yet on an H200 cuBLAS took 3.6-5.4 us for each of the 0.5B model's 168 per-token GEMVs (matrices
of 0.2-8.7 MB: launch and ramp-up, not bandwidth), and every GEMV sat between small element-wise kernels (norms,
residual adds, SwiGLU) that cost as much again in launches and gaps: 15 kernels per layer.

`gemv` does one matmul of one row and what surrounds it in a block, in one kernel: optionally the RMSNorm of its
input first (each program recomputes the row's norm: K values, nothing next to the matrix), the bias, then SwiGLU's
silu(gate) * up of a merged gate/up matrix, or RoPE on the q and k heads of a merged q/k/v matrix, or the residual
add. Every intermediate is rounded to the model's dtype where the unfused model rounds it, so the results match the
cuBLAS path up to summation order. Each program reads BLOCK_N whole rows of the (N, K) matrix (K in BLOCK_K steps;
rows in pairs for SwiGLU and RoPE) against the vector and accumulates in float32; the tiling is timed per shape on
first use (triton.autotune).

`use_gemv_kernels(model)` is the plan: merged q/k/v and gate/up (`merge_projections`), and for a one-row input each
RMSNorm + SwiGLU block runs as four GEMV kernels, the cache write and SDPA (6 kernels per layer instead of 15);
other architectures get the plain GEMV for their linears. Inputs of more rows (prefill, batches) keep cuBLAS.
`gemv` is a `torch.library.triton_op`, so torch.compile sees through it and the kernels are captured in the decode
step's CUDA graph like any other. On CPUs the kernels run under Triton's interpreter (TRITON_INTERPRET=1, float32),
which is how the tests check them without a GPU.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import nn
from torch.library import triton_op, wrap_triton

from .modeling_argonne import ArgonneForCausalLM, Block, MergedLinear, OutputHead, RMSNorm, SwiGLUMLP

# Candidate tilings (rows per program, columns per load, warps), timed per (N, K) on first use by triton.autotune.
# Whole rows of up to 1,024 columns per load keep several 16-byte loads per thread in flight; few rows per program
# keep ~200 programs even for N = 896; 2,048 columns per load halve the steps along long rows (down_proj's 4,864).
# Triton's interpreter (CPUs) cannot time kernels: it gets the first only.
GEMV_TILINGS = [(4, 1024, 4), (8, 1024, 8), (2, 1024, 4), (4, 512, 4), (16, 512, 8), (8, 256, 4), (2, 2048, 8),
                (1, 2048, 4)]
_CONFIGS = [triton.Config({"BLOCK_N": rows, "BLOCK_K": columns}, num_warps=warps)
            for rows, columns, warps in GEMV_TILINGS[: None if torch.cuda.is_available() else 1]]


@triton.autotune(configs=_CONFIGS, key=["N", "K", "SWIGLU", "HAS_NORM", "HEAD_DIM"])
@triton.jit
def _gemv_kernel(x_ptr, weight_ptr, bias_ptr, norm_ptr, residual_ptr, cos_ptr, sin_ptr, out_ptr, N, K, eps,
                 rotated_rows, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, HAS_NORM: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The program's BLOCK_N outputs of norm(x) . weight[row] (+ bias) (+ residual). Two modes read rows in pairs:
    SWIGLU (weight = cat(W_gate, W_up), N outputs silu(gate[n]) * up[n]) and RoPE (HEAD_DIM > 0: output rows i and
    i + HEAD_DIM / 2 of each head, rotated by cos/sin where the row is below `rotated_rows`, i.e. in a q or k head;
    N counts the pairs)."""
    dtype = out_ptr.dtype.element_ty
    index = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = index < N
    if HEAD_DIM > 0:  # pair i of a head: rows i and i + HEAD_DIM / 2
        rows = (index // (HEAD_DIM // 2)) * HEAD_DIM + index % (HEAD_DIM // 2)
        second_rows = rows + HEAD_DIM // 2
    else:
        rows = index
        second_rows = index + N  # SWIGLU's up row
    row_start = rows.to(tl.int64)[:, None] * K
    second_start = second_rows.to(tl.int64)[:, None] * K
    columns = tl.arange(0, BLOCK_K)
    if HAS_NORM:  # RMSNorm's 1 / rms of the row, in float32 as RMSNorm computes it
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            part = tl.load(x_ptr + k_start + columns, mask=k_start + columns < K, other=0.0).to(tl.float32)
            squares += part * part
        inverse_rms = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_second = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k = k_start + columns
        k_ok = k < K
        # (names in this loop are new to it: Triton would carry a name defined before the loop across iterations)
        vector = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        if HAS_NORM:  # weight * (x / rms), rounded as RMSNorm rounds: after the division and after the weight
            scale = tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            vector = (scale * (vector * inverse_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        mask = row_ok[:, None] & k_ok[None, :]
        acc += tl.load(weight_ptr + row_start + k[None, :], mask=mask, other=0.0).to(tl.float32) * vector[None, :]
        if SWIGLU or HEAD_DIM > 0:  # the second row of each pair
            second = tl.load(weight_ptr + second_start + k[None, :], mask=mask, other=0.0)
            acc_second += second.to(tl.float32) * vector[None, :]
    # Each matmul output is rounded to the model's dtype, as the unfused model's matmul returns it.
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    y = y.to(dtype).to(tl.float32)
    if SWIGLU or HEAD_DIM > 0:
        y_second = tl.sum(acc_second, axis=1)
        if HAS_BIAS:
            y_second += tl.load(bias_ptr + second_rows, mask=row_ok, other=0.0).to(tl.float32)
        y_second = y_second.to(dtype).to(tl.float32)
    if SWIGLU:  # silu(gate) * up, silu rounded as F.silu returns it
        y = (y * tl.sigmoid(y)).to(dtype).to(tl.float32) * y_second
    if HEAD_DIM > 0:  # x * cos + cat(-x2, x1) * sin in float32, rounded once (as the compiled model does)
        within_head = rows % HEAD_DIM
        cos = tl.load(cos_ptr + within_head, mask=row_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + within_head, mask=row_ok, other=0.0).to(tl.float32)
        rotate = rows < rotated_rows
        rotated_first = tl.where(rotate, y * cos - y_second * sin, y)
        rotated_second = tl.where(rotate, y_second * cos + y * sin, y_second)
        tl.store(out_ptr + second_rows, rotated_second.to(dtype), mask=row_ok)
        y = rotated_first
    if HAS_RESIDUAL:
        y = y + tl.load(residual_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(dtype), mask=row_ok)


@triton_op("argonne::gemv", mutates_args=())
def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    swiglu: bool = False,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 0.0,
    residual: Optional[torch.Tensor] = None,
    rope_cos: Optional[torch.Tensor] = None,
    rope_sin: Optional[torch.Tensor] = None,
    rotated_rows: int = 0,
) -> torch.Tensor:
    """For x of one row (..., K): `residual + F.linear(rms_norm(x), weight, bias)`, where the norm (`norm_weight`,
    `eps`) and the residual are optional; with `swiglu`, silu(gate) * up of the output's two halves instead. With
    `rope_cos` and `rope_sin` (the row's, head_dim values each) the first `rotated_rows` outputs (q and k heads of a
    merged q/k/v) are rotated by RoPE as `apply_rope` does."""
    head_dim = 0 if rope_cos is None else rope_cos.shape[-1]
    if residual is not None and (swiglu or head_dim):
        raise ValueError("gemv adds a residual only to plain outputs (not with swiglu or RoPE)")
    x = x.contiguous()
    k = x.shape[-1]
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    out = x.new_empty((*x.shape[:-1], n))
    unused = weight  # a pointer for the absent optional tensors; their flags keep the kernel from reading it
    wrap_triton(_gemv_kernel)[lambda meta: (triton.cdiv(n // 2 if head_dim else n, meta["BLOCK_N"]),)](
        x, weight, unused if bias is None else bias, unused if norm_weight is None else norm_weight,
        unused if residual is None else residual.contiguous(), unused if rope_cos is None else rope_cos.contiguous(),
        unused if rope_sin is None else rope_sin.contiguous(), out, n // 2 if head_dim else n, k, eps, rotated_rows,
        HAS_BIAS=bias is not None, SWIGLU=swiglu, HAS_NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None,
        HEAD_DIM=head_dim,
    )
    return out


def one_row(x: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1]


class GemvBlock(Block):
    """An RMSNorm + SwiGLU block (merged projections): for one row, each norm runs inside the matmul after it, each
    residual add inside the matmul before it, and RoPE inside the q/k/v matmul."""

    def forward(self, x, rope=None, attn_mask=None, cache=None):
        if not one_row(x):
            return super().forward(x, rope, attn_mask, cache)
        attention, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        rotation = {}
        if rope is not None:  # q and k come out of the kernel rotated
            q_and_k_rows = attention.q_proj.out_features + attention.k_proj.out_features
            rotation = dict(rope_cos=rope[0], rope_sin=rope[1], rotated_rows=q_and_k_rows)
        qkv = gemv(x, attention.qkv.weight, attention.qkv.bias, norm_weight=norm1.weight, eps=norm1.eps, **rotation)
        y = attention.attend(*qkv.split(attention.qkv.sizes, dim=-1), None, attn_mask, cache)
        h = gemv(y, attention.o_proj.weight, attention.o_proj.bias, residual=x)
        hidden = gemv(h, mlp.gate_up.weight, mlp.gate_up.bias, swiglu=True, norm_weight=norm2.weight, eps=norm2.eps)
        return gemv(hidden, mlp.down_proj.weight, mlp.down_proj.bias, residual=h)


class GemvLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemv(x, self.weight, self.bias) if one_row(x) else super().forward(x)


class GemvMergedLinear(MergedLinear):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not one_row(x):
            return super().forward(x)
        return gemv(x, self.weight, self.bias).split(self.sizes, dim=-1)


class GemvOutputHead(OutputHead):
    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None and one_row(hidden):
            return gemv(hidden, weight)
        return super().forward(hidden, weight, targets)


def fusable(block: Block) -> bool:
    return (isinstance(block.input_layernorm, RMSNorm) and isinstance(block.post_attention_layernorm, RMSNorm)
            and isinstance(block.mlp, SwiGLUMLP) and block.self_attn.qkv is not None)


def use_gemv_kernels(model: ArgonneForCausalLM) -> ArgonneForCausalLM:
    """The plan, for inference: merged projections; each RMSNorm + SwiGLU block re-classed to GemvBlock, and in other
    blocks each linear and merged linear to its GEMV subclass; the output head to GemvOutputHead. The parameters
    and the state dict stay as they are. Returns the model."""
    model.merge_projections()
    for module in model.modules():
        if type(module) is Block and fusable(module):
            module.__class__ = GemvBlock
        elif type(module) in (nn.Linear, MergedLinear, OutputHead):
            module.__class__ = {nn.Linear: GemvLinear, MergedLinear: GemvMergedLinear,
                                OutputHead: GemvOutputHead}[type(module)]
    return model
