"""The generator's static KV cache and its rules: preallocated keys and values, and the attention masks over them.

`StaticKVCache` holds every layer's keys and values for a batch of `max_len` columns. The model uses it as it uses a
transformers `Cache` (`update`, `get_seq_length`), but `update` returns the whole buffers, written or not, so the
caller must pass the model a 4D mask over all `max_len` columns that hides the columns not written yet, and the
position ids: the mask comes from here (`prefill_mask`, `decode_mask`). With both given, the model never asks the
cache how many tokens it holds, so a compiled decoding step does not depend on that number (a Python int) and runs
unchanged for every token.

`SlotKVCache` is the serving engine's (engine.py): a row (slot) per sequence, each at its own length.

Used by generate.py (`Generator`, `DecodeStep`), engine.py and decode_kernels.py (whose fused q/k/v kernel writes
straight into the static cache's buffers); it imports none of them.
"""

from __future__ import annotations

import math

import torch

from .configuration_argonne import ArgonneConfig


class StaticKVCache:
    """Keys and values for every layer, preallocated: one (2, B, n_kv, max_len, head_dim) tensor per layer, keys at 0
    and values at 1, so that one write stores both.

    It offers the two methods the model calls on a transformers Cache: `update` writes the new keys and values at
    `write_positions` and returns the whole buffers (the attention mask hides what is not written yet), and
    `get_seq_length` (`length`, kept by the caller). `columns` (max_len,) are the key columns the masks are made of.
    """

    def __init__(self, config: ArgonneConfig, batch: int, max_len: int, device, dtype):
        shape = (2, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.layers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.batch, self.max_len, self.device = batch, max_len, torch.device(device)
        self.write_positions = torch.zeros(1, dtype=torch.long, device=device)
        self.columns = torch.arange(max_len, device=device)
        self.length = 0
        if self.device.type == "cuda":
            # Static addresses: compiled code takes the buffers as they are (as transformers' StaticCache does).
            for tensor in self.layers:
                torch._dynamo.mark_static_address(tensor)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args):
        keys_and_values = self.layers[layer_idx]
        new = torch.stack((key, value)).to(keys_and_values.dtype)
        keys_and_values.index_copy_(3, self.write_positions, new)
        return keys_and_values[0], keys_and_values[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def prefill_mask(self, valid: torch.Tensor, width: int) -> torch.Tensor:
        """Boolean mask (B, 1, width, max_len) for queries at columns 0..width-1: each sees the keys marked in `valid`
        (B, max_len) up to itself, and always itself (a padding query would otherwise see no key, and SDPA return
        NaN)."""
        query_pos = torch.arange(width, device=valid.device)[:, None]
        causal = self.columns[None, :] <= query_pos
        mask = (causal[None] & valid[:, None, :]) | (self.columns[None, None, :] == query_pos[None])
        return mask[:, None]

    def decode_mask(self, column: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (B, 1, 1, max_len), 0 or -inf in `dtype`, for one query at `column` (a one-element tensor):
        it sees the keys marked in `valid` (B, max_len) up to its own. Additive because SDPA would otherwise turn a
        boolean mask into one in every layer."""
        allowed = ((self.columns <= column) & valid)[:, None, None, :]
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, -math.inf)


class SlotKVCache:
    """The serving engine's cache: keys and values for `slots` sequences of up to `max_len` tokens each, one
    (2, slots, n_kv, max_len + 1, head_dim) tensor per layer. A sequence owns one slot (a row) from its admission to
    its end, its token at position p in column p: no padding, and a row never sees another's keys. Column `max_len`
    is scratch: rows that take part in a decode step without a sequence to decode (an idle slot, or one still
    prefilling) write there, leaving every real column as its owner wrote it."""

    def __init__(self, config: ArgonneConfig, slots: int, max_len: int, device, dtype):
        shape = (2, slots, config.num_key_value_heads, max_len + 1, config.head_dim)
        self.layers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.slots, self.max_len, self.scratch, self.device = slots, max_len, max_len, torch.device(device)

    @staticmethod
    def bytes_per_slot(config: ArgonneConfig, max_len: int, dtype: torch.dtype) -> int:
        elements = 2 * config.num_key_value_heads * (max_len + 1) * config.head_dim * config.num_hidden_layers
        return elements * torch.empty((), dtype=dtype).element_size()

    def rows(self, slots: range | list[int], columns: torch.Tensor) -> SlotRows:
        return SlotRows(self, slots, columns)


class SlotRows:
    """Some slots of a SlotKVCache as the model's cache for one forward: row b (slot `slots[b]`) writes its new
    tokens' keys and values to columns `columns[b]` ((B, T): a decode step's one column per row, or a prefill chunk's
    columns), and each query sees its own row's keys up to its own column (`mask`). A range of slots is a view of
    the cache (a decode step's rows 0..B-1: nothing copied); other slots (prefill chunks of several sequences) are
    gathered for the attention."""

    def __init__(self, cache: SlotKVCache, slots: range | list[int], columns: torch.Tensor):
        self.columns = columns
        self.key_columns = torch.arange(cache.max_len + 1, device=cache.device)
        self.keys = cache.max_len + 1
        """Key columns the attention reads: fewer than all when every query's column is below them (the rest would
        be masked out anyway). Writes may go to any column, the scratch one included."""
        if not isinstance(slots, range) and len(slots) == 1:  # one slot is a range too: a view, nothing gathered
            slots = range(slots[0], slots[0] + 1)
        if isinstance(slots, range) and slots.step == 1:
            self.layers = [keys_and_values[:, slots.start:slots.stop] for keys_and_values in cache.layers]
            self.row_index, self.gather = torch.arange(len(slots), device=cache.device)[:, None], None
        else:
            self.layers = cache.layers
            self.gather = torch.tensor(list(slots), device=cache.device)
            self.row_index = self.gather[:, None]
        if len(slots) == 1:
            # Where this row's keys end: decode_attention (the "gemv+attention" kernels) reads no further.
            self.write_positions = columns[0]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args):
        keys_and_values = self.layers[layer_idx]
        # key, value (B, n_kv, T, head_dim) -> (B, T, 2, n_kv, head_dim), the shape of the indexed cache entries.
        new = torch.stack((key, value)).to(keys_and_values.dtype).permute(1, 3, 0, 2, 4)
        keys_and_values[:, self.row_index, :, self.columns] = new
        keys_and_values = keys_and_values[:, :, :, :self.keys]
        if self.gather is not None:
            keys_and_values = keys_and_values[:, self.gather]
        return keys_and_values[0], keys_and_values[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never asked: callers pass positions and a 4D mask

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (B, 1, T, keys), 0 or -inf in `dtype`: each query sees its row's keys up to its own column
        (additive because SDPA would otherwise convert a boolean one in every layer)."""
        allowed = (self.key_columns[:self.keys] <= self.columns[..., None])[:, None]
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, -math.inf)
