"""The engine (continuous batching): every request in a mixed batch gets what it gets alone, token for token (float32,
CPU), and what full recomputation gives; seeded sampling ignores its batch; rows and blocks are sized, freed and
never leak; prefill is chunked between decode steps."""

import copy
import gc
import threading

import pytest
import torch

from argonne import load_tokenizer
from argonne.inference.engine import (Engine, EngineRequest, EngineSettings, EngineStopped, QueueFull,
                                      plan_memory)
from argonne.inference.kv_cache import PagedKVCache
from argonne.inference.runner import batch_buckets
from argonne.inference.sampling import NonFiniteLogits, SamplingParams
from argonne.inference.scheduler import Sequence

from ..conftest import SAMPLE_TOKENIZER, scramble_norms, small_model

GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SAMPLE_TOKENIZER)


@pytest.fixture(scope="module")
def model():
    return small_model()


def new_engine(model, tokenizer, **settings) -> Engine:
    return Engine(copy.deepcopy(model), tokenizer, EngineSettings(**{"max_batch": 8, **settings}))


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    return new_engine(model, tokenizer, prefill_chunk=16)


def prompts_of(tokenizer) -> list[list[int]]:
    """Prompts of 1, 2, 5, 56 and 90 tokens (the long ones take several prefill chunks of 16)."""
    texts = ["The database", "A table of contents lists", " ".join(["tables and chairs"] * 14)]
    prompts = [[7], *[tokenizer(t, add_special_tokens=False).input_ids for t in texts]]
    return prompts + [list(range(100, 190))]


def run(engine: Engine, arrivals: list[tuple[int, EngineRequest]]) -> list:
    """Steps the engine (in this thread), submitting each request at its step; returns the handles in order."""
    handles = [None] * len(arrivals)
    step = 0
    while step <= max(at for at, _ in arrivals) or not all(h.completion for h in handles):
        for index, (at, request) in enumerate(arrivals):
            if at == step:
                handles[index] = engine.submit([request])[0]
        engine.step()
        step += 1
    return handles


def test_a_mixed_batch_equals_each_request_alone(engine, model, tokenizer):
    prompts = prompts_of(tokenizer)
    # Different lengths, arriving at different steps, finishing at different times (max tokens and a stop string).
    params = [SamplingParams(max_new_tokens=n, **GREEDY) for n in (30, 5, 17, 24)]
    arrivals = [(0, EngineRequest(prompts[0], params[0])), (0, EngineRequest(prompts[2], params[2])),
                (3, EngineRequest(prompts[4], params[3])), (6, EngineRequest(prompts[1], params[1]))]
    together = [h.completion for h in run(engine, arrivals)]
    alone = [engine.complete([request.prompt], request.params)[0] for _, request in arrivals]
    assert together == alone
    assert {c.finish_reason for c in together} == {"length"}
    assert [c.token_count for c in together] == [30, 17, 24, 5]
    # ... and what the plain forward over the whole sequence makes, step by step (no cache).
    assert [c.token_ids for c in together] == [recomputed(model, r.prompt, r.params.max_new_tokens)
                                               for _, r in arrivals]


def recomputed(model, prompt, steps, eos_ids=()) -> list[int]:
    """Greedy tokens of the plain forward over the whole sequence at each step (no cache), up to an EOS."""
    made = []
    with torch.no_grad():
        while len(made) < steps and not set(made[-1:]) & set(eos_ids):
            made.append(int(model(torch.tensor([list(prompt) + made]), use_cache=False).logits[0, -1].argmax()))
    return made


def test_the_batch_runs_together_and_prefill_is_chunked(model, tokenizer):
    """While a 90-token prompt is prefilled 16 tokens a step, the running request keeps getting a token every
    step; then both decode in one forward."""
    engine = new_engine(model, tokenizer, prefill_chunk=16)
    batches = []
    decode = engine._decode
    engine._decode = lambda: (batches.append(sorted(engine.scheduler.running)), decode())[1]
    running = engine.submit([EngineRequest([7, 8, 9], SamplingParams(max_new_tokens=20, **GREEDY))])[0]
    engine.step()
    long = engine.submit([EngineRequest(list(range(100, 190)), SamplingParams(max_new_tokens=4, **GREEDY))])[0]
    made = []
    for _ in range(6):
        engine.step()
        made.append(running._sequence.made)
    assert made == [3, 4, 5, 6, 7, 8]  # one token a step, however long the other prompt
    assert long._sequence.prefilled == 90 and long._sequence.made >= 1  # 6 steps of 16 tokens
    assert batches[:7] == [[0]] * 6 + [[0, 1]]  # prefilling rows are not decoded; then both in one step


def test_prompts_admitted_together_are_prefilled_in_one_forward(model, tokenizer):
    engine = new_engine(model, tokenizer, prefill_chunk=64)
    forwards = []
    forward = engine.model.forward
    engine.model.forward = lambda input_ids, **kwargs: (forwards.append(tuple(input_ids.shape)),
                                                        forward(input_ids, **kwargs))[1]
    prompts = prompts_of(tokenizer)[:3]  # 1, 2 and 5 tokens
    handles = engine.submit([EngineRequest(p, SamplingParams(max_new_tokens=3, **GREEDY)) for p in prompts])
    engine.step()
    assert forwards == [(3, max(map(len, prompts))), (4, 1)]  # one left-padded prefill, then one decode step
    assert [h._sequence.made for h in handles] == [2, 2, 2]
    while not all(h.completion for h in handles):
        engine.step()
    alone = [new_engine(model, tokenizer).complete([p], SamplingParams(max_new_tokens=3, **GREEDY))[0]
             for p in prompts]
    assert [h.completion for h in handles] == alone


def test_the_same_prompt_submitted_together_is_prefilled_once(model, tokenizer):
    """n choices of one prompt: one prefill, its full blocks shared with the others and its last partial block
    copied; each choice still samples as it would alone."""
    engine = new_engine(model, tokenizer, prefill_chunk=16)
    prompt = prompts_of(tokenizer)[4]  # 90 tokens: six chunks
    params = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed) for seed in (1, 2, 3)]
    handles = engine.submit([EngineRequest(prompt, p) for p in params])
    while not all(h.completion for h in handles):
        engine.step()
    assert engine.prompt_tokens == 90  # not 270
    assert engine.blocks.free_count == engine.blocks.num_blocks  # every shared block given back
    alone = [new_engine(model, tokenizer).complete([prompt], p)[0] for p in params]
    assert [h.completion for h in handles] == alone and len({c.text for c in alone}) > 1


def test_a_seeded_request_samples_the_same_whatever_shares_its_batch(engine, tokenizer):
    prompts = prompts_of(tokenizer)
    seeded = EngineRequest(prompts[1], SamplingParams(max_new_tokens=24, temperature=1.0, top_k=40, top_p=0.9,
                                                      repetition_penalty=1.2, seed=1234))
    alone = engine.complete([seeded.prompt], seeded.params)[0]
    companions = [EngineRequest(prompts[0], SamplingParams(max_new_tokens=30, temperature=0.7, seed=5)),
                  EngineRequest(prompts[3], SamplingParams(max_new_tokens=10, **GREEDY)),
                  EngineRequest(prompts[2], SamplingParams(max_new_tokens=20, temperature=1.3, top_k=5))]
    for at in (0, 2):
        handles = run(engine, [(0, companions[0]), (at, seeded), (1, companions[1]), (0, companions[2])])
        assert handles[1].completion == alone
    other_seed = engine.complete([seeded.prompt], SamplingParams(**{**vars(seeded.params), "seed": 99}))[0]
    assert other_seed.text != alone.text  # the seed is what decides


def test_a_reused_row_forgets_its_last_requests_tokens(model, tokenizer):
    """The repetition penalty's record of seen tokens is per batch row: a request in a row a penalized request used
    before samples as in a fresh engine."""
    penalized = SamplingParams(max_new_tokens=16, temperature=0.0, repetition_penalty=1.5)
    prompt = prompts_of(tokenizer)[1]
    fresh = new_engine(model, tokenizer, max_batch=1).complete([prompt], penalized)[0]
    used = new_engine(model, tokenizer, max_batch=1)
    assert used.complete([prompt], penalized)[0] == fresh
    assert used.complete([prompt], penalized)[0] == fresh  # the same row: its first run's tokens are forgotten


def test_a_model_with_learned_positions_batches_too(tokenizer):
    """Rows without a sequence sit at position -1 (writing the sink block): a model with learned position
    embeddings must not look it up."""
    engine = new_engine(small_model(max_position_embeddings=64, position_embedding="learned"), tokenizer,
                        prefill_chunk=8)
    # Row 0 ends first, so row 1 decodes beside an empty row.
    requests = [EngineRequest([5, 6, 7], SamplingParams(max_new_tokens=4, **GREEDY)),
                EngineRequest(list(range(100, 130)), SamplingParams(max_new_tokens=20, **GREEDY))]
    together = [h.completion for h in run(engine, [(0, requests[0]), (2, requests[1])])]
    assert together == [engine.complete([r.prompt], r.params)[0] for r in requests]
    assert [c.finish_reason for c in together] == ["length", "length"]


def test_a_qk_norm_model_batched_gives_the_plain_forwards_tokens(tokenizer):
    """QK-norm on the engine's paged cache and chunked prefill: each request of a mixed batch gets the greedy tokens
    of the plain forward over its whole sequence (no cache)."""
    plain = scramble_norms(small_model(qk_norm=True)).eval()
    engine = new_engine(plain, tokenizer, prefill_chunk=8)
    requests = [EngineRequest([5, 6, 7], SamplingParams(max_new_tokens=6, **GREEDY)),
                EngineRequest(list(range(100, 120)), SamplingParams(max_new_tokens=10, **GREEDY))]
    together = [h.completion for h in run(engine, [(0, requests[0]), (1, requests[1])])]
    for request, completion in zip(requests, together):
        made = []
        with torch.no_grad():
            while len(made) < request.params.max_new_tokens and not set(made[-1:]) & set(engine.eos_ids):
                ids = torch.tensor([request.prompt + made])
                made.append(int(plain(ids, use_cache=False).logits[0, -1].argmax()))
        assert completion.token_count == len(made) and len(set(made)) > 2
        assert completion.text == tokenizer.decode([t for t in made if t not in engine.eos_ids])


def test_a_failing_sink_cancels_its_own_request_only(model, tokenizer, caplog):
    engine = new_engine(model, tokenizer)

    def broken(update):
        raise RuntimeError("a client's bug")

    params = SamplingParams(max_new_tokens=10, **GREEDY)
    failing, healthy = engine.submit([EngineRequest([5, 6], params, sink=broken), EngineRequest([5, 6], params)])
    while not (failing.completion and healthy.completion):
        engine.step()
    assert failing.completion.finish_reason == "cancelled" and healthy.completion.finish_reason == "length"
    assert engine.active == 0 and "sink failed" in caplog.text


def test_sampling_follows_top_k_and_temperature(engine):
    # top_k 1 is greedy whatever the temperature; the same seed twice gives the same text.
    greedy = engine.complete([[7, 8]], SamplingParams(max_new_tokens=12, **GREEDY))[0]
    top1 = engine.complete([[7, 8]], SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=3))[0]
    assert top1.text == greedy.text
    twice = engine.complete([[7, 8]] * 2, SamplingParams(max_new_tokens=12, temperature=1.0, seed=3))
    assert twice[0] == twice[1]


def test_logprobs_are_the_models_log_softmax(engine, model, tokenizer):
    prompt = prompts_of(tokenizer)[1]
    completion = engine.complete([prompt], SamplingParams(max_new_tokens=6, **GREEDY), top_logprobs=3)[0]
    tokens = [entry.token for entry in completion.logprobs]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    expected = logits.log_softmax(-1)
    for row, entry in enumerate(completion.logprobs):
        assert entry.logprob == pytest.approx(expected[row, entry.token].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == expected[row].topk(3).indices.tolist()
        assert entry.top[0] == (entry.token, pytest.approx(entry.logprob))  # greedy: the chosen one is the top one
    assert len(tokens) == 6 and engine.complete([prompt], SamplingParams(max_new_tokens=2))[0].logprobs is None


def test_eos_and_stop_strings_end_a_sequence(engine, tokenizer, monkeypatch):
    prompt = prompts_of(tokenizer)[2]
    full = engine.complete([prompt], SamplingParams(max_new_tokens=20, **GREEDY), top_logprobs=0)[0]
    ids = [entry.token for entry in full.logprobs]
    stop = full.text.split()[3]
    cut = engine.complete([prompt], SamplingParams(max_new_tokens=20, stop=[stop], **GREEDY))[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    monkeypatch.setattr(engine, "eos_ids", [ids[2]])
    ended = engine.complete([prompt], SamplingParams(max_new_tokens=20, **GREEDY))[0]
    assert ended.finish_reason == "stop" and ended.token_count == 3  # two tokens, then the "EOS"


@pytest.mark.slow
def test_the_compiled_decode_step_equals_the_eager_one(tokenizer):
    """torch.compile traces the step whole (fullgraph: the paged cache's gathers and scattered writes, the masks), one
    compilation per batch bucket; on CUDA the same function is what each bucket's graph captures (test_gpu.py)."""
    model = small_model()  # two layers: each layer's cache addressed in the compiled step
    engine = new_engine(model, tokenizer)
    compiled = Engine(copy.deepcopy(model), tokenizer, EngineSettings(max_batch=2, prefill_chunk=16), compile=True)
    compiled.warm_up()  # every bucket compiled before the first request, writing only the sink block
    assert sorted(compiled.runner._steps) == [1, 2]
    prompts = prompts_of(tokenizer)[:3]  # three requests on two rows: one waits for a row
    params = SamplingParams(max_new_tokens=10, **GREEDY)
    assert compiled.complete(prompts, params) == engine.complete(prompts, params)


def test_blocks_come_from_the_memory_budget(model):
    config = model.config
    per_block = PagedKVCache.bytes_per_block(config, 16, torch.float32)
    assert per_block == 2 * config.num_key_value_heads * 16 * config.head_dim * config.num_hidden_layers * 4
    # Without a budget: blocks for max_batch sequences of max_len (the model's context, 128 tokens: 8 blocks).
    assert plan_memory(config, EngineSettings(max_batch=64), torch.float32) == (64, 128, 64 * 8)
    budget = 20.5 * per_block / 2**30
    assert plan_memory(config, EngineSettings(max_batch=64, kv_cache_memory=budget), torch.float32) == (64, 128, 20)
    assert plan_memory(config, EngineSettings(max_len=64, block_size=32), torch.float32) == (16, 64, 32)
    with pytest.raises(ValueError, match="holds no sequence"):
        plan_memory(config, EngineSettings(kv_cache_memory=7 * per_block / 2**30), torch.float32)  # 8 needed
    with pytest.raises(ValueError, match="longer than the model's context"):
        plan_memory(config, EngineSettings(max_len=129), torch.float32)
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        plan_memory(config, EngineSettings(max_batch=0), torch.float32)
    assert batch_buckets(1) == [1] and batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(12) == [1, 2, 4, 8, 12]


def test_the_decode_batch_is_the_smallest_bucket_holding_the_highest_row(model, tokenizer):
    engine = new_engine(model, tokenizer, max_batch=8)
    handles = engine.submit([EngineRequest([5 + i], SamplingParams(max_new_tokens=7 - 2 * i, **GREEDY))
                             for i in range(3)])
    while not all(h.completion for h in handles):
        engine.step()
    assert sorted(engine.runner._steps) == [1, 2, 4]  # rows 0-2: a batch of 4, then rows 0-1: 2, then row 0: 1
    assert engine.active == 0 and sorted(engine.scheduler.free_rows) == list(range(8))


def test_a_full_queue_refuses_all_or_nothing(model, tokenizer):
    engine = new_engine(model, tokenizer, max_batch=1, max_queue=2)
    request = EngineRequest([5], SamplingParams(max_new_tokens=2, **GREEDY))
    engine.submit([request, request])
    with pytest.raises(QueueFull) as full:
        engine.submit([request])
    assert full.value.retry_after >= 1 and engine.queue_length == 2
    engine.step()  # one admitted
    with pytest.raises(QueueFull):
        engine.submit([request, request])  # room for one only: neither is queued
    assert engine.queue_length == 1
    assert engine.submit([request], queue_limit=False)
    while engine.queue_length or engine.active:
        engine.step()
    assert len(engine.submit([request] * 3)) == 3  # more than the queue holds enters an empty queue (n choices)


def test_bad_requests_are_refused_before_queueing(engine):
    for prompt, params, message in [([], SamplingParams(), "empty"),
                                    ([5] * 120, SamplingParams(max_new_tokens=9), "exceeds the engine's max length"),
                                    ([8192], SamplingParams(), "prompt token ids"),
                                    ([5], SamplingParams(top_p=0), "top_p")]:
        with pytest.raises(ValueError, match=message):
            engine.submit([EngineRequest(prompt, params)])
    assert engine.queue_length == 0


def test_cancelling_frees_the_row_at_the_next_step(model, tokenizer):
    engine = new_engine(model, tokenizer, max_batch=2)
    params = SamplingParams(max_new_tokens=50, **GREEDY)
    first, second, waiting = engine.submit([EngineRequest([5, 6], params)] * 3)
    engine.step()
    engine.step()
    assert engine.active == 2 and engine.queue_length == 1
    first.cancel()
    waiting.cancel()
    engine.step()
    assert first.completion.finish_reason == "cancelled" and first.completion.token_count == 3  # 2 steps: 1 + 2
    assert waiting.completion.finish_reason == "cancelled" and waiting.completion.token_count == 0
    assert engine.active == 1 and engine.queue_length == 0
    while not second.completion:
        engine.step()
    assert second.completion.finish_reason == "length" and engine.active == 0


def test_the_engine_thread_serves_and_shuts_down(model, tokenizer):
    engine = new_engine(model, tokenizer, max_batch=4)
    updates = []
    done = threading.Event()

    def sink(update):
        updates.append(update)
        if update.completion:
            done.set()

    engine.start()
    try:
        params = SamplingParams(max_new_tokens=10, **GREEDY)
        engine.submit([EngineRequest([5, 6], params, sink=sink)])
        assert done.wait(30)
        assert "".join(u.text for u in updates) == updates[-1].completion.text
        assert engine.complete([[5, 6]], params)[0] == updates[-1].completion  # complete() waits on the thread
        long = engine.submit([EngineRequest([5, 6], SamplingParams(max_new_tokens=100, **GREEDY))])[0]
    finally:
        engine.shutdown(cancel=True, timeout=30)
    assert not engine.running
    assert long.wait(5).finish_reason in ("cancelled", "length")
    with pytest.raises(EngineStopped):
        engine.submit([EngineRequest([5], SamplingParams(max_new_tokens=2))])


def test_a_failed_step_ends_the_running_requests_and_frees_their_rows(model, tokenizer, monkeypatch, caplog):
    engine = new_engine(model, tokenizer, max_batch=2)
    monkeypatch.setattr(engine, "_decode", lambda: 1 / 0)
    engine.start()
    try:
        handle = engine.submit([EngineRequest([5, 6], SamplingParams(max_new_tokens=10, **GREEDY))])[0]
        assert handle.wait(30).finish_reason == "error"
        assert engine.active == 0 and engine.running
    finally:
        engine.shutdown()
    assert "engine step failed" in caplog.text


POISON = 666


def poison(model, where: str):
    """NaN logits in the rows whose input holds POISON ("prefill"), or in row 0 of every decode step ("decode");
    returns the hook's handle."""
    def hook(module, args, output):
        tokens = args[0]
        rows = (tokens == POISON).any(dim=1) if where == "prefill" else torch.zeros(len(tokens), dtype=torch.bool)
        if where == "decode" and tokens.shape[1] == 1:
            rows[0] = True
        output.logits[rows] = float("nan")

    return model.register_forward_hook(hook)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_non_finite_logits_fail_their_own_request_only(engine, where, temperature):
    params = SamplingParams(max_new_tokens=6, temperature=temperature, seed=0)
    hook = poison(engine.model, where)
    try:
        broken, healthy = engine.submit([EngineRequest([5, POISON, 6], params), EngineRequest([5, 7, 6], params)])
        while not (broken.completion and healthy.completion):
            engine.step()
        assert broken.completion.finish_reason == "error" and isinstance(broken.completion.error, NonFiniteLogits)
        assert healthy.completion.finish_reason == "length" and healthy.completion.error is None
        assert engine.active == 0
        with pytest.raises(NonFiniteLogits, match=r"non-finite logits \(NaN or Inf\)"):
            engine.complete([[5, POISON, 6], [5, 7, 6]], params)
    finally:
        hook.remove()
    assert engine.complete([[5, POISON, 6]], params)[0].finish_reason == "length"  # the engine goes on serving


@pytest.mark.slow
def test_no_row_block_or_sequence_leaks_after_many_requests(model, tokenizer):
    engine = new_engine(model, tokenizer, max_batch=4)
    prompts = prompts_of(tokenizer)
    handles = []
    for i in range(200):
        params = SamplingParams(max_new_tokens=1 + i % 5, temperature=(i % 3) * 0.5, seed=i)
        handles += engine.submit([EngineRequest(prompts[i % 4], params, top_logprobs=i % 2 or None)],
                                 queue_limit=False)
        if i % 7 == 0:
            handles[-1].cancel()
        engine.step()
    while not all(h.completion for h in handles):
        engine.step()
    assert engine.active == 0 and engine.queue_length == 0 and sorted(engine.scheduler.free_rows) == [0, 1, 2, 3]
    assert engine.blocks.free_count == engine.blocks.num_blocks and not engine.scheduler.admitted
    assert engine.tokens_per_second(window=60) * 60 == engine.generated_tokens  # all made within the minute
    assert not engine.scheduler.running and not engine.scheduler.prefilling
    del handles
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Sequence]
