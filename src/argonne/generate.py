"""Text generation: a preallocated KV cache, prefill through SDPA, and a decode step that is compiled on GPUs.

`Generator` holds one static cache (kv_cache.py: keys and values for every layer, batch x max_len) and decodes a batch
of left-padded prompts: one prefill forward over the prompts, then one forward per new token for the whole batch. The
attention mask spans the whole cache (the cache makes it), so the decode step has fixed shapes: it compiles once
and, on GPUs, is captured as one CUDA graph (`DecodeStep`). Sampling defaults are the original Argonne code's:
temperature 0.8, top-k 50, top-p 0.95; temperature 0 is greedy.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .kv_cache import StaticKVCache
from .loading import ModelError
from .modeling_argonne import ArgonneForCausalLM


class NonFiniteLogits(ModelError):
    """The model's logits held NaN or Inf: there is no next token to choose, so decoding, serving and scoring end
    with this error instead of text (the argmax of NaNs would be token 0 or an EOS: an empty answer)."""

    def __init__(self):
        super().__init__("the model produced non-finite logits (NaN or Inf) — its weights or activations "
                         "overflowed, so there is no text to give. In float16, try bfloat16 or float32; otherwise "
                         "the model is broken: retrain it or restore an earlier checkpoint")


NON_FINITE = -1
"""The token a decoding step chooses for a row whose logits hold NaN or Inf (`flag_non_finite`)."""


def flag_non_finite(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """tokens (B,) with NON_FINITE where the row of logits (B, V) holds NaN or Inf. Made on the device beside the
    tokens, the flag reaches the host in the copy of the tokens it reads anyway: no synchronisation of its own.
    Give it the model's logits, not filtered ones (top-k and top-p set -inf on purpose)."""
    return tokens.masked_fill(~torch.isfinite(logits).all(dim=-1), NON_FINITE)


def refuse_non_finite(tokens: torch.Tensor | Sequence[int]) -> None:
    """Raise NonFiniteLogits if a token the host has read is NON_FINITE."""
    if NON_FINITE in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens):
        raise NonFiniteLogits()


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
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Completion:
    """What one prompt's generation made."""

    text: str
    """The continuation, cut at EOS or before a stop string."""
    token_count: int
    """Tokens the model made for this row, counting the one that ended it (an EOS or stop token, or the token that
    completed a stop string), as vLLM counts; not the tokens a batch goes on making after the row has ended."""
    finish_reason: str
    """"stop" (EOS, a stop token or a stop string), "length" (max_new_tokens made) or "cancelled" (`should_stop`)."""
    logprobs: list[TokenLogprob] | None = None
    """With the engine's `top_logprobs`: one entry per generated token but an ending EOS or stop token."""
    error: Exception | None = None
    """With finish_reason "error", its cause where the engine knows it (NonFiniteLogits)."""


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (its raw logits: before temperature, top-k/p and the
    repetition penalty, as vLLM and OpenAI report them), and the `top` most likely tokens at that step."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool. Positive logits of seen tokens are divided by the penalty, negative ones
    multiplied, so a seen token always becomes less likely (as transformers does)."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits (B, V) outside the top-k and the top-p nucleus to -inf; at least one token always remains."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the most likely token is always kept.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[..., 0] = False  # (a top_p below float32's smallest value would compare 0 >= 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row (B,) from float logits (B, V); NON_FINITE for a row whose logits hold NaN or Inf."""
    if params.temperature == 0:
        return flag_non_finite(logits.argmax(dim=-1), logits)
    finite = torch.isfinite(logits).all(dim=-1, keepdim=True)
    # A broken row draws from zeros instead (torch.multinomial refuses NaN); its draw is replaced by NON_FINITE.
    filtered = filter_logits(torch.where(finite, logits, 0.0) / params.temperature, params.top_k, params.top_p)
    drawn = torch.multinomial(filtered.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    return drawn.masked_fill(~finite[:, 0], NON_FINITE)


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


FINISHED_CHECK_EVERY = 16


class DecodeStep:
    """The one-token forward over a static cache with its inputs in fixed buffers: the tokens to feed (B, 1), the cache
    column they go to (the cache's `write_positions`), per-row position offsets, and which cache columns hold real
    tokens. With `graph` (CUDA) the step is captured once as a CUDA graph and replayed for every token: one launch
    from the host per token instead of hundreds.

    The step keeps its own books, inside the graph: it records the tokens it is fed in `tokens_at` (B, max_len) at
    their cache column, feeds back its greedy choice as the next step's tokens and moves to the next column. Greedy
    decoding then costs the host nothing per token but the launch; sampling overwrites the fed tokens (`feed`)."""

    def __init__(self, forward: Callable, cache: StaticKVCache, graph: bool):
        batch, device = cache.batch, cache.device
        self.forward, self.cache, self.graph = forward, cache, graph
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.position_offset = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.valid = torch.zeros((batch, cache.max_len), dtype=torch.bool, device=device)
        self.tokens_at = torch.zeros((batch, cache.max_len), dtype=torch.long, device=device)
        self._captured: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None

    def start(self, valid: torch.Tensor, last_positions: torch.Tensor, width: int, first_tokens: torch.Tensor) -> None:
        """A new generation: prompts occupy columns 0..width-1 (valid marks real tokens), last_positions (B, 1); the
        first new tokens (B,) go to column `width`."""
        self.valid.copy_(valid)
        self.position_offset.copy_(last_positions + 1 - width)
        self.column.fill_(width)
        self.feed(first_tokens)
        self.cache.write_positions = self.column

    def feed(self, tokens: torch.Tensor) -> None:
        """The tokens (B,) the next step decodes, in place of the step's greedy choice."""
        self.tokens.copy_(tokens[:, None])

    def __call__(self) -> torch.Tensor:
        """Decodes the fed tokens: float32 logits (B, V); their argmax becomes the next fed tokens. The returned
        tensor is overwritten by the next call when graphed."""
        if not self.graph:
            return self._run()
        if self._captured is None:
            self._capture()
        self._captured.replay()
        return self._logits

    def record(self) -> None:
        """Records the fed tokens at their column without decoding them (the generation's last tokens)."""
        self.tokens_at.index_copy_(1, self.column, self.tokens)

    def _run(self) -> torch.Tensor:
        self.record()
        logits, greedy = self.forward(self.cache, self.tokens, self.position_offset, self.column, self.valid)
        self.tokens.copy_(greedy[:, None])
        self.column.add_(1)
        return logits

    def _capture(self) -> None:
        # Warm-up runs (compilation, library handles) on a side stream, as CUDA graph capture requires. They compute
        # this very step (from the same fed tokens and column), so the keys and values they write are the right ones.
        tokens, column = self.tokens.clone(), self.column.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run()
                self.tokens.copy_(tokens)
                self.column.copy_(column)
        torch.cuda.current_stream().wait_stream(stream)
        self._captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._captured):
            self._logits = self._run()


# What decodes one token at a time: "torch" (cuBLAS matmuls and SDPA), "gemv" (our Triton matrix-vector kernels,
# decode_kernels.py) or "gemv+attention" (and our Triton decode attention). Batches of several rows and prefill always
# use "torch"'s. On GPUs the default is CUDA_DEFAULT_KERNELS when Triton is installed; elsewhere "torch".
# "gemv" on an H200, 0.5B shape, batch 1: 1,022 tokens/s against torch's 851 (966 against 767 after a 3,072-token
# prompt). "gemv+attention" measured 1,190 but is not the default until its GPU tests have run (README).
DECODE_KERNELS = ("torch", "gemv", "gemv+attention")
CUDA_DEFAULT_KERNELS = "gemv"


def default_kernels(device: torch.device) -> str:
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return CUDA_DEFAULT_KERNELS
    return "torch"


def prepare_for_inference(model: ArgonneForCausalLM, kernels: str | None) -> str:
    """Merges the model's projections in place and puts the decode kernels (DECODE_KERNELS; None: the device's
    default) in; returns the kernels' name."""
    device = next(model.parameters()).device
    kernels = kernels or default_kernels(device)
    if kernels not in DECODE_KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(DECODE_KERNELS)}; got {kernels!r}")
    if kernels != "torch" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"kernels {kernels!r} are Triton kernels for CUDA GPUs; the model is on {device} "
                         "(on CPUs they run only under Triton's interpreter, TRITON_INTERPRET=1, for tests)")
    model.merge_projections()
    if kernels != "torch":
        from .decode_kernels import use_gemv_kernels

        use_gemv_kernels(model, attention=kernels == "gemv+attention")
    return kernels


class Generator:
    """Batched generation with a static KV cache. `compile` defaults to True on CUDA (the decode step becomes one
    CUDA graph) and False on CPUs, where compiling costs more than a short generation saves.

    The model is prepared for inference in place: its q/k/v and gate/up projections are merged
    (`merge_projections`, same results, fewer matmuls), and with `kernels` other than "torch" (DECODE_KERNELS)
    one-row decoding runs on the Triton kernels of decode_kernels.py. Do not train or save the model afterwards.
    """

    def __init__(self, model: ArgonneForCausalLM, tokenizer, compile: bool | None = None, kernels: str | None = None):
        self.kernels = prepare_for_inference(model, kernels)
        device = next(model.parameters()).device
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.config = model.config
        self.eos_ids = sorted({i for i in (self.config.eos_token_id, tokenizer.eos_token_id) if i is not None})
        compile = self.device.type == "cuda" if compile is None else compile
        self._decode_forward = self._decode_logits
        if compile:
            self._decode_forward = torch.compile(self._decode_logits, fullgraph=True)
        self._graphs = compile and self.device.type == "cuda"
        self._cache: StaticKVCache | None = None
        self._decode: DecodeStep | None = None

    def _cache_for(self, batch: int, max_len: int) -> StaticKVCache:
        # Reuse the cache (and so the compiled graph) while the shape fits; sizes are rounded up to reuse more.
        max_len = min(self.config.max_position_embeddings, -(-max_len // 256) * 256)
        cache = self._cache
        if cache is None or cache.batch != batch or cache.max_len != max_len:
            cache = self._cache = StaticKVCache(self.config, batch, max_len, self.device, self.dtype)
            self._decode = DecodeStep(self._decode_forward, cache, self._graphs)
        cache.length = 0
        return cache

    def _last_logits(self, cache, tokens, positions, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits (B, V) of the last column only (every left-padded prompt ends there), and their argmax:
        greedy decoding's next tokens (NON_FINITE for a row of NaN or Inf), made in the same compiled step."""
        logits = self.model(tokens, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                            logits_to_keep=1).logits[:, -1].float()
        return logits, flag_non_finite(argmax_in_pieces(logits), logits)

    def _decode_logits(self, cache, tokens, position_offset, column, valid):
        """The decode step (DecodeStep's buffers): the mask (the cache's `decode_mask`, in the model's dtype) and
        positions for cache column `column` are made here, in the compiled step, then the logits of the new tokens."""
        mask = cache.decode_mask(column, valid, self.dtype)
        # A NON_FINITE token is fed as token 0, a valid index (on GPUs -1 would be a device-side assert); the host
        # raises once it reads the flag.
        return self._last_logits(cache, tokens.clamp(min=0), position_offset + column, mask)

    @torch.no_grad()
    def generate_ids(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams,
        on_tokens: Callable[[torch.Tensor], bool] | None = None,
    ) -> list[list[int]]:
        """New token ids per prompt (without the prompt; EOS and what follows are left out).

        `on_tokens(tokens)` is called after every step with the (B,) new tokens (a row that has made its EOS goes on
        making tokens that are not part of its output: ignore a row's tokens after its first EOS); returning True from
        it finishes every row (stop strings and streaming use this).

        Logits holding NaN or Inf raise NonFiniteLogits: at the step that made them when `on_tokens` is given, else
        at the end.
        """
        params.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        batch, width = len(prompts), max(len(p) for p in prompts)
        limit = self.config.max_position_embeddings
        if width + params.max_new_tokens > limit:
            raise ValueError(
                f"prompt ({width} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the context "
                f"window ({limit} tokens)"
            )
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        cache = self._cache_for(batch, width + params.max_new_tokens)
        device, L = self.device, cache.max_len

        # Left padding: every prompt ends at column width - 1; pad keys are masked out, positions count real tokens.
        tokens = torch.zeros((batch, width), dtype=torch.long, device=device)
        valid = torch.zeros((batch, L), dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, width - len(prompt):] = torch.tensor(list(prompt), device=device)
            valid[row, width - len(prompt): width] = True
        valid[:, width:] = True
        positions = (valid[:, :width].long().cumsum(-1) - 1).clamp(min=0)

        # Prefill: queries at columns 0..width-1 see valid keys up to themselves (and always themselves).
        cache.write_positions = torch.arange(width, device=device)
        logits, greedy = self._last_logits(cache, tokens, positions, cache.prefill_mask(valid, width))
        cache.length = width

        seen = torch.zeros((batch, self.config.vocab_size), dtype=torch.bool, device=device)
        if params.repetition_penalty != 1.0:
            seen.scatter_(1, tokens, valid[:, :width])
        eos_ids = self._eos_ids(params)
        greedy_only = params.temperature == 0 and params.repetition_penalty == 1.0
        decode = self._decode
        new = greedy  # the prefill's choice; later greedy steps feed their choice to the next inside the step
        for step in range(params.max_new_tokens):
            column = width + step
            if not greedy_only:
                logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
                new = sample_next(logits, params, generator)
            if step == 0:
                decode.start(valid, positions[:, -1:], width, new)
            elif not greedy_only:
                decode.feed(new)
            # The host reads this step's tokens (streaming, stop strings) through a copy queued before the next
            # decoding step, which runs while the host prints; a step queued after the end is merely unused.
            copied = _copy_to_host(decode.tokens[:, 0]) if on_tokens else None
            last = step + 1 == params.max_new_tokens
            if last:
                decode.record()
            else:
                if params.repetition_penalty != 1.0:
                    seen.scatter_(1, new.clamp(min=0)[:, None], True)
                logits = decode()
                cache.length = column + 1
            stop_all = on_tokens(_checked(_wait(*copied))) if on_tokens else False
            if stop_all or last or self._all_rows_ended(step, decode.tokens_at[:, width: column + 1], eos_ids):
                break
        generated = decode.tokens_at[:, width: column + 1].tolist()
        for row in generated:
            refuse_non_finite(row)
        return [_cut_at_eos(row, eos_ids) for row in generated]

    @staticmethod
    def _all_rows_ended(step: int, new_tokens: torch.Tensor, eos_ids: list[int]) -> bool:
        """Whether every row has made an EOS. Looking waits for the device, so it is done every FINISHED_CHECK_EVERY
        steps, letting the host queue decoding steps ahead of the GPU; the few extra tokens a finished batch may make
        are cut off after the EOS. (Stop strings and streaming end a finished batch through `on_tokens`.)"""
        if not eos_ids or (step + 1) % FINISHED_CHECK_EVERY:
            return False
        eos = torch.tensor(eos_ids, device=new_tokens.device)
        return bool(torch.isin(new_tokens, eos).any(dim=1).all())

    def _eos_ids(self, params: SamplingParams) -> list[int]:
        return sorted(set(self.eos_ids) | set(params.stop_token_ids))

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[str]:
        """The continuation of each prompt (batched), cut at EOS or a stop string."""
        return self._run([self._encode(p) for p in prompts], params, stream=None)

    def stream(self, prompt: str, params: SamplingParams, write: Callable[[str], None]) -> str:
        """Generate for one prompt, calling `write` with each new piece of text as it is made."""
        return self.stream_ids(self._encode(prompt), params, write)

    def stream_ids(self, prompt_ids: Sequence[int], params: SamplingParams, write: Callable[[str], None]) -> str:
        return self._run([prompt_ids], params, stream=write)[0]

    def complete_ids(
        self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams,
        write: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
    ) -> list[Completion]:
        """Each prompt's continuation with its token count and finish reason (batched). `write` receives row 0's text
        as it is made; `should_stop()` is asked after every token, and True ends the generation there (a client
        that went away), its unfinished rows "cancelled"."""
        rows = StopStrings(self.tokenizer, len(prompt_ids), params.stop, self._eos_ids(params), write)
        cancelled = False

        def on_tokens(new: torch.Tensor) -> bool:
            nonlocal cancelled
            if rows.add(new):
                return True
            cancelled = should_stop is not None and should_stop()
            return cancelled

        self.generate_ids(prompt_ids, params, on_tokens=on_tokens)
        return rows.completions(unfinished_reason="cancelled" if cancelled else "length")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _run(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, stream) -> list[str]:
        return [completion.text for completion in self.complete_ids(prompt_ids, params, write=stream)]


def _copy_to_host(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A copy of `tokens` on the host, and on GPUs the event that marks it done: queued now, the copy does not wait
    for the work queued after it."""
    if tokens.device.type != "cuda":
        return tokens.clone(), None
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _wait(host: torch.Tensor, done: torch.cuda.Event | None) -> torch.Tensor:
    if done is not None:
        done.synchronize()
    return host


def _checked(tokens: torch.Tensor) -> torch.Tensor:
    refuse_non_finite(tokens)
    return tokens


def _cut_at_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:index]
    return tokens


class StopStrings:
    """Follows each row's text as tokens arrive: ends a row at EOS or at the first stop string (cut before it), and
    streams text for row 0 when asked.

    Text is detokenized incrementally, as text-generation-inference and vLLM do: each new token is decoded together
    with the tokens of the previous step's piece as context, and the text it adds is appended. Re-decoding the
    whole row cost O(length) per token (1.3 ms at 4,000 Qwen tokens on one CPU core: slower than the GPU makes
    tokens); the context keeps tokenizers that drop a word's leading space at the start of a decode (SentencePiece)
    exact. A piece that ends in half a UTF-8 character waits for the token that completes it."""

    def __init__(self, tokenizer, rows: int, stop: Sequence[str], eos_ids: list[int], stream=None):
        self.tokenizer, self.stop, self.eos_ids, self.stream = tokenizer, list(stop), eos_ids, stream
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.texts = [""] * rows
        self.done = [False] * rows
        # Per row: every token made until the row ended, the ending one included (an EOS is not in `tokens`).
        self.token_counts = [0] * rows
        self.finish_reasons: list[str | None] = [None] * rows
        # Per row: the context tokens start at context_start, the tokens not yet turned into text at read_from.
        self.context_start = [0] * rows
        self.read_from = [0] * rows
        self.streamed = 0

    def add(self, new: torch.Tensor | Sequence[int]) -> bool:
        """Takes each row's next token (B,); True once every row has ended."""
        for row, token in enumerate(new.tolist() if isinstance(new, torch.Tensor) else new):
            if self.done[row]:
                continue
            self.token_counts[row] += 1
            if token in self.eos_ids:
                self.finish_reasons[row] = "stop"
                self._end(row)
                continue
            self.tokens[row].append(token)
            self._append(row, self._new_text(row, final=False))
        if self.stream is not None:
            self._emit(final=False)
        return all(self.done)

    def _new_text(self, row: int, final: bool) -> str:
        tokens, start, read = self.tokens[row], self.context_start[row], self.read_from[row]
        if read == len(tokens):
            return ""
        context = self.tokenizer.decode(tokens[start:read], skip_special_tokens=True)
        text = self.tokenizer.decode(tokens[start:], skip_special_tokens=True)
        if len(text) <= len(context) or (text.endswith("\ufffd") and not final):
            return ""
        self.context_start[row], self.read_from[row] = read, len(tokens)
        return text[len(context):]

    def _append(self, row: int, piece: str) -> None:
        if not piece:
            return
        text = self.texts[row] + piece
        for stop in self.stop:  # only where the new piece can complete a stop string
            at = text.find(stop, max(0, len(self.texts[row]) - len(stop) + 1))
            if at >= 0:
                text, self.done[row], self.finish_reasons[row] = text[:at], True, "stop"
        self.texts[row] = text

    def _end(self, row: int) -> None:
        """The row is finished: text still held back (half a character at the end) is added as it decodes."""
        self._append(row, self._new_text(row, final=True))
        self.done[row] = True

    def _emit(self, final: bool) -> None:
        text = self.texts[0]
        # Hold back the end of the text while it may be the start of a stop string.
        safe = len(text)
        if not final and not self.done[0]:
            for stop in self.stop:
                for size in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:size]):
                        safe -= size
                        break
        if safe > self.streamed:
            self.stream(text[self.streamed:safe])
            self.streamed = safe

    def finish(self) -> list[str]:
        return [completion.text for completion in self.completions()]

    def completions(self, unfinished_reason: str = "length") -> list[Completion]:
        """Ends the rows still going (the generation stopped before their EOS: `unfinished_reason`) and returns
        each row's text, token count and finish reason."""
        for row, done in enumerate(self.done):
            if not done:
                self.finish_reasons[row] = unfinished_reason
                self._end(row)  # may still find a stop string in the text held back, and say "stop"
        if self.stream is not None:
            self._emit(final=True)
        return [Completion(text, count, reason)
                for text, count, reason in zip(self.texts, self.token_counts, self.finish_reasons)]


def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    """--prompt, else one prompt per non-empty line of --prompt-file, else stdin."""
    if prompt is not None:
        return [prompt]
    text = Path(prompt_file).read_text() if prompt_file else sys.stdin.read()
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompt given ({'file ' + prompt_file if prompt_file else 'stdin'} is empty)")
    return prompts

