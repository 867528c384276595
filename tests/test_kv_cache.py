"""The file layout of issue 18: the static cache in kv_cache.py (no generate <-> decode_kernels cycle), its masks and
the model's use of a cache, and the loss in loss_argonne.py (no loss globals left in the model file)."""

import ast
from pathlib import Path

import torch

import argonne
from argonne import loss_argonne, modeling_argonne
from argonne.kv_cache import StaticKVCache
from argonne.modeling_argonne import build_attention_mask

from .test_model import LLAMA_STYLE, make_model
from .test_package import import_graph

PACKAGE = Path(argonne.__file__).parent


def modules_loaded_by(module: str) -> set[str]:
    """The Argonne modules that importing `module` loads: its imports, theirs, and so on (lazy ones counted), with
    the `argonne` package's own, which every import of a submodule runs first."""
    graph = import_graph()
    init = graph.get("argonne", set())
    loaded, todo = set(), [module, *init]
    while todo:
        name = todo.pop()
        if name not in loaded:
            loaded.add(name)
            todo.extend(graph[name])
    return loaded


def test_decode_kernels_does_not_import_the_generator():
    loaded = modules_loaded_by("argonne.decode_kernels")
    assert "argonne.kv_cache" in loaded  # the walk follows imports
    assert "argonne.generate" not in loaded


def test_the_cache_imports_neither_the_generator_nor_the_kernels():
    loaded = modules_loaded_by("argonne.kv_cache")
    assert not loaded & {"argonne.generate", "argonne.decode_kernels"}


def top_level_names(path: Path) -> set[str]:
    """Names a file defines at module level (functions, classes, assignments), imports left out."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
    return names


def test_the_loss_lives_in_loss_argonne_and_the_model_file_keeps_no_loss_globals():
    loss_names = top_level_names(PACKAGE / "loss_argonne.py")
    assert {"LOSS_CHUNK_LOGITS", "LOSS_CHUNK_LOGITS_GPU", "LOSS_VOCAB_MULTIPLE_GPU", "linear_cross_entropy",
            "cross_entropy_chunk", "accumulate_matmul", "_compiled_chunk_loss", "_compiled_cross_entropy_chunk",
            "_fp32_accumulating_addmm"} <= loss_names
    model_names = top_level_names(PACKAGE / "modeling_argonne.py")
    assert not model_names & loss_names
    assert not [name for name in model_names if "LOSS" in name or "loss" in name]
    # The model reaches the loss only through the import (what OutputHead calls), so a patch of the loss module's
    # settings is seen by the model.
    assert modeling_argonne.linear_cross_entropy is loss_argonne.linear_cross_entropy
    assert not [name for name in vars(modeling_argonne) if name.startswith("LOSS_") or "cross_entropy_chunk" in name]
    for path in ("modeling_argonne.py", "loss_argonne.py"):
        source = (PACKAGE / path).read_text()
        assert "torch.distributed" not in source.split('"""', 2)[2], path  # no distributed code (docstring aside)
        imports = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)]
        assert all(node.level == 1 or not (node.module or "").startswith("argonne") for node in imports), path


class CountingCache(StaticKVCache):
    asked = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        self.asked += 1
        return super().get_seq_length(layer_idx)


def test_the_model_asks_the_cache_for_its_length_only_to_derive_what_it_is_not_given():
    """The generator passes positions and a mask over the whole static cache: the model takes them as given, and
    the logits equal a full forward's; without them it derives them from the cache's length."""
    model = make_model(**LLAMA_STYLE)
    tokens = torch.randint(0, 320, (2, 7))
    tokens[0, :2] = 0  # row 0: a 5-token prompt, left-padded to 7
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[0, :2] = False
    positions = (valid[:, :7].long().cumsum(-1) - 1).clamp(min=0)
    cache = CountingCache(model.config, 2, 16, "cpu", torch.float32)
    with torch.no_grad():
        cache.write_positions = torch.arange(6)
        model(tokens[:, :6], attention_mask=cache.prefill_mask(valid, 6), position_ids=positions[:, :6], cache=cache)
        cache.length = 6
        column = torch.tensor([6])
        cache.write_positions = column
        step = model(tokens[:, 6:], attention_mask=cache.decode_mask(column, valid, torch.float32),
                     position_ids=positions[:, 6:], cache=cache).logits
        assert cache.asked == 0
        full = model(tokens, attention_mask=valid[:, :7].long(), use_cache=False).logits
        torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
        model(tokens[:, 6:], attention_mask=cache.decode_mask(column, valid, torch.float32), cache=cache)
        assert cache.asked == 1  # no position_ids: they follow the tokens the cache holds


def test_the_static_cache_masks_are_the_model_masks_over_the_whole_cache():
    """prefill_mask over written columns equals the model's own padding mask; later columns are hidden. decode_mask
    is its additive form for one query."""
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False
    cache = StaticKVCache(make_model(**LLAMA_STYLE).config, 2, 12, "cpu", torch.float32)
    prefill = cache.prefill_mask(valid, 5)
    assert prefill.shape == (2, 1, 5, 12) and not prefill[..., 5:].any()
    assert torch.equal(prefill[..., :5], build_attention_mask(valid[:, :5].long(), 5, 0, torch.device("cpu")))
    decode = cache.decode_mask(torch.tensor([5]), valid, torch.bfloat16)
    assert decode.shape == (2, 1, 1, 12) and decode.dtype == torch.bfloat16
    expected = build_attention_mask(valid[:, :6].long(), 1, 5, torch.device("cpu"))
    assert torch.equal(decode[..., :6] == 0, expected) and torch.isinf(decode[..., 6:]).all()
