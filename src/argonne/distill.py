"""Knowledge distillation: the student learns from a teacher's softened distribution and from the data.

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy

where p_T = softmax(logits / T) over the tokenizer's real tokens: a teacher (or student) whose embedding is padded
beyond the tokenizer (Qwen2.5's 151,936 rows for 151,665 tokens) is sliced to them, and softmax renormalises. A
vocabulary that does not match (a teacher with fewer rows, or one whose own tokenizer differs) is an error.
T^2 keeps the gradient scale of the soft term independent of T (Hinton et al., 2015).

The teacher runs without gradients, in bf16 on GPUs (float32 on CPUs), replicated on every rank. The KL is computed
in float32 a chunk of positions at a time, so no float32 (batch, sequence, vocab) tensor is made for it.
The cross-entropy is the model's own, so alpha = 0 is plain training exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ConfigError


def load_teacher(path: str | Path, device: torch.device):
    """Any causal LM from a Hugging Face folder, or an Argonne training checkpoint."""
    from .checkpoint import is_checkpoint

    path = Path(path)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if is_checkpoint(path):
        from .generate import load_model

        teacher, _ = load_model(path, str(device))
        teacher.to(dtype)
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
    teacher.eval().requires_grad_(False)
    return teacher


def check_vocabularies(teacher_path: Path, teacher_rows: int, student_rows: int, tokenizer) -> int:
    """The number of real tokens the distributions are taken over; raises on a true mismatch."""
    from .data import tokenizer_fingerprint

    real = len(tokenizer)
    problems = []
    if teacher_rows < real:
        problems.append(f"the teacher's output has {teacher_rows} rows for a {real}-token tokenizer")
    if student_rows < real:
        problems.append(f"the student's output has {student_rows} rows for a {real}-token tokenizer")
    if (teacher_path / "tokenizer_config.json").is_file() or (teacher_path / "tokenizer.json").is_file():
        from .tokenizer import load_tokenizer

        theirs = tokenizer_fingerprint(load_tokenizer(teacher_path))
        ours = tokenizer_fingerprint(tokenizer)
        if theirs["vocab_sha256"] != ours["vocab_sha256"]:
            problems.append(f"the teacher's tokenizer ({theirs['vocab_size']} tokens) is not the training "
                            f"tokenizer ({ours['vocab_size']} tokens)")
    if problems:
        raise ConfigError("teacher and student vocabularies do not match: " + "; ".join(problems))
    return real


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                    vocab: int, temperature: float, chunk: int) -> torch.Tensor:
    """Mean over scored positions (targets != -100) of KL(teacher_T || student_T), in float32 chunks."""
    scored = targets != -100
    total = student_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, student_logits.shape[1], chunk):
        s = (student_logits[:, start:start + chunk, :vocab].float() / temperature).log_softmax(-1)
        t = (teacher_logits[:, start:start + chunk, :vocab].float() / temperature).log_softmax(-1)
        kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)  # (B, chunk)
        total = total + (kl * scored[:, start:start + chunk]).sum()
    return total / scored.sum().clamp(min=1)


class DistillationObjective:
    """The training step's loss for `argonne distill`; returns (loss, {"kl": ..., "ce": ...})."""

    def __init__(self, teacher, vocab: int, alpha: float, temperature: float, chunk: int = 512):
        if not 0 <= alpha <= 1:
            raise ConfigError(f"distill.alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ConfigError(f"distill.temperature must be > 0, got {temperature}")
        self.teacher, self.vocab, self.alpha, self.temperature, self.chunk = teacher, vocab, alpha, temperature, chunk

    def __call__(self, model, inputs: torch.Tensor, targets: torch.Tensor):
        # The KL needs the student's logits, so they are made whole here (not through the chunked training loss).
        logits = model(inputs, use_cache=False).logits
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        with torch.no_grad():
            teacher_logits = self.teacher(inputs, use_cache=False).logits
        kl = distillation_kl(logits, teacher_logits, targets, self.vocab, self.temperature, self.chunk)
        loss = self.alpha * self.temperature**2 * kl + (1 - self.alpha) * ce
        return loss, {"kl": kl.detach(), "ce": ce.detach()}
