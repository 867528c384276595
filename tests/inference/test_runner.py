"""The model runner through the engine: greedy decoding equals transformers' generate() and full recomputation, for
prompts alone and batched, merged projections, QK-norm; the kernels each device gets. (The compiled step:
test_engine.py.)"""

import pytest
import torch

from argonne.inference.engine import Engine, EngineSettings
from argonne.inference.runner import default_kernels
from argonne.inference.sampling import SamplingParams

from ..conftest import scramble_norms
from ..test_model import GPT2_STYLE, LLAMA_STYLE, make_model

GREEDY = dict(temperature=0.0)


class IdTokenizer:
    """Token ids as text ("5 17 3"), so tests can drive the engine with exact ids."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": [int(t) for t in text.split()]})

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def engine_of(model, **kwargs) -> Engine:
    settings = kwargs.pop("settings", EngineSettings(max_batch=4, prefill_chunk=32))
    return Engine(model, IdTokenizer(), settings, **kwargs)


def greedy_ids(engine: Engine, prompts, max_new_tokens: int) -> list[list[int]]:
    return [c.token_ids for c in engine.complete(prompts, SamplingParams(max_new_tokens=max_new_tokens, **GREEDY))]


@pytest.fixture(params=[("tiny", LLAMA_STYLE), ("argonne-1.0", GPT2_STYLE)], ids=["llama-style", "gpt2-style"])
def model(request):
    preset, shape = request.param
    return make_model(preset, **{**shape, "max_position_embeddings": 96})


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in lengths]


def full_recomputation(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens from the plain forward over the whole sequence at each step (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.slow
def test_greedy_equals_transformers_generate(model):
    engine = engine_of(model)
    for prompt in prompts_of([5, 9, 1]):
        ours = greedy_ids(engine, [prompt], 20)[0]
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0,
                                eos_token_id=None)[0, len(prompt):].tolist()
        assert ours == theirs


@pytest.mark.slow
def test_cached_decoding_equals_full_recomputation(model):
    prompt = prompts_of([6])[0]
    reference = full_recomputation(model, prompt, 25)
    ours = greedy_ids(engine_of(model), [prompt], 25)[0]
    assert ours == reference and len(set(ours)) > 3


@pytest.mark.slow
def test_batched_prompts_of_different_lengths_equal_each_alone(model):
    engine = engine_of(model, settings=EngineSettings(max_batch=4, prefill_chunk=8))  # prompts in several chunks
    prompts = prompts_of([3, 11, 7, 1, 20])  # five prompts on four rows: one waits for a row
    batched = greedy_ids(engine, prompts, 15)
    assert batched == [greedy_ids(engine, [p], 15)[0] for p in prompts]


def test_sampled_tokens_equal_the_steps_own_greedy_choice(model):
    """Greedy rows take the argmax made inside the step; sampled rows the sampler's draw. Sampling with top-k 1
    picks the greedy token, so both must give the same tokens."""
    prompts = prompts_of([5, 3])
    engine = engine_of(model)
    greedy = greedy_ids(engine, prompts, 10)
    top_1 = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=1, seed=0)
    assert [c.token_ids for c in engine.complete(prompts, top_1)] == greedy


def test_generation_stops_at_eos(model):
    prompt = prompts_of([4])[0]
    free = greedy_ids(engine_of(model), [prompt], 12)[0]
    model.config.eos_token_id = free[5]
    stopped = engine_of(model).complete([prompt], SamplingParams(max_new_tokens=12, **GREEDY))[0]
    assert stopped.token_ids == free[: free.index(free[5])] and stopped.finish_reason == "stop"


def test_bad_parameters_and_too_long_prompts_are_errors(model):
    engine = engine_of(model)
    with pytest.raises(ValueError, match="top_p must be in"):
        engine.complete([[1, 2]], SamplingParams(top_p=0))
    with pytest.raises(ValueError, match=r"exceeds the engine's max length of 96 tokens"):
        engine.complete([list(range(3, 90))], SamplingParams(max_new_tokens=10))


@pytest.mark.slow
def test_the_runner_merges_projections_and_decodes_what_the_unmerged_model_does():
    config = {**LLAMA_STYLE, "max_position_embeddings": 64}
    unmerged = make_model(**config)
    engine = engine_of(make_model(**config))
    assert engine.model.model.layers[0].self_attn.qkv is not None
    prompt = prompts_of([5])[0]
    assert greedy_ids(engine, [prompt], 12)[0] == full_recomputation(unmerged, prompt, 12)


def test_a_borrowed_model_is_left_as_it_is():
    """prepare=False (training samples): the model keeps its separate projections and is not compiled."""
    model = make_model(**{**LLAMA_STYLE, "max_position_embeddings": 64})
    engine = engine_of(model, prepare=False, compile=True)
    assert model.model.layers[0].self_attn.qkv is None and not engine.compiled
    prompt = prompts_of([5])[0]
    assert greedy_ids(engine, [prompt], 6)[0] == full_recomputation(model, prompt, 6)


def test_a_qk_norm_model_decodes_what_full_recomputation_gives():
    """QK-norm on the cached path (keys normed before they are cached), for a batch of prompts of two lengths."""
    config = {**LLAMA_STYLE, "max_position_embeddings": 64, "qk_norm": True}
    unmerged = scramble_norms(make_model(**config))
    engine = engine_of(scramble_norms(make_model(**config)))
    prompts = prompts_of([6, 3])
    ours = greedy_ids(engine, prompts, 12)
    assert ours == [full_recomputation(unmerged, prompt, 12) for prompt in prompts]
    assert len(set(ours[0])) > 3


def test_gpus_decode_on_the_gemv_kernels_by_default_and_cpus_on_torch(monkeypatch):
    """The GEMV kernels measured faster on an H200 (README); a CPU keeps torch's kernels (Triton needs a GPU), and so
    does a GPU machine without Triton."""
    import importlib.util

    assert default_kernels(torch.device("cuda")) == "gemv"
    assert default_kernels(torch.device("cpu")) == "torch"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    assert default_kernels(torch.device("cuda")) == "torch"


def test_unknown_kernels_are_an_error():
    with pytest.raises(ValueError, match="kernels must be one of torch, gemv, gemv\\+attention"):
        engine_of(make_model(**LLAMA_STYLE), kernels="fast")
