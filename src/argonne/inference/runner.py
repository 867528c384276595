"""The model runner: the model prepared for inference, its paged KV cache, and the two forwards the engine runs.

- `prefill` runs chunks of several sequences' prompts in one forward, left-padded to the longest chunk (padding
  writes the sink block), and returns the logits of each chunk's last positions.
- `decode` runs one token for each of the first B batch rows, B a batch bucket (powers of two up to the rows), from
  fixed buffers: the tokens, their positions (-1: a row without a sequence) and the rows' block tables. On GPUs each
  bucket's step is compiled and captured once as a CUDA graph and replayed for every token; the step also makes the
  argmax (greedy rows need nothing else). Without graphs, attention reads the key positions in use only (rounded up
  to a block), and one sequence alone whose blocks are consecutive reads them as a view of the pool rather than a
  gathered copy; a graph keeps its shapes, every position of the longest sequence, gathered.

The model is prepared in place (`prepare_for_inference`): q/k/v and gate/up projections merged (same results, fewer
matmuls), and with `kernels` other than "torch" one-row decoding runs on the Triton kernels of decode_kernels.py.
A model borrowed from training (`prepare=False`) is left as it is: not merged, torch's kernels, not compiled.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

from argonne_options import CUDA_DEFAULT_KERNELS, DECODE_KERNELS

from ..modeling_argonne import ArgonneForCausalLM
from .kv_cache import PagedKVCache
from .sampling import argmax_in_pieces


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


def batch_buckets(rows: int) -> list[int]:
    """The batch sizes a decode step runs at (one CUDA graph each): powers of two, and `rows`."""
    return sorted({min(1 << i, rows) for i in range(rows.bit_length() + 1)})


class ModelRunner:
    def __init__(self, model: ArgonneForCausalLM, rows: int, max_len: int, num_blocks: int, block_size: int,
                 compile: bool | None = None, kernels: str | None = None, prepare: bool = True):
        self.kernels = prepare_for_inference(model, kernels) if prepare else "torch"
        self.model, self.config = model.eval(), model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.rows, self.max_len, self.block_size = rows, max_len, block_size
        self.max_blocks = -(-max_len // block_size)
        self.cache = PagedKVCache(self.config, num_blocks, block_size, self.device, self.dtype)
        # The decode step's inputs, in fixed buffers (CUDA graphs read them where they were captured).
        self.tokens = torch.zeros((rows, 1), dtype=torch.long, device=self.device)
        self.positions = torch.full((rows, 1), -1, dtype=torch.long, device=self.device)
        self.tables = torch.full((rows, self.max_blocks), self.cache.empty_block, dtype=torch.long,
                                 device=self.device)
        self.buckets = batch_buckets(rows)
        compile = self.device.type == "cuda" if compile is None else compile
        self.compiled = bool(compile) and prepare
        self._step = self._decode_logits
        if self.compiled:
            self._step = torch.compile(self._decode_logits, fullgraph=True, dynamic=False)
            limit = len(self.buckets) + 8  # one compilation per bucket
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
        self.graphs = self.compiled and self.device.type == "cuda"
        self._steps: dict[int, _BucketStep] = {}

    # --- block tables -------------------------------------------------------------------------------------------

    def set_table(self, row: int, blocks: Sequence[int]) -> None:
        """Row `row`'s block table for decode steps (the empty block after its blocks)."""
        table = torch.full((self.max_blocks,), self.cache.empty_block, dtype=torch.long)
        table[:len(blocks)] = torch.tensor(list(blocks), dtype=torch.long)
        self.tables[row].copy_(table)

    def add_block(self, row: int, index: int, block: int) -> None:
        self.tables[row, index] = block

    def _keys(self, highest: int) -> int:
        """Key positions for queries up to position `highest`: whole blocks, every position when compiled."""
        if self.compiled:
            return self.max_blocks * self.block_size
        return (highest // self.block_size + 1) * self.block_size

    # --- the forwards -------------------------------------------------------------------------------------------

    def prefill(self, chunks: Sequence[tuple[Sequence[int], int, Sequence[int]]], keep: int = 1) -> torch.Tensor:
        """Float32 logits (R, keep, V) of the last `keep` positions of each chunk (right-aligned: a shorter chunk's
        first ones are padding): chunks are (blocks, first position, tokens), one per sequence, written to the
        sequence's blocks."""
        width = max(len(tokens) for _, _, tokens in chunks)
        blocks_wide = max(len(blocks) for blocks, _, _ in chunks)
        tokens = torch.zeros((len(chunks), width), dtype=torch.long)
        positions = torch.full((len(chunks), width), -1, dtype=torch.long)
        tables = torch.full((len(chunks), max(blocks_wide, 1)), self.cache.empty_block, dtype=torch.long)
        for row, (blocks, start, chunk) in enumerate(chunks):
            tokens[row, width - len(chunk):] = torch.tensor(list(chunk))
            positions[row, width - len(chunk):] = torch.arange(start, start + len(chunk))
            tables[row, :len(blocks)] = torch.tensor(list(blocks), dtype=torch.long)
        positions, tables = positions.to(self.device), tables.to(self.device)
        highest = max(start + len(chunk) for _, start, chunk in chunks) - 1
        view = self.cache.view(tables, positions, (highest // self.block_size + 1) * self.block_size)
        logits = self.model(tokens.to(self.device), attention_mask=view.mask(self.dtype),
                            position_ids=positions.clamp(min=0), cache=view, use_cache=True,
                            logits_to_keep=keep).logits
        return logits[:, -keep:].float()

    def decode(self, batch: int, tokens: torch.Tensor, positions: torch.Tensor,
               start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for rows 0..batch-1 (`batch` a bucket): tokens and positions (batch,) on the host (-1: a row
        without a sequence); `start`: batch 1, its blocks consecutive from that one (see CacheView). Returns float32
        logits (batch, V) and their argmax; graphed, both are overwritten by the next step of the same bucket."""
        self.tokens[:batch, 0].copy_(tokens)
        self.positions[:batch, 0].copy_(positions)
        step = self._steps.get(batch) or self._steps.setdefault(batch, _BucketStep(self, batch))
        # (A compiled step reads every key position of the longest sequence: a view would read free blocks, whose
        # stale keys are masked out but may be NaN, and 0 * NaN is NaN. It gathers.)
        return step(self._keys(int(positions.max())), None if self.compiled else start)

    def warm_up(self) -> None:
        """Compiles (and on GPUs captures) the decode step of every batch bucket now, rather than when traffic
        first reaches each size. Its rows are positions -1: they write the sink block only."""
        if not self.compiled:
            return
        self.tokens.zero_()
        self.positions.fill_(-1)
        for batch in self.buckets:
            step = self._steps.setdefault(batch, _BucketStep(self, batch))
            step(self._keys(0))

    def _decode_logits(self, tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor, keys: int,
                       start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step: float32 logits (B, V) of each row's next token, and their argmax."""
        view = self.cache.view(tables, positions, keys, start)
        # Rows without a sequence are at position -1: they take position 0 (their outputs are thrown away).
        logits = self.model(tokens, attention_mask=view.mask(self.dtype), position_ids=positions.clamp(min=0),
                            cache=view, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        return logits, argmax_in_pieces(logits)


class _BucketStep:
    """The decode step at one batch size: rows 0..batch-1, inputs in views of the runner's fixed buffers. With
    graphs (CUDA) it is captured once and replayed."""

    def __init__(self, runner: ModelRunner, batch: int):
        self.runner = runner
        self.inputs = (runner.tokens[:batch], runner.positions[:batch], runner.tables[:batch])
        self._graph: torch.cuda.CUDAGraph | None = None
        self._outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, keys: int, start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        runner = self.runner
        if not runner.graphs:
            return runner._step(*self.inputs, keys, start)
        if self._graph is None:
            # Warm-up (compilation, library handles) on a side stream, as capture requires; it computes this very
            # step, so the keys and values it writes are the right ones.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    runner._step(*self.inputs, keys)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the event loop's thread may touch CUDA (a tokenizer, a metric) during the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = runner._step(*self.inputs, keys)
            self._graph, self._outputs = graph, outputs  # only once captured: a failed capture is tried again
        self._graph.replay()
        return self._outputs
