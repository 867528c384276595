"""The scheduler: which sequences wait, prefill and decode, and what each holds (a batch row and KV blocks).

Requests wait in a queue. Between steps the scheduler admits them, first come first served, while a batch row is
free and the free blocks hold their prompt (blocks of the prompt's cached prefix are taken, not prefilled again);
plans the next prefill chunks (at most `prefill_chunk` prompt tokens in all, so a long prompt holds the running batch
up for one chunk at a time); and before each decode step gives every running sequence the block its next token
goes to. When no block is free, the sequence admitted last is preempted: its blocks are released (they stay in the
prefix cache while unused) and it waits at the head of the queue, to be prefilled again, its tokens so far included,
when blocks free up (vLLM's recompute preemption).

The same prompt submitted several times together (n choices) is prefilled once: the others are admitted with it and
wait; when its prefill ends they take its full blocks, a copy of its last partial block, and its first logits.
"""

from __future__ import annotations

import collections
import heapq
import threading
import time
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass, field

import torch

from .kv_cache import BlockPool
from .sampling import Completion, SamplingParams, TokenLogprob
from .text import StopStrings


@dataclass(eq=False)
class Sequence:
    """One request's state in the engine."""

    request: object  # EngineRequest
    eos_ids: list[int]
    generator: torch.Generator
    stop: StopStrings = None
    row: int = -1
    """Its batch row while admitted (-1 while waiting or ended)."""
    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    """Prefix-cache keys of its first full blocks (computed as they fill, kept across preemption)."""
    registered: int = 0
    """Its blocks offered to the prefix cache so far."""
    prefilled: int = 0
    """Tokens whose keys and values are in the cache."""
    output: list[int] = field(default_factory=list)
    """Tokens made; the last is the next to feed (its keys and values are not in the cache yet)."""
    cancelled: bool = False
    leader: Sequence | None = None
    """The first sequence of the same submission and prompt, whose prefill this one takes (None for the first)."""
    completion: Completion | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    first_token: float = 0.0
    scored: list[tuple[float, bool]] = field(default_factory=list)
    """A scoring request's log-probabilities of its scored tokens so far, and whether each was the argmax."""

    @property
    def score(self) -> int:
        """Prompt tokens to score (the last ones): 0 for a generating request."""
        return self.request.score

    @property
    def first_logits(self) -> int:
        """The first position whose logits the prefill must compute (no block holding it comes from the cache)."""
        if self.score:
            return len(self.prompt) - self.score - 1
        return self.to_prefill - 1

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt(self) -> Sequence_[int]:
        return self.request.prompt

    @property
    def made(self) -> int:
        return len(self.output)

    @property
    def tokens(self) -> list[int]:
        return [*self.prompt, *self.output]

    @property
    def to_prefill(self) -> int:
        """Tokens the prefill puts in the cache: the prompt (a scoring request's but its last token, which is only
        predicted), and after a preemption the tokens made but the last."""
        if self.score:
            return len(self.prompt) - 1
        return len(self.prompt) + max(self.made - 1, 0)

    @property
    def position(self) -> int:
        """Where the next token to feed goes."""
        return len(self.prompt) + self.made - 1


class Scheduler:
    def __init__(self, rows: int, pool: BlockPool, block_size: int, prefill_chunk: int):
        self.pool, self.block_size, self.prefill_chunk = pool, block_size, prefill_chunk
        self.free_rows = list(range(rows))  # a heap: the lowest free row first keeps the decode batch small
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: list[Sequence] = []
        self.running: dict[int, Sequence] = {}
        self.admitted: list[Sequence] = []  # in order of admission: the last is the first preempted
        self.computing: dict[bytes, Sequence] = {}  # prefix-cache keys of blocks being prefilled, and by whom
        self.handed_out: list[int] = []  # blocks allocated since the engine last cleared them
        self.preemptions = 0

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # --- admission ----------------------------------------------------------------------------------------------

    def admit(self) -> list[Sequence]:
        """Admits waiting sequences in order while a row is free and the blocks hold their prompts; returns them. A
        sequence whose next blocks another admitted sequence is prefilling right now waits for them (it takes
        them from the prefix cache once they are done), letting the sequences behind it go first."""
        admitted = []
        for sequence in list(self.waiting):
            if not self.free_rows:
                break
            if self._prefix_in_progress(sequence):
                continue
            if not self._give_blocks(sequence):
                break
            self.waiting.remove(sequence)
            sequence.row, sequence.admitted = heapq.heappop(self.free_rows), sequence.admitted or time.perf_counter()
            self.prefilling.append(sequence)
            self.admitted.append(sequence)
            admitted.append(sequence)
        return admitted

    def _cacheable_keys(self, sequence: Sequence) -> list[bytes]:
        """Keys of the sequence's full blocks before its first position whose logits are needed."""
        return self._keys(sequence, sequence.first_logits // self.block_size)

    def _keys(self, sequence: Sequence, blocks: int) -> list[bytes]:
        """The keys of the sequence's first `blocks` full blocks; those computed are kept (its tokens only grow)."""
        if len(sequence.keys) < blocks:
            sequence.keys = self.pool.keys(sequence.tokens, self.block_size, blocks, sequence.keys)
        return sequence.keys[:blocks]

    def _prefix_in_progress(self, sequence: Sequence) -> bool:
        if not self.pool.prefix_caching or sequence.leader is not None:
            return False
        keys = self._cacheable_keys(sequence)
        cached = len(self.pool.cached_prefix(keys))
        return cached < len(keys) and keys[cached] in self.computing

    def _give_blocks(self, sequence: Sequence) -> bool:
        """The blocks of the tokens to prefill: its cached prefix taken, the rest allocated. False when too few are
        free (nothing taken). No position whose logits are needed is in a cached block (the last token to prefill,
        the tokens a scoring request scores)."""
        keys = self._cacheable_keys(sequence)
        cached = self.pool.cached_prefix(keys)
        needed = self.blocks_for(sequence.to_prefill) - len(cached)
        free_cached = sum(1 for block in cached if self.pool.holders[block] == 0)
        if self.pool.free_count - free_cached < needed:
            return False
        self.pool.take(cached)
        sequence.blocks = cached + [self.allocate() for _ in range(needed)]
        sequence.prefilled, sequence.registered = len(cached) * self.block_size, len(cached)
        for key in keys[len(cached):]:  # the blocks its prefill computes, for the sequences behind it
            self.computing.setdefault(key, sequence)
        return True

    # --- prefill ------------------------------------------------------------------------------------------------

    def prefill_chunks(self) -> list[tuple[Sequence, int, int]]:
        """(sequence, first position, token count) of the next prefill, `prefill_chunk` tokens in all, in order of
        admission; a sequence whose leader is still prefilling waits for it."""
        budget, chunks = self.prefill_chunk, []
        for sequence in self.prefilling:
            if sequence.leader is not None:
                if sequence.leader in self.prefilling and not sequence.made:
                    continue
                sequence.leader = None  # its leader is not prefilling (preempted, or not admitted yet): alone
            count = min(budget, sequence.to_prefill - sequence.prefilled)
            chunks.append((sequence, sequence.prefilled, count))
            budget -= count
            if budget == 0:
                break
        return chunks

    def followers(self, leader: Sequence) -> list[Sequence]:
        """The admitted sequences waiting for `leader`'s prefill, which has just ended (see `share_prefill`)."""
        return [s for s in self.prefilling if s.leader is leader and not s.made and not s.cancelled]

    def share_prefill(self, leader: Sequence, follower: Sequence) -> tuple[int, int] | None:
        """Gives the follower the leader's prefilled blocks; returns (source, target) of the partial last block to
        copy, if any."""
        length = leader.to_prefill
        full = length // self.block_size
        own = follower.blocks
        self.pool.release(own[:full])  # its own full blocks (not written) are replaced by the leader's
        self.pool.take(leader.blocks[:full])
        follower.blocks = leader.blocks[:full] + own[full:]
        follower.keys, follower.registered = leader.keys[:full], min(leader.registered, full)
        follower.prefilled = length
        if length % self.block_size:
            return leader.blocks[full], own[full]
        return None

    def start_decoding(self, sequence: Sequence) -> None:
        self.prefilling.remove(sequence)
        self.running[sequence.row] = sequence

    # --- decode -------------------------------------------------------------------------------------------------

    def block_for_next_token(self, sequence: Sequence) -> int | None:
        """The block index (in the sequence's table) newly allocated for its next token, None if it has one;
        preempts the sequence admitted last when none is free (possibly this one: then it raises Preempted)."""
        index = sequence.position // self.block_size
        if index < len(sequence.blocks):
            return None
        while self.pool.free_count == 0:
            victim = self.admitted[-1]
            self.preempt(victim)
            if victim is sequence:
                raise Preempted()
        sequence.blocks.append(self.allocate())
        return index

    def allocate(self) -> int:
        block = self.pool.allocate()
        self.handed_out.append(block)
        return block

    def preempt(self, sequence: Sequence) -> None:
        """Back to the head of the queue, its blocks released; prefilled again (its tokens so far) when admitted."""
        self.release(sequence)
        sequence.prefilled, sequence.registered, sequence.scored = 0, 0, []
        self.waiting.appendleft(sequence)
        self.preemptions += 1

    # --- the prefix cache ---------------------------------------------------------------------------------------

    def register_full_blocks(self, sequence: Sequence, written: int) -> None:
        """Offers the sequence's blocks that `written` tokens have filled to the prefix cache."""
        full = min(written // self.block_size, len(sequence.blocks))
        if full <= sequence.registered or not self.pool.prefix_caching:
            return
        keys = self._keys(sequence, full)
        for index in range(sequence.registered, full):
            self.pool.register(sequence.blocks[index], keys[index])
            if self.computing.get(keys[index]) is sequence:
                del self.computing[keys[index]]
        sequence.registered = full

    # --- the end ------------------------------------------------------------------------------------------------

    def release(self, sequence: Sequence) -> None:
        """Frees the sequence's row and blocks (wherever it is: waiting, prefilling or running)."""
        if sequence.row >= 0:
            self.running.pop(sequence.row, None)
            if sequence in self.prefilling:
                self.prefilling.remove(sequence)
            heapq.heappush(self.free_rows, sequence.row)
            sequence.row = -1
        if sequence in self.admitted:
            self.admitted.remove(sequence)
        for key in [key for key, owner in self.computing.items() if owner is sequence]:
            del self.computing[key]
        self.pool.release(sequence.blocks)
        sequence.blocks = []


class Preempted(Exception):
    """The sequence that needed a block was itself preempted to free one."""
