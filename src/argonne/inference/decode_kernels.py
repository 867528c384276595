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
`use_gemv_kernels(model, attention=True)` also replaces SDPA (cuDNN: 7.2 us per layer on an H200 at 512 keys) by
`decode_attention`: one program per key/value head and row (and per range of keys in long caches, combined after),
its query heads together in tensor-core products over the keys, online softmax, and no key read after the last one
written (its cost follows the tokens so far, not the size of the cache); there the q/k/v kernel also writes the
keys and values into the paged cache's pool (kv_cache.py; `gemv_qkv_into_cache`), which decode_attention then reads
in position order.
The kernels are `torch.library.triton_op`s, so torch.compile sees through them (and writes the cache in place) and
they are captured in the decode step's CUDA graph like any other kernel. On CPUs the kernels run under Triton's
interpreter (TRITON_INTERPRET=1, float32), which is how the tests check them without a GPU.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import nn
from torch.library import triton_op, wrap_triton

from ..modeling_argonne import ArgonneForCausalLM, Block, MergedLinear, OutputHead, RMSNorm, SwiGLUMLP

# Candidate tilings (rows per program, columns per load, warps), timed per (N, K) on first use by triton.autotune.
# Whole rows of up to 1,024 columns per load keep several 16-byte loads per thread in flight; few rows per program
# keep ~200 programs even for N = 896; 2,048 columns per load halve the steps along long rows (down_proj's 4,864).
GEMV_TILINGS = [(4, 1024, 4), (8, 1024, 8), (2, 1024, 4), (4, 512, 4), (16, 512, 8), (8, 256, 4), (2, 2048, 8),
                (1, 2048, 4)]
# Triton's interpreter (CPUs: the tests) cannot time kernels and runs the programs one after the other in Python: it
# gets one tiling, of many rows per program, so that a call is a few programs.
INTERPRETER_GEMV_TILING = (32, 1024, 4)
_CONFIGS = [triton.Config({"BLOCK_N": rows, "BLOCK_K": columns}, num_warps=warps)
            for rows, columns, warps in (GEMV_TILINGS if torch.cuda.is_available() else [INTERPRETER_GEMV_TILING])]


@triton.autotune(configs=_CONFIGS, key=["N", "K", "SWIGLU", "HAS_NORM", "HEAD_DIM"])
@triton.jit
def _gemv_kernel(x_ptr, weight_ptr, bias_ptr, norm_ptr, residual_ptr, cos_ptr, sin_ptr, cache_ptr, column_ptr,
                 out_ptr, N, K, eps, rotated_rows, q_rows, kv_rows, cache_len, HAS_BIAS: tl.constexpr,
                 SWIGLU: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                 TO_CACHE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The program's BLOCK_N outputs of norm(x) . weight[row] (+ bias) (+ residual). Two modes read rows in pairs:
    SWIGLU (weight = cat(W_gate, W_up), N outputs silu(gate[n]) * up[n]) and RoPE (HEAD_DIM > 0: output rows i and
    i + HEAD_DIM / 2 of each head, rotated by cos/sin where the row is below `rotated_rows`, i.e. in a q or k head;
    N counts the pairs). TO_CACHE (with RoPE) also writes the key and value rows, the `kv_rows` each after the
    `q_rows` query rows, into column `column` of a (2, kv heads x cache_len, HEAD_DIM) cache."""
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
        inverse_rms = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + tl.cast(eps, tl.float32))
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
        if TO_CACHE:  # a key or value row: also into the cache (keys at 0, values at 1; a row's heads one by one)
            column = tl.load(column_ptr)
            after_q = rows - q_rows
            which, within = after_q // kv_rows, after_q % kv_rows
            at = (which * kv_rows + (within // HEAD_DIM) * HEAD_DIM) * cache_len + column * HEAD_DIM
            at += within % HEAD_DIM
            in_cache = row_ok & (rows >= q_rows)
            tl.store(cache_ptr + at, rotated_first.to(dtype), mask=in_cache)
            tl.store(cache_ptr + at + HEAD_DIM // 2, rotated_second.to(dtype), mask=in_cache)
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
    return _launch_gemv(x, weight, bias, swiglu, norm_weight, eps, residual, rope_cos, rope_sin, rotated_rows)


@triton_op("argonne::gemv_qkv_into_cache", mutates_args={"cache"})
def gemv_qkv_into_cache(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    norm_weight: torch.Tensor,
    eps: float,
    rope_cos: torch.Tensor,
    rope_sin: torch.Tensor,
    q_rows: int,
    cache: torch.Tensor,
    column: torch.Tensor,
) -> torch.Tensor:
    """The merged q/k/v projection of one row (gemv with the RMSNorm and RoPE) that also writes its key and value
    heads into column `column[0]` of a layer's cache, a contiguous (2, n_kv * L, head_dim) tensor whose head h holds
    columns h * L .. h * L + L - 1: keys at 0, values at 1 (the paged pool of kv_cache.py as it is, the column the
    token's slot; given whole, not as a view, so that Inductor writes it in place). The cache write is one kernel
    less per layer and step. Returns q/k/v as gemv does."""
    head_dim = rope_cos.shape[-1]
    kv_rows = (weight.shape[0] - q_rows) // 2
    n_kv = kv_rows // head_dim
    if (cache.dim() != 3 or cache.shape[0] != 2 or cache.shape[2] != head_dim or not cache.is_contiguous()
            or n_kv < 1 or cache.shape[1] % n_kv):
        raise ValueError(f"gemv_qkv_into_cache: the cache must be a contiguous (2, {n_kv} x L, {head_dim}) tensor, "
                         f"got {tuple(cache.shape)}")
    if q_rows + 2 * kv_rows != weight.shape[0] or kv_rows % head_dim:
        raise ValueError(f"gemv_qkv_into_cache: {weight.shape[0]} rows are not {q_rows} q rows and 2 x {kv_rows} "
                         "key/value rows")
    return _launch_gemv(x, weight, bias, False, norm_weight, eps, None, rope_cos, rope_sin, q_rows + kv_rows,
                        cache=cache, column=column, q_rows=q_rows, kv_rows=kv_rows,
                        cache_len=cache.shape[1] // n_kv)


def _launch_gemv(x, weight, bias, swiglu, norm_weight, eps, residual, rope_cos, rope_sin, rotated_rows, cache=None,
                 column=None, q_rows=0, kv_rows=1, cache_len=1):
    head_dim = 0 if rope_cos is None else rope_cos.shape[-1]
    x = x.contiguous()
    k = x.shape[-1]
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    out = x.new_empty((*x.shape[:-1], n))
    unused = weight  # a pointer for the absent optional tensors; their flags keep the kernel from reading it
    wrap_triton(_gemv_kernel)[lambda meta: (triton.cdiv(n // 2 if head_dim else n, meta["BLOCK_N"]),)](
        x, weight, unused if bias is None else bias, unused if norm_weight is None else norm_weight,
        unused if residual is None else residual.contiguous(), unused if rope_cos is None else rope_cos.contiguous(),
        unused if rope_sin is None else rope_sin.contiguous(), unused if cache is None else cache,
        unused if column is None else column, out, n // 2 if head_dim else n, k, eps, rotated_rows, q_rows, kv_rows,
        cache_len, HAS_BIAS=bias is not None, SWIGLU=swiglu,
        HAS_NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None, HEAD_DIM=head_dim,
        TO_CACHE=cache is not None,
    )
    return out


# Keys per step and warps for decode_attention, timed per shape on first use. Tilings that need more shared memory
# than the GPU has (Argonne 2.0's head_dim 170, padded to 256, at 128 keys and more) are skipped.
ATTENTION_TILINGS = [(64, 4), (64, 8), (128, 4), (128, 8), (256, 8)]
_ATTENTION_CONFIGS = [triton.Config({"BLOCK_S": keys}, num_warps=warps)
                      for keys, warps in ATTENTION_TILINGS[: None if torch.cuda.is_available() else 1]]
# Long caches are cut into key ranges done by programs of their own (then combined, "flash decoding"): ranges of at
# least this many keys, and no more ranges than make about this many programs in all.
MIN_KEYS_PER_SPLIT = 512
SPLIT_PROGRAMS = 128


@triton.autotune(configs=_ATTENTION_CONFIGS, key=["S", "keys_per_split", "HEAD_DIM", "GROUP"])
@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, last_key_ptr, out_ptr, lse_ptr, S, keys_per_split, n_kv,
                             scale, q_row_stride, kv_head_stride, mask_row_stride, GROUP: tl.constexpr,
                             HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr,
                             HAS_LAST_KEY: tl.constexpr, SPLIT: tl.constexpr, BLOCK_G: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr):
    """One query per row: the GROUP query heads that share key/value head `kv` of row `b` against keys
    split * keys_per_split onwards (keys_per_split of them, none after the last key written), in BLOCK_S steps with
    an online softmax, so each key and value is read once for the whole group (a matrix product of the group's
    queries, padded to BLOCK_G rows, with the keys). With SPLIT the program writes its range's softmax-weighted
    values and log-sum-exp (float32) for _combine_splits_kernel; else the output."""
    b = tl.program_id(0) // n_kv
    kv = tl.program_id(0) % n_kv
    split = tl.program_id(1)
    end = S
    if HAS_LAST_KEY:  # keys after the last one written are not there yet: skipped, not only masked
        end = tl.minimum(tl.load(last_key_ptr).to(tl.int32) + 1, S)
    first = split * keys_per_split
    stop = tl.minimum(first + keys_per_split, end)
    group = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    group_ok, dims_ok = group < GROUP, dims < HEAD_DIM
    q_offsets = b * q_row_stride + (kv * GROUP + group)[:, None] * HEAD_DIM + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=group_ok[:, None] & dims_ok[None, :], other=0.0)
    kv_start = (b * n_kv + kv).to(tl.int64) * kv_head_stride
    # Inductor may type a Python float argument as float64 (torch 2.11 did): the scores must stay float32.
    scale = tl.cast(scale, tl.float32)
    best = tl.full((BLOCK_G,), -1.0e30, dtype=tl.float32)  # finite: a block with every key masked stays NaN-free
    total = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for s_start in range(first, stop, BLOCK_S):
        keys_at = s_start + tl.arange(0, BLOCK_S)
        keys_ok = keys_at < stop
        tile = kv_start + keys_at[:, None] * HEAD_DIM + dims[None, :]
        tile_ok = keys_ok[:, None] & dims_ok[None, :]
        k = tl.load(k_ptr + tile, mask=tile_ok, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if HAS_MASK and BOOL_MASK:  # True where the key may be seen
            allowed = tl.load(mask_ptr + b * mask_row_stride + keys_at, mask=keys_ok, other=0) != 0
            scores = tl.where(allowed[None, :], scores, float("-inf"))
        elif HAS_MASK:  # additive
            scores += tl.load(mask_ptr + b * mask_row_stride + keys_at, mask=keys_ok, other=0.0).to(tl.float32)[None, :]
        scores = tl.where(keys_ok[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        rescale = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best[:, None])
        total = total * rescale + tl.sum(weights, axis=1)
        v = tl.load(v_ptr + tile, mask=tile_ok, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
        best = new_best
    heads = b * (n_kv * GROUP) + kv * GROUP + group  # this row's query heads, counted over all rows
    store_ok = group_ok[:, None] & dims_ok[None, :]
    if SPLIT:  # a range with no key to see (after the last key, or all masked) weighs nothing in the combination
        seen = total > 0
        total = tl.where(seen, total, 1.0)
        slot = heads * tl.num_programs(1) + split
        tl.store(lse_ptr + slot, tl.where(seen, best + tl.log(total), float("-inf")), mask=group_ok)
        tl.store(out_ptr + slot[:, None] * HEAD_DIM + dims[None, :], acc / total[:, None], mask=store_ok)
    else:
        out = acc / total[:, None]
        tl.store(out_ptr + heads[:, None] * HEAD_DIM + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=store_ok)


@triton.jit
def _combine_splits_kernel(partial_ptr, lse_ptr, out_ptr, splits, HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """The attention output of one query head from its key ranges' outputs, weighted by their share of the softmax."""
    head = tl.program_id(0)
    ranges = tl.arange(0, BLOCK_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    ranges_ok, dims_ok = ranges < splits, dims < HEAD_DIM
    lse = tl.load(lse_ptr + head * splits + ranges, mask=ranges_ok, other=float("-inf"))
    weights = tl.exp(lse - tl.max(lse, axis=0))
    parts = tl.load(partial_ptr + (head * splits + ranges)[:, None] * HEAD_DIM + dims[None, :],
                    mask=ranges_ok[:, None] & dims_ok[None, :], other=0.0)
    out = tl.sum(parts * weights[:, None], axis=0) / tl.sum(weights, axis=0)
    tl.store(out_ptr + head * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty), mask=dims_ok)


def attention_splits(batch: int, kv_heads: int, length: int) -> int:
    """How many key ranges decode_attention does in parallel: one program per (row, key/value head) is few on a GPU
    of 132 multiprocessors, and each walks every key; long caches are therefore split."""
    return max(1, min(length // MIN_KEYS_PER_SPLIT, SPLIT_PROGRAMS // (batch * kv_heads)))


@triton_op("argonne::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: float, last_key: Optional[torch.Tensor] = None, splits: int = 0) -> torch.Tensor:
    """Attention of one query per row: q (B, 1, heads * hd) (rows may be strided, heads contiguous), keys and values
    (B, n_kv, S, hd) contiguous per row, `mask` None, boolean (True: seen) or additive, (B or 1, 1, 1, S) ->
    (B, 1, heads * hd).

    `last_key` (a one-element integer tensor: the new token's position) ends the keys there: the ones
    after it are not read (the cost follows the tokens so far, not the cache's size). `splits` key ranges are done
    by programs of their own and combined (0: `attention_splits` of the shape)."""
    batch, n_kv, length, head_dim = keys.shape
    rows_of_heads = keys.stride(-1) == 1 and keys.stride(-2) == head_dim and keys.stride(0) == n_kv * keys.stride(1)
    if not rows_of_heads or values.stride() != keys.stride():
        raise ValueError("decode_attention: keys and values must be (B, n_kv, S, hd), each head's S x hd contiguous "
                         "and the heads of a row one after another")
    if q.stride(-1) != 1 or (mask is not None and mask.stride(-1) != 1):
        raise ValueError("decode_attention: q and mask need a contiguous last dimension")
    heads = q.shape[-1] // head_dim
    splits = splits or attention_splits(batch, n_kv, length)
    keys_per_split = triton.cdiv(length, splits)
    out = q.new_empty((batch, 1, heads * head_dim))
    block_d = max(16, triton.next_power_of_2(head_dim))
    if splits > 1:
        partial = q.new_empty((batch * heads, splits, head_dim), dtype=torch.float32)
        lse = q.new_empty((batch * heads, splits), dtype=torch.float32)
    else:
        partial, lse = out, out  # the output written directly; lse unused
    wrap_triton(_decode_attention_kernel)[(batch * n_kv, splits)](
        q, keys, values, keys if mask is None else mask, keys if last_key is None else last_key, partial, lse,
        length, keys_per_split, n_kv, scale, q.stride(0), keys.stride(1),
        0 if mask is None or mask.shape[0] == 1 else mask.stride(0), GROUP=heads // n_kv, HEAD_DIM=head_dim,
        HAS_MASK=mask is not None, BOOL_MASK=mask is not None and mask.dtype == torch.bool,
        HAS_LAST_KEY=last_key is not None,
        SPLIT=splits > 1, BLOCK_G=max(16, triton.next_power_of_2(heads // n_kv)), BLOCK_D=block_d,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if splits > 1:
        wrap_triton(_combine_splits_kernel)[(batch * heads,)](
            partial, lse, out, splits, HEAD_DIM=head_dim, BLOCK_SPLITS=max(2, triton.next_power_of_2(splits)),
            BLOCK_D=block_d)
    return out


def one_row(x: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1]


class GemvBlock(Block):
    """An RMSNorm + SwiGLU block (merged projections): for one row, each norm runs inside the matmul after it, each
    residual add inside the matmul before it, and RoPE inside the q/k/v matmul (with QK-norm, RoPE follows the
    per-head norms outside it). With `triton_attention` (set by use_gemv_kernels) the attention over a cache is
    `decode_attention` instead of SDPA."""

    triton_attention = False

    def forward(self, x, rope=None, attn_mask=None, cache=None):
        if not one_row(x):
            return super().forward(x, rope, attn_mask, cache)
        attention, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        # q and k come out of the kernel rotated, unless QK-norm must come first: then `attention.heads` does both.
        rotation, rope_left = {}, rope
        if rope is not None and attention.q_norm is None:
            q_and_k_rows = attention.q_proj.out_features + attention.k_proj.out_features
            rotation, rope_left = dict(rope_cos=rope[0], rope_sin=rope[1], rotated_rows=q_and_k_rows), None
        # one query over the cache, whose mask (if any) is one row of keys per row
        triton_attention = (self.triton_attention and cache is not None
                            and (attn_mask is None or attn_mask.shape[-2] == 1))
        scale = 1.0 / math.sqrt(attention.head_dim)
        if triton_attention and rotation and getattr(cache, "write_slot", None) is not None:
            # keys and values go from the q/k/v kernel straight into the cache's pool
            layer = attention.layer_idx
            qkv = gemv_qkv_into_cache(x, attention.qkv.weight, attention.qkv.bias, norm1.weight, norm1.eps, rope[0],
                                      rope[1], attention.q_proj.out_features, cache.cache.layers[layer],
                                      cache.write_slot)
            q = qkv[..., : attention.q_proj.out_features]
            keys, values = cache.read(layer)
            y = decode_attention(q, keys, values, attn_mask, scale, cache.write_positions)
        else:
            qkv = gemv(x, attention.qkv.weight, attention.qkv.bias, norm_weight=norm1.weight, eps=norm1.eps,
                       **rotation)
            q, k, v = qkv.split(attention.qkv.sizes, dim=-1)
            if triton_attention:
                q, k, v = attention.heads(q, k, v, rope_left)  # (B, heads, 1, hd)
                keys, values = cache.update(k, v, attention.layer_idx)
                written = getattr(cache, "write_positions", None)  # keys after the new one are not there yet
                last_key = None if written is None else written[-1:]
                y = decode_attention(q.transpose(1, 2).flatten(2), keys, values, attn_mask, scale, last_key)
            else:
                y = attention.attend(q, k, v, rope_left, attn_mask, cache)
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


GEMV_CLASSES = {nn.Linear: GemvLinear, MergedLinear: GemvMergedLinear, OutputHead: GemvOutputHead}


def fusable(block: Block) -> bool:
    return (isinstance(block.input_layernorm, RMSNorm) and isinstance(block.post_attention_layernorm, RMSNorm)
            and isinstance(block.mlp, SwiGLUMLP) and block.self_attn.qkv is not None)


def use_gemv_kernels(model: ArgonneForCausalLM, attention: bool = False) -> ArgonneForCausalLM:
    """The plan, for inference: merged projections; each RMSNorm + SwiGLU block re-classed to GemvBlock (with
    `attention`, its decode attention through `decode_attention`), and in other blocks each linear and merged linear
    to its GEMV subclass; the output head to GemvOutputHead. The parameters and the state dict stay as they are.
    Returns the model."""
    model.merge_projections()
    for module in model.modules():
        if type(module) in (Block, GemvBlock) and fusable(module):
            module.__class__ = GemvBlock
            module.triton_attention = attention
        elif type(module) in GEMV_CLASSES:
            module.__class__ = GEMV_CLASSES[type(module)]
    return model
