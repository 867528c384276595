"""Sampling: the request's settings, the one batched sampler, and what a finished request returns.

`sample` chooses one token per row of a batch, each row by its own request's settings (temperature, top-k, top-p,
repetition penalty) and its own random generator: the draw is the exponential race (the argmax of probabilities over
Exp(1) noise, as likely as torch.multinomial) with each row's noise from its row's generator, so a seeded request
makes the same tokens whatever shares its batch. Defaults are the original Argonne code's: temperature 0.8, top-k
50, top-p 0.95; temperature 0 is greedy.

A row whose logits hold NaN or Inf gets NON_FINITE instead of a token (`flag_non_finite`): the flag is made on the
device with the chosen tokens, which the host reads anyway, so checking costs no synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..loading import ModelError


class NonFiniteLogits(ModelError):
    """The model's logits held NaN or Inf: there is no next token to choose, so decoding, serving and scoring end
    with this error instead of text (the argmax of NaNs would be token 0 or an EOS: an empty answer)."""

    def __init__(self):
        super().__init__("the model produced non-finite logits (NaN or Inf) — its weights or activations "
                         "overflowed, so there is no text to give. In float16, try bfloat16 or float32; otherwise "
                         "the model is broken: retrain it or restore an earlier checkpoint")


NON_FINITE = -1
"""The token chosen for a row whose logits hold NaN or Inf (`flag_non_finite`)."""


def flag_non_finite(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """tokens (B,) with NON_FINITE where the row of logits (B, V) holds NaN or Inf. Give it the model's logits, not
    filtered ones (top-k and top-p set -inf on purpose)."""
    return tokens.masked_fill(~torch.isfinite(logits).all(dim=-1), NON_FINITE)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.8
    """0 decodes greedily."""
    top_k: int = 50
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 0.95
    """Keep the smallest set of tokens whose probability reaches top_p (1.0: all)."""
    repetition_penalty: float = 1.0
    """> 1 makes tokens already in the prompt or the output less likely (CTRL's rule)."""
    stop: Sequence[str] = field(default_factory=tuple)
    """Strings that end a sequence; the text is cut before them."""
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    """Tokens that end a sequence besides the model's EOS (e.g. a chat template's end of turn)."""
    seed: int | None = None

    def validate(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not isinstance(stop, str) or not stop for stop in self.stop):
            problems.append(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        """Whether the token is the argmax of the model's logits (the step makes it: nothing to sample)."""
        return self.temperature == 0 and self.repetition_penalty == 1.0


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (its raw logits: before temperature, top-k/p and the
    repetition penalty, as vLLM and OpenAI report them), and the `top` most likely tokens at that step."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Completion:
    """What one request made."""

    text: str
    """The continuation, cut at EOS or before a stop string."""
    token_count: int
    """Tokens the model made for this request, counting the one that ended it (an EOS or stop token, or the token
    that completed a stop string), as vLLM counts."""
    finish_reason: str
    """"stop" (EOS, a stop token or a stop string), "length" (max_new_tokens made), "cancelled" or "error"."""
    logprobs: list[TokenLogprob] | None = None
    """With `top_logprobs`: one entry per generated token but an ending EOS or stop token."""
    error: Exception | None = None
    """With finish_reason "error", its cause where the engine knows it (NonFiniteLogits)."""
    token_ids: list[int] = field(default_factory=list, compare=False)
    """The tokens made, an ending EOS or stop token left out."""
    score: tuple[float, bool] | None = None
    """A scoring request's result (finish reason "scored"): the summed log-probability of its scored tokens, each
    given the tokens before it, and whether each was the most likely token (greedy decoding would make them)."""


def argmax_in_pieces(logits: torch.Tensor, pieces: int = 128) -> torch.Tensor:
    """`logits.argmax(-1)` (the first index of the maximum, NaN counted as the maximum) for logits (B, V), computed as
    the maxima of `pieces` slices of each row, then the best slice. Inductor gives an argmax one program per row,
    which at batch 1 walks the 151,936 logits on one GPU multiprocessor; slices spread it over `pieces`."""
    size = logits.shape[-1]
    piece = -(-size // pieces)
    padded = torch.nn.functional.pad(logits, (0, piece * pieces - size), value=-math.inf)
    maxima, index_in_piece = padded.unflatten(-1, (pieces, piece)).max(dim=-1)
    best_piece = maxima.argmax(dim=-1, keepdim=True)
    return (index_in_piece.gather(-1, best_piece) + best_piece * piece).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor | float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool; penalty a number or (B, 1). Positive logits of seen tokens are divided by the
    penalty, negative ones multiplied, so a seen token always becomes less likely (as transformers does)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sets logits (B, V) outside each row's top-k (B, 1; 0 or V: all) and top-p nucleus (B, 1) to -inf; the most
    likely token always remains."""
    vocab = logits.shape[-1]
    ordered, order = logits.sort(dim=-1, descending=True)
    top_k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    kth = ordered.gather(1, top_k - 1)
    logits, ordered = logits.masked_fill(logits < kth, -math.inf), ordered.masked_fill(ordered < kth, -math.inf)
    probs = ordered.softmax(dim=-1)
    # A token is dropped when those before it already reach top_p (a top_p below float32's smallest value would
    # compare 0 >= 0: the first is kept whatever).
    drop_ordered = (probs.cumsum(dim=-1) - probs) >= top_p
    drop_ordered[:, 0] = False
    return logits.masked_fill(torch.zeros_like(drop_ordered).scatter(1, order, drop_ordered), -math.inf)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator],
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from float logits (B, V), row b by params[b] and generators[b]: repetition penalty (over
    `seen` (B, V), the tokens of its prompt and output), temperature (0: argmax), top-k, top-p, then a draw;
    NON_FINITE for a row whose logits hold NaN or Inf."""
    device, vocab = logits.device, logits.shape[-1]

    def column(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype, device=device)[:, None]

    finite = torch.isfinite(logits).all(dim=-1, keepdim=True)
    raw = logits
    logits = torch.where(finite, logits, 0.0)  # a broken row draws from zeros (its draw is replaced below)
    if seen is not None and any(p.repetition_penalty != 1.0 for p in params):
        logits = apply_repetition_penalty(logits, seen, column([p.repetition_penalty for p in params]))
    greedy = column([p.temperature == 0 for p in params], torch.bool)[:, 0]
    scaled = logits / column([p.temperature or 1.0 for p in params])
    probs = filter_logits(scaled, column([min(p.top_k, vocab) for p in params], torch.long),
                          column([p.top_p for p in params])).softmax(dim=-1)
    noise = torch.stack([torch.empty(vocab, device=device).exponential_(generator=g) for g in generators])
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # a draw of 0 would make 0 / 0 = NaN, which argmax picks
    chosen = torch.where(greedy, logits.argmax(dim=-1), (probs / noise).argmax(dim=-1))
    return flag_non_finite(chosen, raw)
