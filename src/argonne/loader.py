"""Training batches from a token stream, with an exact, resumable position.

The stream (prepared shards or parquet tokenized on the fly) is cut into windows of seq_len + 1 tokens; window k
starts at token k * seq_len, so every token but the first is a target exactly once. Windows are addressed by a
global sample index g; a seeded permutation per epoch maps g to a window (prepared data only; a stream is read in
order). Data-parallel ranks take disjoint samples of that one global order:

    rank r's micro-batch j = global samples [(j * world + r) * B, (j * world + r + 1) * B)

so the samples of optimizer step s (micro-batches j = s*A ... s*A + A - 1 on every rank) are the contiguous block
[s * G, (s + 1) * G) with G = B * world * A, whatever the split of G into B, world and A. The position saved in a
checkpoint is the number of global samples consumed by finished optimizer steps, so a run resumes on any number of
ranks without repeating or skipping a sample.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data import (
    TOKEN_DTYPE,
    DataError,
    StreamingTokens,
    StreamPosition,
    check_tokenizer_matches,
    load_manifest,
)


class PreparedTokens:
    """One split of a prepared dataset as a single token stream, read through memory maps."""

    def __init__(self, directory: str | Path, split: str = "train", tokenizer=None):
        self.directory = Path(directory)
        self.manifest = load_manifest(directory)
        if tokenizer is not None:
            check_tokenizer_matches(self.manifest["tokenizer"], tokenizer, str(directory))
        key = f"{split}_file"
        self.arrays = []
        for shard in self.manifest["shards"]:
            if shard[f"{split}_tokens"]:
                path = self.directory / shard[key]
                array = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
                if len(array) != shard[f"{split}_tokens"]:
                    raise DataError(f"{path}: {len(array)} tokens, but the manifest says {shard[f'{split}_tokens']}")
                self.arrays.append(array)
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), across shard boundaries where needed."""
        pieces, end = [], start + length
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < end:
            local = start - self.offsets[shard]
            take = min(end - start, len(self.arrays[shard]) - local)
            pieces.append(self.arrays[shard][local : local + take])
            start += take
            shard += 1
        return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])


class InMemoryTokens:
    """A token array with the `PreparedTokens` interface (validation windows made on the fly, tests)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, start: int, length: int) -> np.ndarray:
        return np.array(self.tokens[start : start + length])


def num_windows(num_tokens: int, seq_len: int) -> int:
    return max(0, (num_tokens - 1) // seq_len)


def read_window(tokens, index: int, seq_len: int) -> np.ndarray:
    return tokens.read(index * seq_len, seq_len + 1)


class WindowOrder:
    """Global sample index -> window index: a seeded permutation per epoch, or the identity without shuffle."""

    def __init__(self, num_windows: int, seed: int, shuffle: bool):
        if num_windows <= 0:
            raise DataError("the data holds no complete window")
        self.num_windows, self.seed, self.shuffle = num_windows, seed, shuffle
        self._epoch, self._permutation = -1, None

    def __getitem__(self, sample: int) -> int:
        epoch, offset = divmod(sample, self.num_windows)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._permutation, self._epoch = rng.permutation(self.num_windows), epoch
        return int(self._permutation[offset])


def global_samples(micro_batch: int, rank: int, world: int, micro_batch_size: int) -> range:
    first = (micro_batch * world + rank) * micro_batch_size
    return range(first, first + micro_batch_size)


class _MicroBatches(Dataset):
    """Item j: this rank's j-th micro-batch, a (B, seq_len + 1) int64 tensor (runs in DataLoader workers)."""

    def __init__(self, tokens, order: WindowOrder, seq_len: int, micro_batch_size: int, rank: int, world: int):
        self.tokens, self.order, self.seq_len = tokens, order, seq_len
        self.micro_batch_size, self.rank, self.world = micro_batch_size, rank, world

    def __getitem__(self, j: int) -> torch.Tensor:
        samples = global_samples(j, self.rank, self.world, self.micro_batch_size)
        windows = [read_window(self.tokens, self.order[g], self.seq_len) for g in samples]
        return torch.from_numpy(np.stack(windows).astype(np.int64))


class PreparedBatches:
    """This rank's micro-batches from prepared data, prefetched by DataLoader worker processes into pinned memory.

    `state_dict()` is the number of global samples in the micro-batches handed out so far; call it after an
    optimizer step, when every rank has handed out the same number, and it is the position consumed by steps.
    """

    def __init__(
        self,
        tokens: PreparedTokens | InMemoryTokens,
        seq_len: int,
        micro_batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        workers: int = 0,
        pin_memory: bool = False,
    ):
        self.tokens, self.seq_len = tokens, seq_len
        self.micro_batch_size, self.rank, self.world = micro_batch_size, rank, world
        self.order = WindowOrder(num_windows(len(tokens), seq_len), seed, shuffle)
        self.workers, self.pin_memory = workers, pin_memory
        self.delivered = 0  # micro-batches handed out by this rank

    def state_dict(self) -> dict:
        return {
            "samples": self.delivered * self.world * self.micro_batch_size,
            "num_windows": self.order.num_windows,
            "seq_len": self.seq_len,
            "seed": self.order.seed,
            "shuffle": self.order.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("num_windows", "seq_len", "seed", "shuffle"):
            if state[key] != mine[key]:
                raise DataError(f"cannot resume the data position: {key} was {state[key]}, now {mine[key]}")
        per_micro_batch = self.world * self.micro_batch_size
        if state["samples"] % per_micro_batch:
            raise DataError(
                f"cannot resume at sample {state['samples']}: not a multiple of world ({self.world}) x "
                f"micro_batch_size ({self.micro_batch_size}); keep the global batch size when changing ranks"
            )
        self.delivered = state["samples"] // per_micro_batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        dataset = _MicroBatches(self.tokens, self.order, self.seq_len, self.micro_batch_size, self.rank, self.world)
        loader = DataLoader(
            dataset,
            batch_size=None,
            sampler=itertools.count(self.delivered),
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4 if self.workers else None,
        )
        for batch in loader:
            self.delivered += 1
            yield batch


def iter_stream_windows(
    stream: StreamingTokens, start: StreamPosition, seq_len: int
) -> Iterator[tuple[np.ndarray, StreamPosition]]:
    """Windows of seq_len + 1 tokens from `start` on, each with the stream position of its first token."""
    buffer = np.zeros(0, dtype=TOKEN_DTYPE)
    buffer_start = 0  # stream index (relative to `start`) of buffer[0]
    chunks: deque = deque()  # (stream index of chunk start, chunk length, positions)
    next_start = 0
    for tokens, positions in stream.read_from(start):
        chunks.append((buffer_start + len(buffer), len(tokens), positions))
        buffer = np.concatenate((buffer, tokens))
        while buffer_start + len(buffer) >= next_start + seq_len + 1:
            at = next_start - buffer_start
            while chunks[0][0] + chunks[0][1] <= next_start:
                chunks.popleft()
            chunk_start, _, chunk_positions = chunks[0]
            yield buffer[at : at + seq_len + 1], chunk_positions.at(next_start - chunk_start)
            next_start += seq_len
        buffer, buffer_start = buffer[next_start - buffer_start :], next_start


class StreamingBatches:
    """This rank's micro-batches straight from parquet (no prepare step), in stream order.

    Every rank reads the same stream and keeps its own samples, as in the global order above; tokenization runs in
    background worker processes. The saved position is where the first unconsumed window starts (input file, row
    and token offset), so resuming re-reads from there. At the end of the inputs the stream starts again (a new
    epoch); the last incomplete window of an epoch is not used.
    """

    def __init__(
        self, stream: StreamingTokens, seq_len: int, micro_batch_size: int, rank: int = 0, world: int = 1,
        pin_memory: bool = False,
    ):
        self.stream, self.seq_len = stream, seq_len
        self.micro_batch_size, self.rank, self.world = micro_batch_size, rank, world
        self.pin_memory = pin_memory
        self.position, self.epoch, self.samples = StreamPosition(), 0, 0

    def skipped(self) -> dict[str, int]:
        """Rows and files the stream skipped so far (on_error="skip"); see StreamingTokens.skipped."""
        return self.stream.skipped()

    def state_dict(self) -> dict:
        return {"position": asdict(self.position), "epoch": self.epoch, "samples": self.samples,
                "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state["seq_len"] != self.seq_len:
            raise DataError(f"cannot resume the data position: seq_len was {state['seq_len']}, now {self.seq_len}")
        self.position, self.epoch = StreamPosition(**state["position"]), state["epoch"]
        self.samples = state["samples"]

    def __iter__(self) -> Iterator[torch.Tensor]:
        group = self.world * self.micro_batch_size  # windows per micro-batch index, over all ranks
        while True:
            from_start, yielded = self.position == StreamPosition(), False
            pending: list[np.ndarray] = []
            for window, position in iter_stream_windows(self.stream, self.position, self.seq_len):
                if len(pending) == group:
                    # `position` starts the next group: where to resume once this one is consumed.
                    yield self._batch(pending, position, self.epoch)
                    yielded, pending = True, []
                pending.append(window)
            if len(pending) == group:
                yield self._batch(pending, StreamPosition(), self.epoch + 1)
            elif from_start and not yielded:
                raise DataError(
                    f"the input holds fewer than {group} windows of {self.seq_len + 1} tokens "
                    f"(world {self.world} x micro_batch_size {self.micro_batch_size})"
                )
            else:
                self.position, self.epoch = StreamPosition(), self.epoch + 1

    def _batch(self, group_windows: list[np.ndarray], next_position: StreamPosition, next_epoch: int):
        mine = group_windows[self.rank * self.micro_batch_size : (self.rank + 1) * self.micro_batch_size]
        batch = torch.from_numpy(np.stack(mine).astype(np.int64))
        self.position, self.epoch = next_position, next_epoch
        self.samples += len(group_windows)
        return batch.pin_memory() if self.pin_memory else batch
