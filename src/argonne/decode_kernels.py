"""Triton matrix-vector kernels for decoding one token at a time on GPUs, applied to a model as a plan.

At batch 1 every matmul of a decoding step multiplies a weight matrix by one vector (a GEMV): its time is the time
to read the matrix, yet on an H200 cuBLAS took 3.6-5.4 us for each of the 0.5B model's 168 per-token GEMVs
(0.7-4.4 GB/s per matrix of 0.2-8.7 MB: launch and ramp-up, not bandwidth) plus a split-K reduction kernel for
down_proj. `use_gemv_kernels(model)` merges q/k/v and gate/up (`merge_projections`) and sends every one-row matmul
through `gemv`: one kernel per projection, SwiGLU's silu(gate) * up computed inside the gate/up kernel, no split-K
reduction. Inputs with more than one row (prefill, batches) keep cuBLAS.

Each program reads BLOCK_N whole rows of the (N, K) weight (K in BLOCK_K steps) against the vector, accumulates in
float32 and rounds once; the tiling is timed per shape on first use (triton.autotune). `gemv` is a `torch.library.triton_op`, so torch.compile sees through it and the kernels are
captured in the decode step's CUDA graph like any other. On a CPU the kernels run under Triton's interpreter
(TRITON_INTERPRET=1, float32), which is how the tests check them without a GPU.
"""

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn
from torch.library import triton_op, wrap_triton

from .modeling_argonne import ArgonneForCausalLM, MergedLinear, OutputHead, SwiGLUMLP


# Candidate tilings (rows per program, columns per load, warps), timed per (N, K) on first use by triton.autotune.
# Whole rows of up to 1,024 columns per load keep several 16-byte loads per thread in flight; few rows per program
# keep ~200 programs even for N = 896. Triton's interpreter (CPUs) cannot time kernels: it gets the first only.
GEMV_TILINGS = [(4, 1024, 4), (8, 1024, 8), (2, 1024, 4), (4, 512, 4), (16, 512, 8), (8, 256, 4)]
_CONFIGS = [triton.Config({"BLOCK_N": rows, "BLOCK_K": columns}, num_warps=warps)
            for rows, columns, warps in GEMV_TILINGS[: None if torch.cuda.is_available() else 1]]


@triton.autotune(configs=_CONFIGS, key=["N", "K", "SWIGLU"])
@triton.jit
def _gemv_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, N, K,
                 HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n] = x . weight[n] (+ bias[n]) for the program's BLOCK_N rows; with SWIGLU the weight is
    cat(W_gate, W_up) of 2N rows and out[n] = silu(gate[n]) * up[n]."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_start = rows.to(tl.int64)[:, None] * K
    columns = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k = k_start + columns
        k_ok = k < K
        x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        mask = row_ok[:, None] & k_ok[None, :]
        acc += tl.load(weight_ptr + row_start + k[None, :], mask=mask, other=0.0).to(tl.float32) * x
        if SWIGLU:
            up_rows = weight_ptr + N * K + row_start + k[None, :]
            acc_up += tl.load(up_rows, mask=mask, other=0.0).to(tl.float32) * x
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if SWIGLU:
        up = tl.sum(acc_up, axis=1)
        if HAS_BIAS:
            up += tl.load(bias_ptr + N + rows, mask=row_ok, other=0.0).to(tl.float32)
        y = y * tl.sigmoid(y) * up
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton_op("argonne::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], swiglu: bool) -> torch.Tensor:
    """F.linear(x, weight, bias) for an x of one row (..., K); with `swiglu`, silu(gate) * up of the halves."""
    x = x.contiguous()
    k = x.shape[-1]
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    out = x.new_empty((*x.shape[:-1], n))
    wrap_triton(_gemv_kernel)[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x, weight, weight if bias is None else bias, out, n, k, HAS_BIAS=bias is not None, SWIGLU=swiglu,
    )
    return out


def one_row(x: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1]


class GemvLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemv(x, self.weight, self.bias, False) if one_row(x) else super().forward(x)


class GemvMergedLinear(MergedLinear):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not one_row(x):
            return super().forward(x)
        return gemv(x, self.weight, self.bias, False).split(self.sizes, dim=-1)


class GemvSwiGLUMLP(SwiGLUMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None or not one_row(x):
            return super().forward(x)
        return self.down_proj(gemv(x, self.gate_up.weight, self.gate_up.bias, True))


class GemvOutputHead(OutputHead):
    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None and one_row(hidden):
            return gemv(hidden, weight, None, False)
        return super().forward(hidden, weight, targets)


GEMV_CLASSES = {nn.Linear: GemvLinear, MergedLinear: GemvMergedLinear, SwiGLUMLP: GemvSwiGLUMLP,
                OutputHead: GemvOutputHead}


def use_gemv_kernels(model: ArgonneForCausalLM) -> ArgonneForCausalLM:
    """The plan, for inference: merged projections, and each linear, merged linear, SwiGLU MLP and the output head
    re-classed to its GEMV-using subclass (same parameters, same state dict). Returns the model."""
    model.merge_projections()
    for module in model.modules():
        swapped = GEMV_CLASSES.get(type(module))
        if swapped is not None:
            module.__class__ = swapped
    return model
