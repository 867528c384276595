"""The paged KV cache: what the model reads through a block table equals a plain forward, wherever the blocks lie;
the masks are the model's own; padding writes only the sink block and reads past an end read zeros; the prefix cache's keys, sharing and reuse
order. And the layout: the cache imports neither the engine nor the kernels."""

import torch

from argonne.inference.kv_cache import BlockPool, CacheView, PagedKVCache
from argonne.modeling_argonne import build_attention_mask

from ..test_model import LLAMA_STYLE, make_model
from ..test_package import import_graph


def modules_loaded_by(module: str) -> set[str]:
    """The Argonne modules that importing `module` loads: its imports, theirs, and so on (lazy ones counted), with
    the `argonne` package's own, which every import of a submodule runs first."""
    graph = import_graph()
    loaded, todo = set(), [module, *graph.get("argonne", set())]
    while todo:
        name = todo.pop()
        if name not in loaded:
            loaded.add(name)
            todo.extend(graph[name])
    return loaded


def test_the_cache_imports_neither_the_engine_nor_the_kernels():
    loaded = modules_loaded_by("argonne.inference.kv_cache")
    assert "argonne.configuration_argonne" in loaded  # the walk follows imports
    assert not loaded & {"argonne.inference.engine", "argonne.inference.runner", "argonne.inference.decode_kernels"}
    assert not modules_loaded_by("argonne.inference.decode_kernels") & {"argonne.inference.engine",
                                                                         "argonne.inference.runner"}


class CountingView(CacheView):
    asked = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        self.asked += 1
        return super().get_seq_length(layer_idx)


def test_scattered_blocks_give_the_plain_forwards_logits_and_the_model_never_asks_the_length():
    """Two rows prefilled (row 0 left-padded) into blocks that are neither adjacent nor in order, then one decode
    step: the logits equal a plain forward over each whole sequence. Given positions and the mask, the model never
    asks the cache how many tokens it holds."""
    model = make_model(**LLAMA_STYLE).eval()
    cache = PagedKVCache(model.config, num_blocks=8, block_size=4, device="cpu", dtype=torch.float32)
    tables = torch.tensor([[6, 1, 4, cache.empty_block], [3, 0, 7, 2]])
    lengths = [5, 9]
    tokens = torch.randint(3, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[-1, -1, -1, -1, 0, 1, 2, 3, 4], list(range(9))])  # row 0: 5 tokens, left-padded
    prompt = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), tokens[0, :5]]), tokens[1, :9]])
    with torch.no_grad():
        view = CountingView(cache, tables, positions, keys=12)
        model(prompt, attention_mask=view.mask(torch.float32), position_ids=positions.clamp(min=0), cache=view)
        step_positions = torch.tensor([[5], [9]])
        step_tokens = torch.stack([tokens[0, 5:6], tokens[1, 9:10]])
        view_2 = CountingView(cache, tables, step_positions, keys=16)
        step = model(step_tokens, attention_mask=view_2.mask(torch.float32), position_ids=step_positions,
                     cache=view_2).logits[:, -1]
        assert view.asked == view_2.asked == 0
        for row, length in enumerate(lengths):
            whole = tokens[row, :length + 1][None]
            full = model(whole, use_cache=False).logits[0, -1]
            torch.testing.assert_close(step[row], full, rtol=1e-5, atol=1e-5)
        # Padding wrote the sink block only: the block no row holds and the empty block are untouched (zero).
        pool = cache.layers[0].view(2, cache.kv_heads, cache.slots_per_head, -1)
        assert not pool[:, :, 5 * 4:6 * 4].any() and not pool[:, :, cache.empty_block * 4:cache.sink_block * 4].any()
        assert pool[:, :, cache.sink_block * 4:].any()


def test_a_row_of_consecutive_blocks_reads_a_view_equal_to_the_gather():
    cache = PagedKVCache(make_model(**LLAMA_STYLE).config, num_blocks=6, block_size=4, device="cpu",
                         dtype=torch.float32)
    for layer in cache.layers:
        layer.copy_(torch.randn(layer.shape))
    tables, positions = torch.tensor([[2, 3, 4, cache.empty_block]]), torch.tensor([[9]])
    gathered, viewed = cache.view(tables, positions, 12), cache.view(tables, positions, 12, start=2)
    for layer in range(len(cache.layers)):
        keys, values = viewed.read(layer)
        assert keys._base is not None and keys.shape == (1, cache.kv_heads, 12, keys.shape[-1])  # no copy
        assert torch.equal(keys, gathered.read(layer)[0]) and torch.equal(values, gathered.read(layer)[1])


def test_the_mask_is_the_models_own_over_the_keys_read():
    cache = PagedKVCache(make_model(**LLAMA_STYLE).config, num_blocks=4, block_size=4, device="cpu",
                         dtype=torch.float32)
    tables = torch.tensor([[0, 1, 2, 3]])
    view = cache.view(tables, torch.arange(3, 8)[None], keys=12)  # five queries at positions 3..7
    expected = build_attention_mask(None, 5, 3, torch.device("cpu"))  # (1, 1, 5, 8): causal after 3 cached
    assert view.allowed.shape == (1, 1, 5, 12) and not view.allowed[..., 8:].any()
    assert torch.equal(view.allowed[..., :8], expected.expand(1, 1, 5, 8))
    additive = view.mask(torch.bfloat16)
    assert additive.dtype == torch.bfloat16 and torch.equal(additive == 0, view.allowed)
    padded = cache.view(tables, torch.tensor([[-1, 0]]), keys=4)
    assert padded.allowed[0, 0, 0].all()  # a padding query sees every key (SDPA would give NaN for none)


def test_prefix_keys_chain_and_the_pool_reuses_the_oldest_freed_block_first():
    tokens = list(range(100, 140))
    keys = BlockPool.keys(tokens, 16, 2)
    assert keys == BlockPool.keys(tokens[:32] + [1] * 8, 16, 2)  # only the full blocks' tokens count
    assert BlockPool.keys([7] + tokens[1:], 16, 2)[1] != keys[1]  # block 1's key depends on block 0's tokens
    assert BlockPool.keys(tokens, 16, 2, known=keys[:1]) == keys
    pool = BlockPool(4)
    first, second = pool.allocate(), pool.allocate()
    pool.register(first, keys[0])
    pool.register(second, keys[1])
    other_start = BlockPool.keys([7] + tokens[1:], 16, 1)[0]
    assert pool.cached_prefix(keys) == [first, second] and pool.cached_prefix([other_start, keys[1]]) == []
    pool.release([first, second])  # the last block is freed first: the first to be handed out again
    assert list(pool.free) == [2, 3, second, first]
    pool.take([first])  # a cached block taken back from the free ones
    assert pool.holders[first] == 1 and first not in pool.free and pool.hits == 1
    for _ in range(3):
        pool.allocate()  # 2, 3, then `second`: handed out again, its content forgotten
    assert pool.cached_prefix(keys) == [first] and pool.free_count == 0
    assert BlockPool(4, prefix_caching=False).cached_prefix(keys) == []
