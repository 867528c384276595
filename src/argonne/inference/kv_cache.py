"""The KV cache: keys and values in fixed-size blocks, shared between sequences that begin alike.

Memory follows the tokens in use: a sequence holds the blocks its tokens fill (`block_size` tokens each, handed out
as it grows), not a row of the longest length. A sequence's block table maps its token positions to blocks, so
its blocks need not be adjacent, and a block that holds the same tokens after the same prefix can serve several
sequences (`BlockPool`'s prefix cache: a system prompt, few-shot examples, lm-eval's repeated contexts are prefilled
once).

`PagedKVCache` holds every layer's pool: one (2, n_kv * slots, head_dim) tensor per layer, keys at 0 and values at 1,
a slot being a token's place in a block (block * block_size + offset), each key/value head's slots one after
another. Two more blocks are special: table entries past a sequence's end point to the empty block, which holds
zeros and is never written (masked out, and never NaN: a masked key's weight is 0, but 0 * NaN is NaN), and padding
tokens and idle batch rows write to the sink block, which is never read.

`CacheView` is the cache as the model sees it for one forward (it has a transformers Cache's `update` and
`get_seq_length`): row b's new tokens at `positions[b]` (-1: padding) are written through its block table, and
`update` returns each row's keys and values gathered in position order, (B, n_kv, S, head_dim), contiguous per row;
`mask` hides the keys after each query's position. The model is given the positions and the mask, so it never asks
the cache how many tokens it holds, and a compiled step runs unchanged whatever the tables hold.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Sequence

import torch

from ..configuration_argonne import ArgonneConfig

BLOCK_SIZE = 16
"""Tokens per block (vLLM's and nano-vllm's default is 16 and 256): small blocks waste little at a sequence's end and
share more of a prefix; the gather per step costs the same either way."""


class PagedKVCache:
    """Every layer's keys and values for `num_blocks` blocks of `block_size` tokens (and the empty and sink blocks)."""

    def __init__(self, config: ArgonneConfig, num_blocks: int, block_size: int, device, dtype):
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, torch.device(device)
        self.empty_block, self.sink_block = num_blocks, num_blocks + 1
        self.kv_heads = config.num_key_value_heads
        self.slots_per_head = (num_blocks + 2) * block_size
        shape = (2, self.kv_heads * self.slots_per_head, config.head_dim)
        self.layers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.head_offsets = torch.arange(self.kv_heads, device=device) * self.slots_per_head
        if self.device.type == "cuda":
            # Static addresses: compiled steps take the pools as they are (as transformers' StaticCache does).
            for tensor in self.layers:
                torch._dynamo.mark_static_address(tensor)

    @staticmethod
    def bytes_per_block(config: ArgonneConfig, block_size: int, dtype: torch.dtype) -> int:
        elements = 2 * config.num_key_value_heads * block_size * config.head_dim * config.num_hidden_layers
        return elements * torch.empty((), dtype=dtype).element_size()

    def view(self, tables: torch.Tensor, positions: torch.Tensor, keys: int, start: int | None = None) -> CacheView:
        return CacheView(self, tables, positions, keys, start)

    def copy_block(self, source: int, target: int) -> None:
        """Copies one block's keys and values into another, in every layer."""
        size = self.block_size
        for layer in self.layers:
            pool = layer.view(2, self.kv_heads, self.slots_per_head, -1)
            pool[:, :, target * size:(target + 1) * size] = pool[:, :, source * size:(source + 1) * size]

    def clear_blocks(self, blocks: Sequence[int]) -> None:
        """Zeros the blocks, in every layer. Blocks are cleared as they are handed out: the positions of a sequence's
        last block past its end are masked out, but a masked value still reaches attention as 0 * value, and a
        stale NaN (left by a request that met one) would make that NaN."""
        if not blocks:
            return
        index = torch.tensor(list(blocks), device=self.device)
        for layer in self.layers:
            layer.view(2, self.kv_heads, self.num_blocks + 2, self.block_size, -1)[:, :, index] = 0

class CacheView:
    """Rows of sequences as the model's cache for one forward. tables (B, blocks) are the rows' block tables (the
    empty block past their ends), positions (B, T) the new tokens' positions (-1: padding, which writes the sink
    block and sees every key), keys the key positions read (a multiple of the block size, at most the
    table's). `start`: one row whose blocks are consecutive from block `start`, whose keys are then read as a view
    of the pool rather than gathered (a batch-1 decode step without CUDA graphs: one copy per layer less)."""

    def __init__(self, cache: PagedKVCache, tables: torch.Tensor, positions: torch.Tensor, keys: int,
                 start: int | None = None):
        size, heads = cache.block_size, cache.head_offsets[None, :, None]
        padding = positions < 0
        at = positions.clamp(min=0)
        slots = tables.gather(1, at // size) * size + at % size
        slots = torch.where(padding, cache.sink_block * size, slots)
        self.write_index = heads + slots[:, None, :]  # (B, n_kv, T)
        key_positions = torch.arange(keys, device=positions.device)
        self.cache, self.positions, self.keys, self.start = cache, positions, keys, start
        if start is None:
            key_slots = tables[:, key_positions // size] * size + key_positions % size
            self.read_index = heads + key_slots[:, None, :]  # (B, n_kv, S)
        query = torch.where(padding, keys, positions)
        self.allowed = (key_positions <= query[..., None])[:, None]  # (B, 1, T, S)
        if positions.shape == (1, 1):
            # One token of one row: decode_attention (the "gemv+attention" kernels) reads no key after it, and the
            # fused q/k/v kernel writes its key and value straight into the pool at its slot.
            self.write_positions = positions[0]
            self.write_slot = slots[0]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args):
        pool = self.cache.layers[layer_idx]
        pool[:, self.write_index] = torch.stack((key, value)).to(pool.dtype)
        return self.read(layer_idx)

    def read(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's keys and values (B, n_kv, S, head_dim), in position order."""
        cache = self.cache
        if self.start is not None:
            first = self.start * cache.block_size
            pool = cache.layers[layer_idx].view(2, cache.kv_heads, cache.slots_per_head, -1)
            view = pool[:, :, first:first + self.keys].unsqueeze(1)
            return view[0], view[1]
        gathered = cache.layers[layer_idx][:, self.read_index]
        return gathered[0], gathered[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never asked: callers pass positions and a 4D mask

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (B, 1, T, S), 0 or -inf in `dtype`: each query sees its row's keys up to its own position
        (additive because SDPA would otherwise convert a boolean one in every layer)."""
        return torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device).masked_fill(~self.allowed,
                                                                                                 -math.inf)


class BlockPool:
    """Which blocks are free, who holds each, and the prefix cache.

    A full block is registered under its content and everything before it: the key of block i of a sequence is a
    128-bit BLAKE2 digest of (key of block i - 1, its tokens), so equal keys mean equal keys and values. A later sequence whose first tokens
    fill the same blocks takes them (their holders counted) and prefills from after them. Freed blocks keep their
    content and registration until they are handed out again, oldest freed first (`free` keeps that order), so a
    prefix used recently survives the longest."""

    def __init__(self, num_blocks: int, prefix_caching: bool = True):
        self.num_blocks, self.prefix_caching = num_blocks, prefix_caching
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion-ordered: oldest freed first
        self.holders = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.block_of: dict[bytes, int] = {}
        self.hits = 0  # blocks taken from the prefix cache (for metrics and tests)

    @property
    def free_count(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        block = next(iter(self.free))
        del self.free[block]
        key = self.key_of[block]
        if key is not None:  # handed out again: its old content is forgotten
            del self.block_of[key]
            self.key_of[block] = None
        self.holders[block] = 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        for block in reversed(blocks):  # a sequence's last blocks are the least likely to be shared: reused first
            self.holders[block] -= 1
            if self.holders[block] == 0:
                self.free[block] = None

    def forget(self, blocks: Sequence[int]) -> None:
        """Unregisters the blocks (their content is not to be shared: cleared after NaN)."""
        for block in blocks:
            key = self.key_of[block]
            if key is not None and self.block_of.get(key) == block:
                del self.block_of[key]
            self.key_of[block] = None

    @staticmethod
    def keys(tokens: Sequence[int], block_size: int, blocks: int, known: Sequence[bytes] = ()) -> list[bytes]:
        """The keys of the first `blocks` full blocks of `tokens` (the first of them `known` already)."""
        keys = list(known[:blocks])
        for index in range(len(keys), blocks):
            digest = hashlib.blake2b(keys[-1] if keys else b"", digest_size=16)
            digest.update(array("q", tokens[index * block_size:(index + 1) * block_size]).tobytes())
            keys.append(digest.digest())
        return keys

    def cached_prefix(self, keys: list[bytes]) -> list[int]:
        """The blocks holding the longest run of `keys` from the first."""
        found = []
        if self.prefix_caching:
            for key in keys:
                block = self.block_of.get(key)
                if block is None:
                    break
                found.append(block)
        return found

    def take(self, blocks: Sequence[int]) -> None:
        """Holds cached blocks for one more sequence."""
        for block in blocks:
            if self.holders[block] == 0:
                del self.free[block]
            self.holders[block] += 1
        self.hits += len(blocks)

    def register(self, block: int, key: bytes) -> None:
        if self.prefix_caching and key not in self.block_of and self.key_of[block] is None:
            self.block_of[key] = block
            self.key_of[block] = key
