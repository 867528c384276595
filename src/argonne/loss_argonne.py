"""The training loss of Argonne's output head: chunked linear + cross-entropy that never holds all the logits.

`linear_cross_entropy(hidden, weight, targets)` is the value and gradients of
`F.cross_entropy(F.linear(hidden, weight).float(), targets)`, computed a chunk of tokens at a time with each chunk's
gradients made right away (the backward only scales them). With `z_loss=c` it adds PaLM's z-loss, c times the mean
squared log-partition log(sum(exp(logits)))^2 per scored token, which keeps the logits' normaliser near 1 (and the
softmax well conditioned in low precision); its gradient joins the same per-chunk gradient, so no logits are kept. `cross_entropy_chunk` is one chunk's loss and logit
gradient; its `vocab_start` / `reduce_max` / `reduce_sum` let parallel.py run it on a vocabulary slice under tensor
parallelism. No torch.distributed here: the reductions are passed in.

`modeling_argonne.py` imports this file relatively (`from .loss_argonne import ...`), so transformers copies it beside
saved weights with the model file, and like the model file it imports nothing else from the `argonne` package.
"""

from __future__ import annotations

import math
from functools import partial

import torch

# Logits per loss chunk. Eager chunks (CPU) hold float32 copies: 2**26 logits, 256 MiB each. On GPUs the chunk's
# element-wise work is one compiled kernel pair (no float32 copies), so a chunk of 2**28 costs its bf16 logits and
# gradient, 1 GiB (1,664 tokens at vocab 151,665 padded); fewer chunks mean fewer float32 accumulations of the (V, D)
# weight gradient, each a pass over 2 x 4 x V x D bytes.
LOSS_CHUNK_LOGITS = 2**26
LOSS_CHUNK_LOGITS_GPU = 2**28
# cuBLAS needs leading dimensions that are multiples of 8 half-precision elements for its fast kernels. A vocabulary
# of 151,665 is not: the head's three matmuls fall back to slow Turing-era "align1" kernels (half of the 0.5B model's
# step time on a GPU; benchmarks/RESULTS.md). On GPUs the head matrix is therefore zero-padded to a multiple of this many
# rows inside the loss (the padded logits are masked out); chunks are a multiple of 128 tokens (whole matmul tiles).
LOSS_VOCAB_MULTIPLE_GPU = 64


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_logits: int | None = None,
    chunk_loss=None,
    sum_over_slices=None,
    pad_vocab_to: int | None = None,
    z_loss: float | None = None,
):
    """Mean cross-entropy of the logits `hidden @ weight.T` against `targets` (-100 ignored): the value of
    F.cross_entropy(F.linear(hidden, weight).float(), targets), without ever holding all the logits.

    hidden (..., D), weight (V, D), targets (...). Logits are made `chunk_logits // V` tokens at a time
    (LOSS_CHUNK_LOGITS by default, LOSS_CHUNK_LOGITS_GPU on GPUs), in the autocast dtype when autocast is on, and
    soft-maxed in float32. When a gradient is wanted, each chunk's gradients for hidden and weight are computed
    right away (d mean loss / d logits = (softmax - one_hot) / scored tokens), and the backward only scales them by
    the incoming gradient: no logits are kept and no matmul is repeated. A batch with no scored token gives NaN
    (0 / 0), as F.cross_entropy does. `pad_vocab_to` (default LOSS_VOCAB_MULTIPLE_GPU on GPUs, 1 on CPUs) pads the
    matrix's rows with zeros for aligned matmuls; the result does not depend on it.

    For a head sharded by vocabulary rows (tensor parallelism), `weight` is this process's slice and parallel.py
    passes `chunk_loss` (cross_entropy_chunk's contract, combining the slices' statistics) and `sum_over_slices`
    (which sums the slices' hidden-state gradients).

    With `z_loss` (a coefficient, 0 included) the result is a pair: (mean cross-entropy + z_loss * mean z, mean z),
    where z = log(sum(exp(logits)))^2 per scored token; only the first carries a gradient. Without it, the mean
    cross-entropy alone.
    """
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    chunk_logits = chunk_logits or (LOSS_CHUNK_LOGITS_GPU if hidden.is_cuda else LOSS_CHUNK_LOGITS)
    pad_vocab_to = pad_vocab_to or (LOSS_VOCAB_MULTIPLE_GPU if hidden.is_cuda else 1)
    padded_vocab = -(-weight.shape[0] // pad_vocab_to) * pad_vocab_to
    chunk = max(1, chunk_logits // padded_vocab)
    if chunk >= 256:
        chunk -= chunk % 128
    if chunk_loss is None:
        chunk_loss = _compiled_chunk_loss if hidden.is_cuda else cross_entropy_chunk
    settings = chunk, compute_dtype, chunk_loss, sum_over_slices, padded_vocab, z_loss or 0.0
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss, z = _LinearCrossEntropy.apply(hidden, weight, targets, settings)
    else:
        with torch.autocast(device_type, enabled=False):
            loss, z = _chunked_cross_entropy(hidden, weight, targets, settings, with_grads=False)[0]
    return loss if z_loss is None else (loss, z)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, settings):
        with torch.autocast(hidden.device.type, enabled=False):
            (loss, z), grad_hidden, grad_weight = _chunked_cross_entropy(hidden, weight, targets, settings,
                                                                         with_grads=True)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(z)
        return loss, z

    @staticmethod
    def backward(ctx, grad_loss, grad_z):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (grad_hidden * grad_loss).to(hidden_dtype), (grad_weight * grad_loss).to(weight_dtype), None, None


def _chunked_cross_entropy(hidden, weight, targets, settings, with_grads):
    """((mean loss with z-loss, mean z), d loss / d hidden or None, d loss / d weight in float32 or None); see
    linear_cross_entropy."""
    chunk, compute_dtype, chunk_loss, sum_over_slices, padded_vocab, z_loss = settings
    vocab = weight.shape[0]
    h_all = hidden.to(compute_dtype)
    if padded_vocab > vocab:  # one copy, converted on the way, and zero rows that the loss leaves out
        w = weight.new_empty((padded_vocab, weight.shape[1]), dtype=compute_dtype)
        w[:vocab] = weight
        w[vocab:] = 0
    else:
        w = weight.to(compute_dtype)  # no copy at all when the dtype is already the compute dtype
    scale = 1.0 / (targets != -100).sum()  # a tensor: no host synchronisation
    sums = torch.zeros(2, dtype=torch.float32, device=hidden.device)  # cross-entropy, z
    grad_hidden = torch.empty_like(h_all) if with_grads else None
    grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=weight.device) if with_grads else None
    for start in range(0, h_all.shape[0], chunk):
        h = h_all[start : start + chunk]
        part, grad_logits = chunk_loss(h @ w.T, targets[start : start + chunk], scale, with_grads, columns=vocab,
                                       z_loss=z_loss)
        sums = sums + part
        if with_grads:
            grad_hidden[start : start + chunk] = grad_logits @ w
            accumulate_matmul(grad_weight, grad_logits.T, h)
    if with_grads and sum_over_slices is not None:
        grad_hidden = sum_over_slices(grad_hidden)
    cross_entropy, z = (sums * scale).unbind()
    return (cross_entropy + z_loss * z, z), grad_hidden, grad_weight[:vocab] if with_grads else None


def accumulate_matmul(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total (float32) += a @ b for half-precision a and b. On GPUs one matmul that accumulates into the float32
    total (cuBLAS's beta = 1) where the installed PyTorch offers it (addmm's out_dtype); otherwise the product is
    made in a's dtype and added, which moves the (V, D) head gradient through memory three more times."""
    global _fp32_accumulating_addmm
    if _fp32_accumulating_addmm and total.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
            return
        except (RuntimeError, TypeError):  # an older PyTorch without the kernel: fall back from now on
            _fp32_accumulating_addmm = False
    total += (a @ b).float()


_fp32_accumulating_addmm = hasattr(torch.ops.aten.addmm, "dtype_out")


def cross_entropy_chunk(
    logits: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    with_grads: bool,
    fused: bool = False,
    vocab_start: int = 0,
    reduce_max=None,
    reduce_sum=None,
    columns: int | None = None,
    z_loss: float = 0.0,
):
    """Summed float32 loss and z of logits (n, V) against targets (n,), as one tensor [loss, z], and, with_grads,
    d(scale * (loss + z_loss * z))/d logits in the logits' dtype; z is log(sum(exp(logits)))^2 per scored row.
    Ignored targets (-100) contribute nothing, even when their logits are not finite. With `columns`, only the first
    `columns` logits of each row are real (a head matrix padded with zero rows): the rest are left out of the softmax
    and get a zero gradient, while the rows keep their aligned length.

    For a slice of the vocabulary (tensor parallelism), the logits are its rows vocab_start .. vocab_start + V - 1,
    and `reduce_max` / `reduce_sum` combine per-token statistics over the slices' processes: every process then
    gets the same loss and the gradient for its own slice. `fused` writes the one-hot as an index comparison, which
    torch.compile fuses with the softmax into one pass over the logits; the default works in place, which is what
    runs fastest eagerly.
    """
    columns = logits.shape[1] if columns is None else columns
    scored = targets != -100
    logits32 = logits.float().masked_fill(~scored[:, None], 0.0)  # a new float32 tensor, free to work in place
    if columns < logits.shape[1]:
        logits32 = logits32.masked_fill(torch.arange(logits.shape[1], device=logits.device) >= columns, -math.inf)
    here = scored & (targets >= vocab_start) & (targets < vocab_start + columns)  # the target is in the slice
    local_targets = torch.where(here, targets - vocab_start, 0)[:, None]
    row_max = logits32.amax(dim=-1)
    if reduce_max is not None:
        row_max = reduce_max(row_max)
    shifted = logits32.sub_(row_max[:, None])
    stats = torch.stack([shifted.exp().sum(-1), torch.where(here, shifted.gather(1, local_targets).squeeze(1), 0.0)])
    if reduce_sum is not None:
        stats = reduce_sum(stats)
    log_sum_exp, target_logit = stats[0].log(), stats[1]  # both relative to the row maximum
    partition = torch.where(scored, log_sum_exp + row_max, 0.0)  # the absolute log-partition, for the z-loss
    sums = torch.stack([((log_sum_exp - target_logit) * scored).sum(), partition.square().sum()])
    if not with_grads:
        return sums, None
    # d z / d logits = 2 * partition * softmax: the z-loss scales each row's softmax term.
    row_scale = (scored * scale)[:, None]
    softmax_scale = row_scale * (1 + 2 * z_loss * partition[:, None]) if z_loss else row_scale
    if fused:
        one_hot = (local_targets == torch.arange(logits.shape[1], device=logits.device)) & here[:, None]
        grad = torch.exp(shifted - log_sum_exp[:, None]) * softmax_scale - one_hot.float() * row_scale
    else:
        grad = shifted.sub_(log_sum_exp[:, None]).exp_()  # softmax
        if z_loss:
            grad.mul_(softmax_scale).scatter_add_(1, local_targets, -(here[:, None] * row_scale).to(grad.dtype))
        else:
            grad.scatter_add_(1, local_targets, -here[:, None].to(grad.dtype)).mul_(row_scale)  # - one_hot
    return sums, grad.to(logits.dtype)


def _compiled_chunk_loss(logits, targets, scale, with_grads, columns=None, z_loss=0.0):
    """cross_entropy_chunk fused by torch.compile into a reduction and one element-wise pass over the chunk's bf16
    logits (on GPUs, where an eager chain of float32 copies over a vocabulary of 151,665 costs as much as the head's
    matmuls)."""
    global _compiled_cross_entropy_chunk
    if _compiled_cross_entropy_chunk is None:
        _compiled_cross_entropy_chunk = torch.compile(partial(cross_entropy_chunk, fused=True))
    return _compiled_cross_entropy_chunk(logits, targets, scale, with_grads, columns=columns, z_loss=z_loss)


_compiled_cross_entropy_chunk = None
