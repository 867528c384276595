"""Training batches with an exact, resumable position: pretraining windows (prepared or streamed) and SFT windows
share one batching base, and validation windows are made here too.

A token stream is cut into windows of seq_len + 1 tokens; window k starts at token k * seq_len, so every token but
the first is a target exactly once. (SFT windows are made whole by data/sft.py: token ids and labels.) Windows are
addressed by a global sample index g; a seeded permutation per epoch maps g to a window (a stream is read in order
instead). Data-parallel ranks take disjoint samples of that one global order:

    rank r's micro-batch j = global samples [(j * world + r) * B, (j * world + r + 1) * B)

so the samples of optimizer step s (micro-batches j = s*A ... s*A + A - 1 on every rank) are the contiguous block
[s * G, (s + 1) * G) with G = B * world * A, whatever the split of G into B, world and A. The position saved in a
checkpoint is the number of global samples consumed by finished optimizer steps, so a run resumes on any number of
ranks without repeating or skipping a sample.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .prepare import PreparedTokens, check_prepared_settings, open_prepared
from .settings import DataError
from .streaming import StreamingTokens, StreamPosition, held_out_tokens, iter_stream_windows


class InMemoryTokens:
    """A token array with the `PreparedTokens` interface (held-out tokens of a stream, tests)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, start: int, length: int) -> np.ndarray:
        return np.array(self.tokens[start : start + length])

    def where(self, position: int) -> str:
        return f"held-out tokens, token {position:,}"


def num_windows(num_tokens: int, seq_len: int) -> int:
    return max(0, (num_tokens - 1) // seq_len)


def read_window(tokens, index: int, seq_len: int) -> np.ndarray:
    return tokens.read(index * seq_len, seq_len + 1)


class TokenWindows:
    """Pretraining windows of a token stream (`PreparedTokens` or `InMemoryTokens`): (seq_len + 1,) each.

    With `vocab_size`, a window holding a token id outside the vocabulary (a damaged shard) is a DataError naming
    the shard file and the token's position, not an index error deep in the embedding; the check is one max() per
    window, a few microseconds against a training step's milliseconds."""

    def __init__(self, tokens, seq_len: int, vocab_size: int | None = None):
        self.tokens, self.seq_len, self.vocab_size = tokens, seq_len, vocab_size

    def __len__(self) -> int:
        return num_windows(len(self.tokens), self.seq_len)

    def __getitem__(self, index: int) -> np.ndarray:
        window = read_window(self.tokens, index, self.seq_len)
        if self.vocab_size is not None and len(window) and window.max() >= self.vocab_size:
            self._refuse(window, index)
        return window.astype(np.int64)

    def _refuse(self, window: np.ndarray, index: int) -> None:
        offset = int(np.argmax(window >= self.vocab_size))
        raise DataError(
            f"{self.tokens.where(index * self.seq_len + offset)}: token id {int(window[offset]):,} is outside the "
            f"vocabulary ({self.vocab_size:,} tokens): the shard is damaged or was prepared with another tokenizer; "
            f"prepare the data again"
        )


class LabelledWindows:
    """SFT windows: a (N, 2, seq_len + 1) int64 tensor of token ids and labels (see data/sft.py)."""

    def __init__(self, windows: torch.Tensor):
        self.windows, self.seq_len = windows, windows.shape[-1] - 1

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.windows[index].numpy()


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


def _check_divisible(samples: int, world: int, micro_batch_size: int) -> None:
    if samples % (world * micro_batch_size):
        raise DataError(
            f"cannot resume at sample {samples}: not a multiple of world ({world}) x micro_batch_size "
            f"({micro_batch_size}); keep the global batch size when changing ranks"
        )


class _MicroBatches(Dataset):
    """Item j: this rank's j-th micro-batch, (B, *window shape) int64 (runs in DataLoader workers)."""

    def __init__(self, windows, order: WindowOrder, micro_batch_size: int, rank: int, world: int):
        self.windows, self.order = windows, order
        self.micro_batch_size, self.rank, self.world = micro_batch_size, rank, world

    def __getitem__(self, j: int) -> torch.Tensor:
        samples = global_samples(j, self.rank, self.world, self.micro_batch_size)
        return torch.from_numpy(np.stack([self.windows[self.order[g]] for g in samples]))


class WindowBatches:
    """This rank's micro-batches of windows (pretraining windows of prepared data, or SFT windows) in the seeded
    global order, prefetched by DataLoader worker processes (pinned memory on GPUs).

    `state_dict()` is the number of global samples in the micro-batches handed out so far; call it after an
    optimizer step, when every rank has handed out the same number, and it is the position consumed by steps.
    """

    def __init__(self, windows: TokenWindows | LabelledWindows, micro_batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True, workers: int = 0, pin_memory: bool = False):
        self.windows = windows
        self.micro_batch_size, self.rank, self.world = micro_batch_size, rank, world
        self.order = WindowOrder(len(windows), seed, shuffle)
        self.workers, self.pin_memory = workers, pin_memory
        self.delivered = 0  # micro-batches handed out by this rank

    def state_dict(self) -> dict:
        return {
            "samples": self.delivered * self.world * self.micro_batch_size,
            "num_windows": self.order.num_windows,
            "seq_len": self.windows.seq_len,
            "seed": self.order.seed,
            "shuffle": self.order.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("num_windows", "seq_len", "seed", "shuffle"):
            if key in state and state[key] != mine[key]:  # SFT checkpoints before 2026-12 have no seq_len
                raise DataError(f"cannot resume the data position: {key} was {state[key]}, now {mine[key]}")
        _check_divisible(state["samples"], self.world, self.micro_batch_size)
        self.delivered = state["samples"] // (self.world * self.micro_batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        dataset = _MicroBatches(self.windows, self.order, self.micro_batch_size, self.rank, self.world)
        loader = DataLoader(
            dataset,
            batch_size=None,
            sampler=itertools.count(self.delivered),
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4 if self.workers else None,
        )
        try:
            for batch in loader:
                self.delivered += 1
                yield batch
        except DataError as error:  # from a worker process, wrapped in its traceback: the message alone
            raise DataError(worker_message(error)) from None


def worker_message(error: Exception) -> str:
    """A DataLoader worker's error as its own message: DataLoader re-raises it as "Caught DataError in DataLoader
    worker process 0. Original Traceback ..." ending in "...DataError: <message>"."""
    text = str(error).rstrip()
    if "Original Traceback" not in text:
        return text
    return text.splitlines()[-1].split("Error: ", 1)[-1]


class StreamingBatches:
    """This rank's micro-batches straight from parquet (no prepare step), in stream order.

    Every rank sees the same stream (tokenized in shares, see data/streaming.py) and keeps its own samples, as in
    the global order above. The saved position is where the first unconsumed window starts (input file, row and
    token offset), so resuming re-reads from there. At the end of the inputs the stream starts again (a new epoch);
    the last incomplete window of an epoch is not used.
    """

    def __init__(self, stream: StreamingTokens, seq_len: int, micro_batch_size: int, rank: int = 0, world: int = 1,
                 pin_memory: bool = False):
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


def split_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs and shifted targets from a pretraining batch (B, T + 1) or an SFT batch (B, 2, T + 1)."""
    if batch.dim() == 3:
        return batch[:, 0, :-1], batch[:, 1, 1:]
    return batch[:, :-1], batch[:, 1:]


def validation_batches(windows: TokenWindows | LabelledWindows, count: int, micro_batch_size: int):
    """The first `count` windows as micro-batches (every rank evaluates the same ones); None when there are none."""
    count = min(count, len(windows))
    if count == 0:
        return None
    stacked = torch.from_numpy(np.stack([windows[i] for i in range(count)]))
    return list(stacked.split(micro_batch_size))


def pretraining_data(data, micro_batch_size: int, seed: int, tokenizer, rank: int = 0, world: int = 1,
                     pin_memory: bool = False, share=None, group=None):
    """(this data-parallel rank's training batches, validation batches or None) from the run config's [data]
    section: prepared token shards, or parquet streamed with the same document settings as a prepare. `share`
    (a TokenizeShare) splits a stream's tokenization across processes; `group` (host-side) shares what the
    processes found verifying the prepared shards."""
    vocab_size = len(tokenizer)  # every id a prepared shard may hold (the model's vocabulary is at least this)
    if data.prepared:
        manifest = open_prepared(data.prepared, rank, world, group)  # shard sizes and checksums verified
        train_tokens = PreparedTokens(data.prepared, "train", tokenizer, manifest)
        check_prepared_settings(manifest, data, data.prepared)
        batches = WindowBatches(TokenWindows(train_tokens, data.seq_len, vocab_size), micro_batch_size, rank, world,
                                seed, data.shuffle, data.workers, pin_memory)
        val_tokens = PreparedTokens(data.prepared, "val", tokenizer, manifest)
    else:
        stream = StreamingTokens(data.inputs, tokenizer, data, workers=data.workers, share=share)
        batches = StreamingBatches(stream, data.seq_len, micro_batch_size, rank, world, pin_memory=pin_memory)
        wanted = data.seq_len * data.val_windows + 1
        val_tokens = InMemoryTokens(held_out_tokens(stream, wanted)) if data.val_fraction and data.val_windows \
            else None
    if val_tokens is None or not data.val_windows:
        return batches, None
    return batches, validation_batches(TokenWindows(val_tokens, data.seq_len, vocab_size), data.val_windows,
                                       micro_batch_size)
