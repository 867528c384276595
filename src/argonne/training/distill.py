"""Knowledge distillation: the student learns from a teacher's softened distribution and from the data.

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy

where p_T = softmax(logits / T) over the tokenizer's real tokens: a teacher (or student) whose embedding is padded
beyond the tokenizer (Qwen2.5's 151,936 rows for 151,665 tokens) is sliced to them, and softmax renormalises. A
vocabulary that does not match (a teacher with fewer rows, or one whose own tokenizer differs) is an error.
T^2 keeps the gradient scale of the soft term independent of T (Hinton et al., 2015).

The teacher runs without gradients, in bf16 on GPUs (float32 on CPUs), replicated on every rank. Both terms are
computed in float32 a chunk of positions at a time, with their gradient, so no float32 (batch, sequence, vocab)
tensor is made (see `distillation_loss`). `argonne distill` is `argonne train`'s loop with this objective
(DISTILLATION, a TrainSpec).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..run_config import ConfigError
from ..modeling_argonne import ArgonneForCausalLM
from .build import TrainSpec, pretraining_batches, sft_batches


def load_teacher(path: str | Path, device: torch.device):
    """Any causal LM from a Hugging Face folder, or an Argonne training checkpoint."""
    from ..checkpoint import is_checkpoint

    from ..device import resolve_dtype

    path = Path(path)
    dtype = resolve_dtype("auto", device)
    if is_checkpoint(path):
        from ..loading import open_config, load_weights

        teacher = ArgonneForCausalLM(open_config(path))
        load_weights(teacher, path, verify=False)  # verified by open_config
        teacher.to(device=device, dtype=dtype)
    else:
        import pickle

        from transformers import AutoModelForCausalLM

        import argonne  # noqa: F401  registers model_type "argonne" with the Auto classes

        try:
            # trust_remote_code=False: a folder whose config asks for its own code is refused, never run (left
            # unset, transformers asks on the terminal, and a "y" runs it).
            teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False).to(device)
        except (OSError, ValueError, pickle.UnpicklingError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"distill.teacher {path}: cannot be loaded ({first})") from None
        from ..loading import check_finite_weights

        check_finite_weights(teacher, path)  # (a checkpoint's are checked by load_weights)
    teacher.eval().requires_grad_(False)
    return teacher


def check_vocabularies(teacher_path: Path, teacher_rows: int, student_rows: int, tokenizer) -> int:
    """The number of real tokens the distributions are taken over; raises on a true mismatch."""
    from ..data.documents import tokenizer_fingerprint

    real = len(tokenizer)
    problems = []
    if teacher_rows < real:
        problems.append(f"the teacher's output has {teacher_rows} rows for a {real}-token tokenizer")
    if student_rows < real:
        problems.append(f"the student's output has {student_rows} rows for a {real}-token tokenizer")
    if (teacher_path / "tokenizer_config.json").is_file() or (teacher_path / "tokenizer.json").is_file():
        from ..tokenizer import load_tokenizer

        theirs = tokenizer_fingerprint(load_tokenizer(teacher_path))
        ours = tokenizer_fingerprint(tokenizer)
        if theirs["vocab_sha256"] != ours["vocab_sha256"]:
            problems.append(f"the teacher's tokenizer ({theirs['vocab_size']} tokens) is not the training "
                            f"tokenizer ({ours['vocab_size']} tokens)")
    if problems:
        raise ConfigError("teacher and student vocabularies do not match: " + "; ".join(problems))
    return real


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      vocab: int, alpha: float, temperature: float, chunk: int = 512):
    """(loss, kl, ce): loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy, each a mean
    over the scored positions (targets != -100). student_logits (B, T, V), teacher_logits (B, T, >= vocab).

    Computed a chunk of `chunk` positions at a time in float32, with the gradient for the student's logits made
    in the same pass (d loss / d logits = (1 - alpha) (softmax - one_hot) + alpha T (softmax_T - p_teacher), over
    the scored positions), so neither a float32 copy of the logits nor any per-chunk activation is kept for the
    backward pass: its memory is one gradient the size of the logits. The cross-entropy is over every row of the
    student's logits, as the model's own loss is, so alpha = 0 is plain training; no scored position gives NaN,
    as F.cross_entropy does."""
    return _DistillationLoss.apply(student_logits, teacher_logits, targets, (vocab, alpha, temperature, chunk))


class _DistillationLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, teacher_logits, targets, settings):
        vocab, alpha, temperature, chunk = settings
        flat, teacher = logits.reshape(-1, logits.shape[-1]), teacher_logits.reshape(-1, teacher_logits.shape[-1])
        targets = targets.reshape(-1)
        scored = targets != -100
        grad = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        kl_sum = ce_sum = flat.new_zeros((), dtype=torch.float32)
        with torch.autocast(flat.device.type, enabled=False):
            for start in range(0, flat.shape[0], chunk):
                rows = slice(start, start + chunk)
                z, mask, y = flat[rows].float(), scored[rows], targets[rows].clamp(min=0)
                log_p = z.log_softmax(-1)  # the cross-entropy's distribution, every row
                log_q = (z[:, :vocab] / temperature).log_softmax(-1)  # the student's, softened, real tokens
                log_t = (teacher[rows, :vocab].float() / temperature).log_softmax(-1)
                p_teacher = log_t.exp()
                ce_sum = ce_sum - (log_p.gather(1, y[:, None])[:, 0] * mask).sum()
                kl_sum = kl_sum + ((p_teacher * (log_t - log_q)).sum(-1) * mask).sum()
                if grad is not None:
                    g = log_p.exp_().mul_(1 - alpha)
                    g[torch.arange(len(y), device=y.device), y] -= 1 - alpha
                    g[:, :vocab] += (log_q.exp_() - p_teacher).mul_(alpha * temperature)
                    grad[rows] = g.mul_(mask[:, None])
        count = scored.sum()
        ce = ce_sum / count  # 0 / 0 = NaN without a scored position, as F.cross_entropy gives
        kl = kl_sum / count.clamp(min=1)
        loss = alpha * temperature**2 * kl + (1 - alpha) * ce
        if grad is not None:
            ctx.save_for_backward(grad)
            ctx.count, ctx.logits_shape = count, logits.shape
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, grad_kl, grad_ce):
        (grad,) = ctx.saved_tensors
        scale = (grad_loss / ctx.count).to(grad.dtype)
        # Scaled in place: a second logits-sized tensor here was the step's memory peak. (So one backward only,
        # as training does.)
        return grad.mul_(scale).view(ctx.logits_shape), None, None, None


class DistillationObjective:
    """The training step's loss for `argonne distill`; returns (loss, {"kl": ..., "ce": ...})."""

    def __init__(self, teacher, vocab: int, alpha: float, temperature: float, chunk: int = 512):
        self.teacher, self.vocab, self.alpha, self.temperature, self.chunk = teacher, vocab, alpha, temperature, chunk

    def __call__(self, model, inputs: torch.Tensor, targets: torch.Tensor):
        # The KL needs the student's logits, so they are made whole here; everything after them is chunked.
        logits = model(inputs, use_cache=False).logits
        with torch.no_grad():
            teacher_logits = self.teacher(inputs, use_cache=False).logits
        loss, kl, ce = distillation_loss(logits, teacher_logits, targets, self.vocab, self.alpha, self.temperature,
                                         self.chunk)
        return loss, {"kl": kl, "ce": ce}


def build_distillation(config, model_config, tokenizer, device) -> DistillationObjective:
    """The distillation objective of a run config: its teacher loaded on `device`, vocabularies checked."""
    teacher = load_teacher(config.distill.teacher, device)
    teacher_rows = teacher.get_input_embeddings().weight.shape[0]
    vocab = check_vocabularies(Path(config.distill.teacher), teacher_rows, model_config.vocab_size, tokenizer)
    d = config.distill
    return DistillationObjective(teacher, vocab, d.alpha, d.temperature, d.chunk)


def distillation_batches(config, tokenizer, topology, pin_memory: bool = False):
    """Distillation trains on pretraining data or on instruction data (data.sft)."""
    if config.data.sft:
        return sft_batches(config, tokenizer, topology, pin_memory)
    return pretraining_batches(config, tokenizer, topology, pin_memory)


DISTILLATION = TrainSpec("distill", distillation_batches, build_distillation)
