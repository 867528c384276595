"""The serving engine: continuous batching over a cache of slots, apart from any HTTP.

Requests wait in a queue (`submit`; a full queue raises QueueFull). Between decode steps the scheduler admits them
into free slots of the KV cache (kv_cache.SlotKVCache: one row per sequence, sized from a memory budget), prefills
their prompts in chunks (at most `prefill_chunk` prompt tokens per step, the chunks of several prompts in one
forward, so a long prompt holds the running batch up for one chunk at a time, not for its whole length; the same
prompt submitted several times together, as n choices, is prefilled once and its keys and values copied), and
retires every sequence the step it ends, freeing its slot.
Each decode step then advances every running sequence by one token in one forward over the first B slots, B the
smallest batch bucket that holds the highest slot in use (slots are handed out lowest first). On GPUs each bucket's
step is compiled and captured once as a CUDA graph; a one-row step keeps the GEMV kernels (generate.DECODE_KERNELS).

Each sequence keeps its own sampling settings, stop strings, token limit and random generator (seeded from its
`seed`, or at random), and rows are sampled independently: a seeded request makes the same tokens whatever shares
its batch. Greedy rows take the argmax made inside the step.

The engine runs in a thread of its own for the server (`start`, `shutdown`), or in the caller's thread for a batch
(`complete`). Callers hear of each request through its `sink`, called from the engine's thread with an `Update`
per token and a last one carrying the Completion.

A row whose logits hold NaN or Inf ends its request alone: finish reason "error", the Completion's `error` a
NonFiniteLogits (`complete` raises it). The flag is made on the device with the chosen tokens, which the host reads
anyway, so checking costs no synchronisation.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .generate import (NON_FINITE, Completion, NonFiniteLogits, SamplingParams, StopStrings, TokenLogprob,
                       argmax_in_pieces, flag_non_finite, prepare_for_inference)
from .kv_cache import SlotKVCache, SlotRows
from .modeling_argonne import ArgonneForCausalLM

log = logging.getLogger(__name__)

GIB = 1 << 30
KEY_BLOCK = 64
"""Without graphs, attention reads the key columns up to the highest in use, rounded up to this: a cache of 4,096
columns holding sequences of 100 tokens costs the attention of 128."""
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
    """Most sequences decoded together: the cache's slots (fewer if `kv_cache_memory` holds fewer)."""
    max_len: int | None = None
    """Longest sequence, prompt and completion together, a slot holds; None: the model's context."""
    kv_cache_memory: float | None = None
    """GiB for the keys and values of all slots; None: as many as `max_batch` slots take."""
    max_queue: int = 256
    """Most requests waiting for a slot; past it `submit` raises QueueFull (the server's 429)."""
    prefill_chunk: int = 512
    """Most prompt tokens prefilled between two decode steps."""

    def check(self) -> None:
        problems = [f"{name} must be an integer >= 1, got {getattr(self, name)!r}"
                    for name in ("max_batch", "max_queue", "prefill_chunk")
                    if not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 2):
            problems.append(f"max_len must be an integer >= 2, got {self.max_len!r}")
        if self.kv_cache_memory is not None and not (math.isfinite(self.kv_cache_memory)
                                                     and self.kv_cache_memory > 0):
            problems.append(f"kv_cache_memory must be a number of GiB > 0, got {self.kv_cache_memory!r}")
        if problems:
            raise ValueError("engine settings: " + "; ".join(problems))


def plan_slots(config, settings: EngineSettings, dtype: torch.dtype) -> tuple[int, int]:
    """(slots, max_len): `max_batch` slots of `max_len` tokens, or as many as `kv_cache_memory` holds."""
    settings.check()
    context = config.max_position_embeddings
    max_len = settings.max_len or context
    if max_len > context:
        raise ValueError(f"max_len {max_len} is longer than the model's context ({context} tokens)")
    per_slot = SlotKVCache.bytes_per_slot(config, max_len, dtype)
    slots = settings.max_batch
    if settings.kv_cache_memory is not None:
        fit = int(settings.kv_cache_memory * GIB // per_slot)
        if fit < 1:
            raise ValueError(f"a KV cache of {settings.kv_cache_memory:g} GiB holds no sequence: one of {max_len} "
                             f"tokens takes {per_slot / GIB:.3f} GiB; give more memory or a shorter max length")
        slots = min(slots, fit)
    return slots, max_len


def batch_buckets(slots: int) -> list[int]:
    """The batch sizes a decode step runs at (one CUDA graph each): powers of two, and `slots`."""
    return sorted({min(1 << i, slots) for i in range(slots.bit_length() + 1)})


@dataclass
class Update:
    """What one step did for a request: the text it adds (held back while it may be the start of a stop string),
    the logprobs of its new token (when asked), and on the last update the whole Completion."""

    text: str
    logprobs: list[TokenLogprob]
    completion: Completion | None = None


@dataclass
class Timing:
    """A finished request's times, in seconds: waiting for a slot, to its first token, and per later token."""

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


class Handle:
    """A submitted request: `cancel()` ends it at the next step (finish reason "cancelled"); `wait()` returns its
    Completion once it has ended."""

    def __init__(self, sequence: _Sequence):
        self._sequence = sequence

    def cancel(self) -> None:
        self._sequence.cancelled = True
        self._sequence.engine._notify()

    def wait(self, timeout: float | None = None) -> Completion | None:
        self._sequence.ended.wait(timeout)
        return self._sequence.completion

    @property
    def completion(self) -> Completion | None:
        return self._sequence.completion


@dataclass(eq=False)
class _Sequence:
    engine: Engine
    request: EngineRequest
    eos_ids: list[int]
    generator: torch.Generator
    stop: StopStrings = None
    slot: int = -1
    prefilled: int = 0
    made: int = 0
    next_token: int = 0
    cancelled: bool = False
    leader: _Sequence | None = None
    """The first sequence of the same submission and prompt, whose prefill this one copies (None for the first)."""
    completion: Completion | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    first_token: float = 0.0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt(self) -> Sequence[int]:
        return self.request.prompt

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0 and self.params.repetition_penalty == 1.0

    @property
    def column(self) -> int:
        """Where `next_token` goes in the slot: after the prompt and the tokens fed before it."""
        return len(self.prompt) + self.made - 1


class Engine:
    """Continuous batching on one model (see the module's docstring). The model is prepared for inference in place,
    as the Generator prepares it (merged projections, decode kernels)."""

    def __init__(self, model: ArgonneForCausalLM, tokenizer, settings: EngineSettings | None = None,
                 compile: bool | None = None, kernels: str | None = None):
        self.settings = settings or EngineSettings()
        self.kernels = prepare_for_inference(model, kernels)
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.slots, self.max_len = plan_slots(self.config, self.settings, self.dtype)
        self.cache = SlotKVCache(self.config, self.slots, self.max_len, self.device, self.dtype)
        self.eos_ids = sorted({i for i in (self.config.eos_token_id, tokenizer.eos_token_id) if i is not None})
        self.listeners: list[Callable[[Timing], None]] = []  # told of every request that ends (the server's metrics)
        # The decode step's inputs, in fixed buffers (CUDA graphs read them where they were captured).
        self._tokens = torch.zeros((self.slots, 1), dtype=torch.long, device=self.device)
        self._columns = torch.full((self.slots, 1), self.cache.scratch, dtype=torch.long, device=self.device)
        self._seen = torch.zeros((self.slots, self.config.vocab_size), dtype=torch.bool, device=self.device)
        self.buckets = batch_buckets(self.slots)
        compile = self.device.type == "cuda" if compile is None else compile
        self._forward, self.compiled = self._decode_logits, compile
        if compile:
            self._forward = torch.compile(self._decode_logits, fullgraph=True, dynamic=False)
            limit = len(self.buckets) + 8  # one compilation per bucket
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
        self._graphs = compile and self.device.type == "cuda"
        self._steps: dict[int, _BucketStep] = {}
        self._free = list(range(self.slots))  # a heap: the lowest free slot first keeps the decode batch small
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._prefilling: list[_Sequence] = []
        self._running: dict[int, _Sequence] = {}
        self._lock = threading.Condition()
        self._accepting, self._stopping, self._cancel_all = True, False, False
        self._thread: threading.Thread | None = None
        self._recent_seconds: collections.deque[float] = collections.deque(maxlen=64)
        self._token_times: collections.deque[tuple[float, int]] = collections.deque()  # the last TOKEN_WINDOW s
        self.generated_tokens = 0
        self.prompt_tokens = 0

    # --- what callers see -------------------------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Sequences holding a slot (prefilling or decoding)."""
        return self.slots - len(self._free)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Tokens generated per second over the last `window` seconds."""
        now = time.perf_counter()
        made = sum(count for at, count in list(self._token_times) if now - at <= window)
        return made / window if window <= TOKEN_WINDOW else math.nan

    def retry_after(self) -> int:
        """Seconds a refused client might wait: the queue ahead of it, at the recent pace of requests per slot."""
        mean = sum(self._recent_seconds) / len(self._recent_seconds) if self._recent_seconds else 1.0
        return max(1, min(60, math.ceil(mean * (len(self._waiting) + 1) / self.slots)))

    def check(self, request: EngineRequest) -> None:
        """A request this engine can take: ValueError naming what it cannot."""
        request.params.validate()
        prompt = list(request.prompt)
        if not prompt:
            raise ValueError("the prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < self.config.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {self.config.vocab_size})")
        if len(prompt) + request.params.max_new_tokens > self.max_len:
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
        for sequence in sequences:  # the same prompt more than once (n choices): prefilled once, its cache copied
            first = leaders.setdefault(tuple(sequence.prompt), sequence)
            sequence.leader = first if first is not sequence else None
        with self._lock:
            if not self._accepting or (self._thread is not None and not self._thread.is_alive()):
                raise EngineStopped("the server is shutting down")
            # A request of more sequences than the queue holds (n choices) still enters an empty queue.
            if queue_limit and self._waiting and len(self._waiting) + len(sequences) > self.settings.max_queue:
                raise QueueFull(self.retry_after())
            self._waiting.extend(sequences)
            self._lock.notify()
        return [Handle(sequence) for sequence in sequences]

    def complete(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 top_logprobs: int | None = None) -> list[Completion]:
        """Each prompt's completion, batched continuously (a batch for `argonne generate` or the harness): in the
        engine's thread when it runs, else in this one. Non-finite logits in any row raise NonFiniteLogits."""
        handles = self.submit([EngineRequest(p, params, top_logprobs) for p in prompts], queue_limit=False)
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
        first reaches each size and stalls every stream meanwhile. Its rows write the scratch column only."""
        if not self.compiled:
            return
        with torch.no_grad(), self._on_device():
            self._tokens.zero_()
            self._columns.fill_(self.cache.scratch)
            for batch in self.buckets:
                self._steps.setdefault(batch, _BucketStep(self, batch))()

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

    # --- the scheduler ----------------------------------------------------------------------------------------

    def _notify(self) -> None:
        with self._lock:
            self._lock.notify()

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

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
        """One scheduling step: retire cancelled requests, admit waiting ones into free slots, prefill up to
        `prefill_chunk` prompt tokens, then decode one token for every running sequence."""
        with torch.no_grad(), self._on_device():
            self._retire_cancelled()
            self._admit()
            if self._prefilling:
                self._prefill()
            if self._running:
                self._decode()

    def _sequence(self, request: EngineRequest) -> _Sequence:
        seed = request.params.seed
        generator = torch.Generator(self.device)
        generator.manual_seed(random.getrandbits(63) if seed is None else seed)
        eos_ids = sorted(set(self.eos_ids) | set(request.params.stop_token_ids))
        sequence = _Sequence(self, request, eos_ids, generator)
        sequence.stop = StopStrings(self.tokenizer, 1, request.params.stop, eos_ids, stream=sequence.pieces.append)
        return sequence

    def _retire_cancelled(self) -> None:
        with self._lock:
            cancelled = [s for s in self._waiting if s.cancelled or self._cancel_all]
            for sequence in cancelled:
                self._waiting.remove(sequence)
        for sequence in [*cancelled, *[s for s in self._prefilling if s.cancelled or self._cancel_all],
                         *[s for s in self._running.values() if s.cancelled or self._cancel_all]]:
            self._finish(sequence, "cancelled")

    def _admit(self) -> None:
        with self._lock:
            while self._free and self._waiting:
                sequence = self._waiting.popleft()
                sequence.slot, sequence.admitted = heapq.heappop(self._free), time.perf_counter()
                self._prefilling.append(sequence)
                if sequence.params.repetition_penalty != 1.0:
                    self._seen[sequence.slot] = False
                    self._seen[sequence.slot, torch.tensor(list(sequence.prompt), device=self.device)] = True

    def _prefill(self) -> None:
        """Prefills the next chunks of the waiting prompts (in order of admission, `prefill_chunk` tokens in all) in
        one forward, left-padded to the longest chunk (padding writes the scratch column); a prompt's last chunk
        gives its first token, and it joins the decoding sequences."""
        budget, chunks = self.settings.prefill_chunk, []
        for sequence in self._prefilling:
            if sequence.leader is not None and sequence.leader in self._prefilling:
                continue  # its leader's prefill will be copied into its slot
            count = min(budget, len(sequence.prompt) - sequence.prefilled)
            chunks.append((sequence, sequence.prefilled, count))
            budget -= count
            if budget == 0:
                break
        if not chunks:
            return
        width = max(count for _, _, count in chunks)
        tokens = torch.zeros((len(chunks), width), dtype=torch.long)
        columns = torch.full((len(chunks), width), self.cache.scratch, dtype=torch.long)
        for row, (sequence, start, count) in enumerate(chunks):
            tokens[row, width - count:] = torch.tensor(list(sequence.prompt[start:start + count]))
            columns[row, width - count:] = torch.arange(start, start + count)
        columns = columns.to(self.device)
        slots = [sequence.slot for sequence, _, _ in chunks]
        rows = self.cache.rows(slots, columns)
        rows.keys = self._keys(max(start + count for _, start, count in chunks))
        logits = self.model(tokens.to(self.device), attention_mask=rows.mask(self.dtype),
                            position_ids=columns.clamp(max=self.max_len - 1), cache=rows, use_cache=True,
                            logits_to_keep=1).logits[:, -1].float()
        done, rows_done = [], []
        for row, (sequence, start, count) in enumerate(chunks):
            sequence.prefilled += count
            self.prompt_tokens += count
            if sequence.prefilled == len(sequence.prompt):
                for follower in [sequence, *self._followers(sequence)]:
                    self._prefilling.remove(follower)
                    self._running[follower.slot] = follower
                    done.append(follower)
                    rows_done.append(row)
        if done:
            first = logits[torch.tensor(rows_done, device=self.device)]
            self._accept(done, first, argmax_in_pieces(first))

    def _followers(self, leader: _Sequence) -> list[_Sequence]:
        """The admitted sequences waiting for `leader`'s prefill, given a copy of its prompt's keys and values."""
        followers = [s for s in self._prefilling if s.leader is leader and s.prefilled == 0 and not s.cancelled]
        length = len(leader.prompt)
        for follower in followers:
            for keys_and_values in self.cache.layers:
                keys_and_values[:, follower.slot, :, :length] = keys_and_values[:, leader.slot, :, :length]
            follower.prefilled = length
        return followers

    def _decode(self) -> None:
        slots = sorted(self._running)
        batch = next(b for b in self.buckets if b > slots[-1])
        tokens = torch.zeros(batch, dtype=torch.long)
        columns = torch.full((batch,), self.cache.scratch, dtype=torch.long)  # rows without a sequence: scratch
        for slot in slots:
            tokens[slot], columns[slot] = self._running[slot].next_token, self._running[slot].column
        self._tokens[:batch, 0].copy_(tokens)
        self._columns[:batch, 0].copy_(columns)
        step = self._steps.get(batch) or self._steps.setdefault(batch, _BucketStep(self, batch))
        if not self.compiled:  # a compiled step (a CUDA graph) keeps its shapes: every column
            step.rows.keys = self._keys(max(self._running[slot].column for slot in slots) + 1)
        logits, greedy = step()
        rows = torch.tensor(slots, device=self.device)
        self._accept([self._running[slot] for slot in slots], logits[rows], greedy[rows])

    def _keys(self, needed: int) -> int:
        """Key columns for queries below column `needed`: rounded up to KEY_BLOCK, at most all."""
        return self.cache.max_len + 1 if self.compiled else min(-(-needed // KEY_BLOCK) * KEY_BLOCK,
                                                                   self.cache.max_len + 1)

    def _decode_logits(self, rows: SlotRows, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step: float32 logits (B, V) of each row's next token, and their argmax."""
        # Rows without a sequence sit at the scratch column, past the last position a model with learned position
        # embeddings has: they take that last one (their outputs are thrown away).
        positions = rows.columns.clamp(max=self.max_len - 1)
        logits = self.model(tokens, attention_mask=rows.mask(self.dtype), position_ids=positions, cache=rows,
                            use_cache=True, logits_to_keep=1).logits[:, -1].float()
        return logits, argmax_in_pieces(logits)

    def _accept(self, sequences: list[_Sequence], logits: torch.Tensor, greedy: torch.Tensor) -> None:
        """Chooses each sequence's next token from its row of logits and hands it on (NON_FINITE for a row of NaN
        or Inf logits)."""
        tokens = greedy
        sampled = [i for i, s in enumerate(sequences) if not s.greedy]
        if sampled:
            tokens = tokens.clone()
            index = torch.tensor(sampled, device=self.device)
            tokens[index] = sample_rows(logits[index], [sequences[i] for i in sampled],
                                        self._seen[[sequences[i].slot for i in sampled]])
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
        sequence.made += 1
        sequence.next_token = token
        if sequence.made == 1:
            sequence.first_token = now
        if sequence.params.repetition_penalty != 1.0:
            self._seen[sequence.slot, token] = True
        ended = sequence.stop.add([token])
        fresh = [logprob] if logprob is not None and token not in sequence.eos_ids else []
        sequence.logprobs += fresh
        if ended or sequence.made == sequence.params.max_new_tokens:
            self._finish(sequence, "length", fresh)
        elif sequence.request.sink:
            self._tell(sequence, Update("".join(sequence.pieces), fresh))
            sequence.pieces.clear()

    def _finish(self, sequence: _Sequence, unfinished_reason: str, fresh: list[TokenLogprob] = (),
                error: Exception | None = None) -> None:
        """Ends the sequence (finish reason: the StopStrings' where it ended at EOS or a stop string, else
        `unfinished_reason`; "error" with `error`), frees its slot and sends its last update."""
        completion = sequence.stop.completions(unfinished_reason)[0]
        if error is not None:
            completion.finish_reason, completion.error = "error", error
        if sequence.request.top_logprobs is not None:
            completion.logprobs = sequence.logprobs
        if sequence.slot >= 0:
            self._running.pop(sequence.slot, None)
            if sequence in self._prefilling:
                self._prefilling.remove(sequence)
            heapq.heappush(self._free, sequence.slot)
            sequence.slot = -1
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
        """After a failed step: every sequence in a slot ends ("error") and its slot is freed."""
        for sequence in [*self._prefilling, *self._running.values()]:
            if sequence.slot >= 0:
                self._finish(sequence, "error")


class _BucketStep:
    """The decode step at one batch size: rows 0..batch-1 of the cache, inputs in views of the engine's fixed
    buffers. With graphs (CUDA) it is captured once and replayed."""

    def __init__(self, engine: Engine, batch: int):
        self.engine = engine
        self.rows = engine.cache.rows(range(batch), engine._columns[:batch])
        self.tokens = engine._tokens[:batch]
        self._graph: torch.cuda.CUDAGraph | None = None
        self._outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.engine._graphs:
            return self.engine._forward(self.rows, self.tokens)
        if self._graph is None:
            # Warm-up (compilation, library handles) on a side stream, as capture requires; it computes this very
            # step, so the keys and values it writes are the right ones.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.engine._forward(self.rows, self.tokens)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the event loop's thread may touch CUDA (a tokenizer, a metric) during the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self.engine._forward(self.rows, self.tokens)
            self._graph, self._outputs = graph, outputs  # only once captured: a failed capture is tried again
        self._graph.replay()
        return self._outputs


def sample_rows(logits: torch.Tensor, sequences: Sequence[_Sequence], seen: torch.Tensor) -> torch.Tensor:
    """One token per row from float logits (B, V), each row by its own sequence's settings and random generator:
    repetition penalty, temperature (0: argmax), top-k, top-p, then a draw. The draw is the exponential race (the
    argmax of probabilities over Exp(1) noise, as likely as torch.multinomial), with each row's noise from its own
    generator: nothing another row does changes it."""
    device, vocab = logits.device, logits.shape[-1]

    def column(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype, device=device)[:, None]

    params = [s.params for s in sequences]
    penalty = column([p.repetition_penalty for p in params])
    logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    greedy = column([p.temperature == 0 for p in params], torch.bool)
    scaled = logits / column([p.temperature or 1.0 for p in params])
    ordered, order = scaled.sort(dim=-1, descending=True)
    top_k = column([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long)
    kth = ordered.gather(1, top_k - 1)
    scaled, ordered = scaled.masked_fill(scaled < kth, -math.inf), ordered.masked_fill(ordered < kth, -math.inf)
    probs = ordered.softmax(dim=-1)
    # A token is dropped when those before it already reach top_p; the most likely one always stays.
    drop_ordered = (probs.cumsum(dim=-1) - probs) >= column([p.top_p for p in params])
    drop_ordered[:, 0] = False
    drop = torch.zeros_like(drop_ordered).scatter(1, order, drop_ordered)
    probs = scaled.masked_fill(drop, -math.inf).softmax(dim=-1)
    noise = torch.stack([torch.empty(vocab, device=device).exponential_(generator=s.generator) for s in sequences])
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # a draw of 0 would make 0 / 0 = NaN, which argmax picks
    drawn = (probs / noise).argmax(dim=-1)
    return torch.where(greedy[:, 0], logits.argmax(dim=-1), drawn)
