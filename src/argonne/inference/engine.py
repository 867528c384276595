"""The engine: every decoding in Argonne — `generate`, `chat`, `serve`, lm-eval's generation, training samples.

Requests wait in a queue (`submit`; a full queue raises QueueFull). Each `step` retires cancelled requests, admits
waiting ones (scheduler.py: a batch row each and KV blocks for their prompts, a cached prefix taken rather than
prefilled again), prefills up to `prefill_chunk` prompt tokens of several prompts in one forward, then decodes one
token for every running sequence in one forward (runner.py: a captured CUDA graph per batch bucket on GPUs), and
retires every sequence the step it ends.

Each sequence keeps its own sampling settings, stop strings, token limit and random generator (seeded from its
`seed`, or at random), and rows are sampled independently (sampling.py): a seeded request makes the same tokens
whatever shares its batch. Greedy rows take the argmax made inside the step.

The engine runs in a thread of its own for the server (`start`, `shutdown`), or in the caller's thread for a batch
(`complete`, `stream`). Callers hear of each request through its `sink`, called from the engine's thread with an
`Update` per token and a last one carrying the Completion.

A row whose logits hold NaN or Inf ends its request alone: finish reason "error", the Completion's `error` a
NonFiniteLogits (`complete` and `stream` raise it).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..modeling_argonne import ArgonneForCausalLM
from .kv_cache import BLOCK_SIZE, BlockPool, PagedKVCache
from .runner import ModelRunner
from .sampling import NON_FINITE, Completion, NonFiniteLogits, SamplingParams, TokenLogprob, flag_non_finite, sample
from .scheduler import Preempted, Scheduler
from .scheduler import Sequence as _Sequence
from .text import StopStrings

log = logging.getLogger(__name__)

GIB = 1 << 30
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
TOKEN_WINDOW = 60.0  # seconds of token counts kept for tokens_per_second


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests: come back later (`retry_after` seconds is a fair guess)."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: its queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass
class EngineSettings:
    max_batch: int = 16
    """Most sequences decoding together (the batch rows)."""
    max_len: int | None = None
    """Longest sequence, prompt and completion together; None: the model's context."""
    kv_cache_memory: float | None = None
    """GiB for the keys and values of all sequences; None: enough for `max_batch` sequences of `max_len` tokens."""
    max_queue: int = 256
    """Most requests waiting; past it `submit` raises QueueFull (the server's 429)."""
    prefill_chunk: int = 512
    """Most prompt tokens prefilled between two decode steps."""
    prefix_caching: bool = True
    """Whether a prompt's blocks already in the cache (the same tokens after the same prefix) are taken rather than
    prefilled again."""
    block_size: int = BLOCK_SIZE
    """Tokens per KV cache block."""

    def check(self) -> None:
        problems = [f"{name} must be an integer >= 1, got {getattr(self, name)!r}"
                    for name in ("max_batch", "max_queue", "prefill_chunk", "block_size")
                    if not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 2):
            problems.append(f"max_len must be an integer >= 2, got {self.max_len!r}")
        if self.kv_cache_memory is not None and not (math.isfinite(self.kv_cache_memory)
                                                     and self.kv_cache_memory > 0):
            problems.append(f"kv_cache_memory must be a number of GiB > 0, got {self.kv_cache_memory!r}")
        if problems:
            raise ValueError("engine settings: " + "; ".join(problems))


def plan_memory(config, settings: EngineSettings, dtype: torch.dtype) -> tuple[int, int, int]:
    """(batch rows, max_len, KV blocks): `max_batch` rows; blocks for `max_batch` sequences of `max_len` tokens, or
    as many as `kv_cache_memory` holds (at least one sequence of `max_len` tokens)."""
    settings.check()
    context = config.max_position_embeddings
    max_len = settings.max_len or context
    if max_len > context:
        raise ValueError(f"max_len {max_len} is longer than the model's context ({context} tokens)")
    size = settings.block_size
    per_sequence = -(-max_len // size)
    blocks = settings.max_batch * per_sequence
    if settings.kv_cache_memory is not None:
        per_block = PagedKVCache.bytes_per_block(config, size, dtype)
        blocks = int(settings.kv_cache_memory * GIB // per_block)
        if blocks < per_sequence:
            raise ValueError(f"a KV cache of {settings.kv_cache_memory:g} GiB holds no sequence of max_len: one of "
                             f"{max_len} tokens takes {per_sequence * per_block / GIB:.3f} GiB; give more memory or "
                             "a shorter max length")
    return settings.max_batch, max_len, blocks


@dataclass
class Update:
    """What one step did for a request: the text it adds (held back while it may be the start of a stop string),
    the logprobs of its new token (when asked), and on the last update the whole Completion."""

    text: str
    logprobs: list[TokenLogprob]
    completion: Completion | None = None


@dataclass
class Timing:
    """A finished request's times, in seconds: waiting for a row, to its first token, and per later token."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    queued: float
    time_to_first_token: float | None
    time_per_output_token: float | None


@dataclass
class EngineRequest:
    prompt: Sequence[int]
    params: SamplingParams
    top_logprobs: int | None = None
    """None: no logprobs; k >= 0: each token's logprob and the k most likely tokens'."""
    sink: Callable[[Update], None] | None = None
    """Called from the engine's thread for every token and at the end: keep it quick."""
    score: int = 0
    """> 0: generate nothing; score the prompt's last `score` tokens instead (lm-eval's loglikelihood), in the
    Completion's `score`. The prompt's earlier blocks come from the prefix cache like any prompt's."""


class Handle:
    """A submitted request: `cancel()` ends it at the next step (finish reason "cancelled"); `wait()` returns its
    Completion once it has ended."""

    def __init__(self, sequence: _Sequence, engine: Engine):
        self._sequence, self._engine = sequence, engine

    def cancel(self) -> None:
        self._sequence.cancelled = True
        self._engine._notify()

    def wait(self, timeout: float | None = None) -> Completion | None:
        self._sequence.ended.wait(timeout)
        return self._sequence.completion

    @property
    def completion(self) -> Completion | None:
        return self._sequence.completion


class Engine:
    """Continuous batching on one model (see the module's docstring). The model is prepared for inference in place
    (runner.py), unless `prepare` is False (a model borrowed from training: left as it is, not compiled)."""

    def __init__(self, model: ArgonneForCausalLM, tokenizer, settings: EngineSettings | None = None,
                 compile: bool | None = None, kernels: str | None = None, prepare: bool = True):
        self.settings = settings or EngineSettings()
        self.config = model.config
        dtype = next(model.parameters()).dtype
        self.slots, self.max_len, blocks = plan_memory(self.config, self.settings, dtype)
        self.runner = ModelRunner(model, self.slots, self.max_len, blocks, self.settings.block_size,
                                  compile=compile, kernels=kernels, prepare=prepare)
        self.model, self.tokenizer, self.device = self.runner.model, tokenizer, self.runner.device
        self.kernels, self.compiled, self.buckets = self.runner.kernels, self.runner.compiled, self.runner.buckets
        self.blocks = BlockPool(blocks, self.settings.prefix_caching)
        self.scheduler = Scheduler(self.slots, self.blocks, self.settings.block_size, self.settings.prefill_chunk)
        self.eos_ids = sorted({i for i in (self.config.eos_token_id, getattr(tokenizer, "eos_token_id", None))
                               if i is not None})
        self.listeners: list[Callable[[Timing], None]] = []  # told of every request that ends (the server's metrics)
        self._seen = torch.zeros((self.slots, self.config.vocab_size), dtype=torch.bool, device=self.device)
        self._lock = threading.Condition()
        self._accepting, self._stopping, self._cancel_all = True, False, False
        self._thread: threading.Thread | None = None
        self._recent_seconds: collections.deque[float] = collections.deque(maxlen=64)
        self._token_times: collections.deque[tuple[float, int]] = collections.deque()  # the last TOKEN_WINDOW s
        self.generated_tokens = 0
        self.prompt_tokens = 0
        """Prompt tokens prefilled (those taken from the prefix cache not counted)."""

    # --- what callers see -------------------------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def active(self) -> int:
        """Sequences holding a batch row (prefilling or decoding)."""
        return self.slots - len(self.scheduler.free_rows)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Tokens generated per second over the last `window` seconds."""
        now = time.perf_counter()
        made = sum(count for at, count in list(self._token_times) if now - at <= window)
        return made / window if window <= TOKEN_WINDOW else math.nan

    def retry_after(self) -> int:
        """Seconds a refused client might wait: the queue ahead of it, at the recent pace of requests per row."""
        mean = sum(self._recent_seconds) / len(self._recent_seconds) if self._recent_seconds else 1.0
        return max(1, min(60, math.ceil(mean * (self.queue_length + 1) / self.slots)))

    def check(self, request: EngineRequest) -> None:
        """A request this engine can take: ValueError naming what it cannot."""
        request.params.validate()
        prompt = list(request.prompt)
        if not prompt:
            raise ValueError("the prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < self.config.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {self.config.vocab_size})")
        if request.score:
            if not isinstance(request.score, int) or not 0 < request.score < len(prompt):
                raise ValueError(f"score must be an integer in [1, {len(prompt) - 1}] (tokens after the first), "
                                 f"got {request.score!r}")
            if len(prompt) - 1 > self.max_len:  # (the last token is predicted, never an input)
                raise ValueError(f"the sequence to score ({len(prompt)} tokens) exceeds the engine's max length of "
                                 f"{self.max_len} tokens by more than the last")
        elif len(prompt) + request.params.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({request.params.max_new_tokens}) "
                             f"exceeds the engine's max length of {self.max_len} tokens")
        if request.top_logprobs is not None and not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {request.top_logprobs}")

    def submit(self, requests: Sequence[EngineRequest], queue_limit: bool = True) -> list[Handle]:
        """Queues the requests, all or none: QueueFull when the queue has no room for them all (with
        `queue_limit`), EngineStopped after `shutdown`, ValueError for a request the engine cannot take."""
        for request in requests:
            self.check(request)
        sequences = [self._sequence(request) for request in requests]
        leaders = {}
        for sequence in sequences:  # the same prompt more than once (n choices): prefilled once
            if sequence.score:
                continue
            first = leaders.setdefault(tuple(sequence.prompt), sequence)
            sequence.leader = first if first is not sequence else None
        with self._lock:
            if not self._accepting or (self._thread is not None and not self._thread.is_alive()):
                raise EngineStopped("the server is shutting down")
            waiting = self.scheduler.waiting
            # A request of more sequences than the queue holds (n choices) still enters an empty queue.
            if queue_limit and waiting and len(waiting) + len(sequences) > self.settings.max_queue:
                raise QueueFull(self.retry_after())
            waiting.extend(sequences)
            self._lock.notify()
        return [Handle(sequence, self) for sequence in sequences]

    def complete(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 top_logprobs: int | None = None) -> list[Completion]:
        """Each prompt's completion, batched continuously: in the engine's thread when it runs, else in this one.
        Non-finite logits in any row raise NonFiniteLogits."""
        handles = self.submit([EngineRequest(p, params, top_logprobs) for p in prompts], queue_limit=False)
        return self._wait_for(handles)

    def stream(self, prompt: Sequence[int], params: SamplingParams, write: Callable[[str], None]) -> Completion:
        """One prompt's completion, `write` called with each new piece of text as it is made (in this thread)."""
        handle = self.submit([EngineRequest(prompt, params, sink=lambda update: write(update.text))],
                             queue_limit=False)
        return self._wait_for(handle)[0]

    def score(self, sequences: Sequence[tuple[Sequence[int], int]]) -> list[tuple[float, bool]]:
        """For each (tokens, n): the summed log-probability of its last n tokens, each given the tokens before it, and
        whether each is the most likely token there (lm-eval's loglikelihood). Sequences that begin alike (few-shot
        examples, a question's context before each answer) share the blocks of their common prefix."""
        requests = [EngineRequest(tokens, SamplingParams(max_new_tokens=1), score=n) for tokens, n in sequences]
        return [completion.score for completion in self._wait_for(self.submit(requests, queue_limit=False))]

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[str]:
        """The continuation of each prompt text, cut at EOS or a stop string."""
        encoded = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        return [completion.text for completion in self.complete(encoded, params)]

    def _wait_for(self, handles: list[Handle]) -> list[Completion]:
        try:
            if self._thread is None:
                while not all(h.completion for h in handles):
                    self.step()
            completions = [handle.wait() for handle in handles]
            failed = next((c.error for c in completions if c.error is not None), None)
            if failed is not None:
                raise failed
            return completions
        except BaseException:  # (a failed step, Ctrl-C): none of them stays in the engine
            for handle in handles:
                handle.cancel()
            if self._thread is None:
                self._retire_cancelled()
            raise

    def warm_up(self) -> None:
        """Compiles (and on GPUs captures) the decode step of every batch bucket now, rather than when traffic
        first reaches each size and stalls every stream meanwhile."""
        with torch.no_grad(), self._on_device():
            self.runner.warm_up()

    @property
    def running(self) -> bool:
        """Whether the engine's own thread is serving."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._stopping:
            raise EngineStopped("this engine was shut down; make a new one")
        self._thread = threading.Thread(target=self._loop, name="argonne-engine", daemon=True)
        self._thread.start()

    def shutdown(self, cancel: bool = True, timeout: float | None = None) -> None:
        """Takes no new request; with `cancel` ends the queued and running ones ("cancelled") at the next step,
        else lets them finish; then stops the engine's thread."""
        with self._lock:
            self._accepting, self._stopping, self._cancel_all = False, True, cancel
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the loop ---------------------------------------------------------------------------------------------

    def _notify(self) -> None:
        with self._lock:
            self._lock.notify()

    def _has_work(self) -> bool:
        scheduler = self.scheduler
        return bool(scheduler.waiting or scheduler.prefilling or scheduler.running)

    def _loop(self) -> None:
        with self._on_device():
            while True:
                with self._lock:
                    while not self._has_work() and not self._stopping:
                        self._lock.wait()
                    if not self._has_work():
                        return
                try:
                    self.step()
                except Exception:  # a bug or out of memory: end what runs, keep serving
                    log.exception("engine step failed")
                    self._fail_all()

    def _on_device(self):
        """The model's GPU as the current device (CUDA streams and graphs are made on the current one)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def step(self) -> None:
        """One scheduling step: retire cancelled requests, admit waiting ones, prefill up to `prefill_chunk` prompt
        tokens, then decode one token for every running sequence."""
        with torch.no_grad(), self._on_device():
            self._retire_cancelled()
            with self._lock:
                admitted = self.scheduler.admit()
            for sequence in admitted:
                self._admitted(sequence)
            if self.scheduler.prefilling:
                self._clear_handed_out()
                self._prefill()
            if self.scheduler.running:
                self._decode()

    def _sequence(self, request: EngineRequest) -> _Sequence:
        seed = request.params.seed
        generator = torch.Generator(self.device)
        generator.manual_seed(random.getrandbits(63) if seed is None else seed)
        eos_ids = sorted(set(self.eos_ids) | set(request.params.stop_token_ids))
        sequence = _Sequence(request, eos_ids, generator)
        sequence.stop = StopStrings(self.tokenizer, 1, request.params.stop, eos_ids, stream=sequence.pieces.append)
        return sequence

    def _retire_cancelled(self) -> None:
        scheduler = self.scheduler
        with self._lock:
            cancelled = [s for s in scheduler.waiting if s.cancelled or self._cancel_all]
            for sequence in cancelled:
                scheduler.waiting.remove(sequence)
        for sequence in [*cancelled, *[s for s in scheduler.prefilling if s.cancelled or self._cancel_all],
                         *[s for s in scheduler.running.values() if s.cancelled or self._cancel_all]]:
            self._finish(sequence, "cancelled")

    def _admitted(self, sequence: _Sequence) -> None:
        """A sequence got a row: its table and its record of seen tokens (repetition penalty) follow it there."""
        self.runner.set_table(sequence.row, sequence.blocks)
        if sequence.params.repetition_penalty != 1.0:
            self._seen[sequence.row] = False
            self._seen[sequence.row, torch.tensor(sequence.tokens, device=self.device)] = True

    def _prefill(self) -> None:
        """Prefills the next chunks of the admitted prompts in one forward; a prompt's last chunk gives its first
        token (after a preemption, the token it had made), and it joins the decoding sequences."""
        scheduler = self.scheduler
        chunks = scheduler.prefill_chunks()
        if not chunks:
            return
        keep = max([1] + [start + count - max(start, s.first_logits) for s, start, count in chunks if s.score])
        logits = self.runner.prefill([(s.blocks, start, s.tokens[start:start + count]) for s, start, count in chunks],
                                     keep)
        done, rows_done = [], []
        for row, (sequence, start, count) in enumerate(chunks):
            sequence.prefilled += count
            self.prompt_tokens += count
            scheduler.register_full_blocks(sequence, sequence.prefilled)
            if sequence.score:
                self._score(sequence, logits[row], start, count)
                continue
            if sequence.prefilled < sequence.to_prefill:
                continue
            if sequence.made:  # prefilled again after a preemption: its next token is known
                scheduler.start_decoding(sequence)
                continue
            for follower in [sequence, *scheduler.followers(sequence)]:
                if follower is not sequence:
                    copy = scheduler.share_prefill(sequence, follower)
                    if copy is not None:
                        self.runner.cache.copy_block(*copy)
                    self.runner.set_table(follower.row, follower.blocks)
                scheduler.start_decoding(follower)
                done.append(follower)
                rows_done.append(row)
        if done:
            first = logits[torch.tensor(rows_done, device=self.device), -1]
            self._accept(done, first, first.argmax(dim=-1))

    def _score(self, sequence: _Sequence, logits: torch.Tensor, start: int, count: int) -> None:
        """Scores the tokens that this chunk's positions predict (logits (keep, V), the chunk's last positions);
        ends the request when its prefill is done."""
        end = start + count  # positions start..end-1 were run; position p predicts token p + 1
        first = max(start, sequence.first_logits)
        last = min(end, len(sequence.prompt) - 1)
        if first < last:
            rows = logits[logits.shape[0] - (end - first):logits.shape[0] - (end - last)]
            targets = torch.tensor(sequence.prompt[first + 1:last + 1], device=rows.device)
            logprobs = rows.log_softmax(dim=-1).gather(1, targets[:, None])[:, 0]
            greedy = rows.argmax(dim=-1) == targets
            sequence.scored += list(zip(logprobs.tolist(), greedy.tolist()))
        if sequence.prefilled < sequence.to_prefill:
            return
        # Summed in float32, as lm-eval's `hf` backend sums them (its results are what ours are compared with).
        total = float(torch.tensor([logprob for logprob, _ in sequence.scored], dtype=torch.float32).sum())
        if not math.isfinite(total):
            self._finish(sequence, "error", error=NonFiniteLogits())
            return
        self._finish(sequence, "scored", score=(total, all(greedy for _, greedy in sequence.scored)))

    def _decode(self) -> None:
        scheduler = self.scheduler
        for sequence in list(scheduler.running.values()):
            if sequence.row < 0:
                continue  # preempted for a sequence before it
            try:
                index = scheduler.block_for_next_token(sequence)
            except Preempted:
                continue
            if index is not None:
                self.runner.add_block(sequence.row, index, sequence.blocks[index])
        if not scheduler.running:
            return
        self._clear_handed_out()
        rows = sorted(scheduler.running)
        batch = next(b for b in self.buckets if b > rows[-1])
        tokens = torch.zeros(batch, dtype=torch.long)
        positions = torch.full((batch,), -1, dtype=torch.long)  # rows without a sequence
        for row in rows:
            sequence = scheduler.running[row]
            tokens[row], positions[row] = sequence.output[-1], sequence.position
        logits, greedy = self.runner.decode(batch, tokens, positions, self._consecutive_start(rows))
        index = torch.tensor(rows, device=self.device)
        sequences = [scheduler.running[row] for row in rows]
        for sequence in sequences:
            scheduler.register_full_blocks(sequence, sequence.position + 1)
        self._accept(sequences, logits[index], greedy[index])

    def _clear_handed_out(self) -> None:
        """Zeros the blocks handed out since the last forward (kv_cache.PagedKVCache.clear_blocks says why)."""
        scheduler = self.scheduler
        fresh = [block for block in scheduler.handed_out if self.blocks.holders[block]]
        scheduler.handed_out.clear()
        self.runner.cache.clear_blocks(fresh)

    def _consecutive_start(self, rows: list[int]) -> int | None:
        """For a batch of one row: its first block, when the blocks it reads are consecutive in the pool."""
        if rows != [0]:
            return None
        sequence = self.scheduler.running[0]
        blocks = sequence.blocks[:sequence.position // self.settings.block_size + 1]
        return blocks[0] if blocks == list(range(blocks[0], blocks[0] + len(blocks))) else None

    def _accept(self, sequences: list[_Sequence], logits: torch.Tensor, greedy: torch.Tensor) -> None:
        """Chooses each sequence's next token from its row of logits and hands it on (NON_FINITE for a row of NaN
        or Inf logits)."""
        tokens = greedy
        sampled = [i for i, s in enumerate(sequences) if not s.params.greedy]
        if sampled:
            tokens = tokens.clone()
            index = torch.tensor(sampled, device=self.device)
            chosen = [sequences[i] for i in sampled]
            tokens[index] = sample(logits[index], [s.params for s in chosen], [s.generator for s in chosen],
                                   self._seen[[s.row for s in chosen]])
        tokens = flag_non_finite(tokens, logits)
        logprobs = self._logprobs(sequences, logits, tokens.clamp(min=0))  # (a broken row's are not handed on)
        now = time.perf_counter()
        self._token_times.append((now, len(sequences)))
        while now - self._token_times[0][0] > TOKEN_WINDOW:
            self._token_times.popleft()
        self.generated_tokens += len(sequences)
        for sequence, token in zip(sequences, tokens.tolist()):
            self._hand_on(sequence, token, logprobs.get(id(sequence)), now)

    def _logprobs(self, sequences, logits, tokens) -> dict[int, TokenLogprob]:
        asking = [i for i, s in enumerate(sequences) if s.request.top_logprobs is not None]
        if not asking:
            return {}
        index = torch.tensor(asking, device=self.device)
        logprobs = logits[index].log_softmax(dim=-1)
        chosen = logprobs.gather(1, tokens[index, None]).squeeze(1).tolist()
        most = max(sequences[i].request.top_logprobs for i in asking)
        top_values, top_ids = (logprobs.topk(most, dim=-1) if most else (logprobs[:, :0], logprobs[:, :0].long()))
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        entries = {}
        for row, i in enumerate(asking):
            k = sequences[i].request.top_logprobs
            entries[id(sequences[i])] = TokenLogprob(int(tokens[i]), chosen[row],
                                                     list(zip(top_ids[row][:k], top_values[row][:k])))
        return entries

    def _hand_on(self, sequence: _Sequence, token: int, logprob: TokenLogprob | None, now: float) -> None:
        if token == NON_FINITE:
            log.warning("a request's logits were NaN or Inf after %d tokens; it ends with an error", sequence.made)
            self._finish(sequence, "error", error=NonFiniteLogits())
            return
        sequence.output.append(token)
        if sequence.made == 1:
            sequence.first_token = now
        if sequence.params.repetition_penalty != 1.0:
            self._seen[sequence.row, token] = True
        ended = sequence.stop.add([token])
        fresh = [logprob] if logprob is not None and token not in sequence.eos_ids else []
        sequence.logprobs += fresh
        if ended or sequence.made == sequence.params.max_new_tokens:
            self._finish(sequence, "length", fresh)
        elif sequence.request.sink:
            self._tell(sequence, Update("".join(sequence.pieces), fresh))
            sequence.pieces.clear()

    def _finish(self, sequence: _Sequence, unfinished_reason: str, fresh: list[TokenLogprob] = (),
                error: Exception | None = None, score: tuple[float, bool] | None = None) -> None:
        """Ends the sequence (finish reason: the StopStrings' where it ended at EOS or a stop string, else
        `unfinished_reason`; "error" with `error`), frees its row and blocks and sends its last update."""
        completion = sequence.stop.completions(unfinished_reason)[0]
        completion.score = score
        if error is not None:
            completion.finish_reason, completion.error = "error", error
            self.blocks.forget(sequence.blocks)  # its keys and values may hold NaN: never shared
        if sequence.request.top_logprobs is not None:
            completion.logprobs = sequence.logprobs
        self.scheduler.release(sequence)
        sequence.completion = completion
        sequence.ended.set()
        if sequence.request.sink:
            self._tell(sequence, Update("".join(sequence.pieces), list(fresh), completion))
        sequence.pieces.clear()
        now = time.perf_counter()
        self._recent_seconds.append(now - sequence.submitted)
        made = completion.token_count
        timing = Timing(len(sequence.prompt), made, completion.finish_reason,
                        (sequence.admitted or now) - sequence.submitted,
                        sequence.first_token - sequence.submitted if made else None,
                        (now - sequence.first_token) / (made - 1) if made > 1 else None)
        for listener in self.listeners:
            try:
                listener(timing)
            except Exception:
                log.exception("a listener of finished requests failed")

    def _tell(self, sequence: _Sequence, update: Update) -> None:
        """Hands the update to the request's sink; a sink that fails cancels its own request, nobody else's."""
        try:
            sequence.request.sink(update)
        except Exception:
            log.exception("a request's sink failed; cancelling the request")
            sequence.cancelled = True

    def _fail_all(self) -> None:
        """After a failed step: every admitted sequence ends ("error") and its row and blocks are freed."""
        scheduler = self.scheduler
        for sequence in [*scheduler.prefilling, *scheduler.running.values()]:
            if sequence.row >= 0:
                self._finish(sequence, "error")
