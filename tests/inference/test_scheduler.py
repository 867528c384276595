"""The scheduler on the paged cache: memory follows the tokens in use (admission by free blocks, preemption when they
run out, every request still getting what it gets alone), and the prefix cache (a shared prefix prefilled once,
outputs unchanged by it)."""

import copy

import pytest
import torch

from argonne import load_tokenizer
from argonne.inference.engine import Engine, EngineRequest, EngineSettings
from argonne.inference.kv_cache import PagedKVCache
from argonne.inference.sampling import SamplingParams

from ..conftest import SAMPLE_TOKENIZER, small_model

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SAMPLE_TOKENIZER)


@pytest.fixture(scope="module")
def model():
    return small_model()  # context 128: 8 blocks of 16 tokens


def engine_with_blocks(model, tokenizer, blocks: int, **settings) -> Engine:
    per_block = PagedKVCache.bytes_per_block(model.config, 16, torch.float32)
    return Engine(copy.deepcopy(model), tokenizer,
                  EngineSettings(kv_cache_memory=blocks * per_block / 2**30, **{"max_batch": 8, **settings}))


def test_memory_follows_the_tokens_in_use(model, tokenizer):
    """A budget of 8 blocks is one sequence of the whole context (128 tokens), the most a row per sequence held;
    requests of 20 tokens take 2 blocks each, so four run at once."""
    engine = engine_with_blocks(model, tokenizer, 8)
    assert engine.blocks.num_blocks == 8
    handles = engine.submit([EngineRequest([5 + i] * 10, SamplingParams(max_new_tokens=10, **GREEDY))
                             for i in range(4)])
    engine.step()
    assert engine.active == 4 and engine.blocks.free_count == 4  # one block each for its prompt so far
    while not all(h.completion for h in handles):
        engine.step()
    assert engine.scheduler.preemptions == 0 and engine.blocks.free_count == 8


def test_when_blocks_run_out_the_last_admitted_waits_and_everyone_gets_what_they_get_alone(model, tokenizer):
    engine = engine_with_blocks(model, tokenizer, 5, max_len=48)
    prompts = [[7, 8, 9], [5, 6, 7, 8, 9], list(range(100, 120)), list(range(100, 110))]
    params = [SamplingParams(max_new_tokens=24, **GREEDY),
              SamplingParams(max_new_tokens=24, temperature=1.0, seed=3),
              SamplingParams(max_new_tokens=20, temperature=0.7, seed=5, repetition_penalty=1.3),
              SamplingParams(max_new_tokens=24, **GREEDY)]
    handles = engine.submit([EngineRequest(p, q) for p, q in zip(prompts, params)])
    while not all(h.completion for h in handles):
        engine.step()
    assert engine.scheduler.preemptions > 0
    alone = Engine(copy.deepcopy(model), tokenizer, EngineSettings(max_batch=1, max_len=48))
    assert [h.completion for h in handles] == [alone.complete([p], q)[0] for p, q in zip(prompts, params)]
    assert engine.blocks.free_count == 5 and engine.active == 0


def test_a_shared_prefix_is_prefilled_once_and_changes_no_output(model, tokenizer):
    system = list(range(100, 150))  # 50 tokens: 3 full blocks
    questions = [system + [7, 8, 9], system + [20, 21], system + list(range(30, 50))]
    params = [SamplingParams(max_new_tokens=8, **GREEDY), SamplingParams(max_new_tokens=8, temperature=0.9, seed=2),
              SamplingParams(max_new_tokens=8, **GREEDY)]

    def run(prefix_caching: bool):
        engine = Engine(copy.deepcopy(model), tokenizer, EngineSettings(max_batch=4, prefill_chunk=64,
                                                                        prefix_caching=prefix_caching))
        first = engine.complete([questions[0]], params[0])
        rest = [engine.complete([q], p)[0] for q, p in zip(questions[1:], params[1:])]
        return first + rest, engine

    cached, engine = run(True)
    uncached, plain = run(False)
    assert cached == uncached
    assert plain.prompt_tokens == sum(map(len, questions))
    assert engine.prompt_tokens == plain.prompt_tokens - 2 * 48  # the later two took the 3 blocks
    assert engine.blocks.hits == 6 and plain.blocks.hits == 0
    # The same prompt again: its last token is always prefilled (its logits give the first token).
    again = engine.complete([questions[2]], params[2])[0]
    assert again == cached[2] and engine.prompt_tokens == plain.prompt_tokens - 2 * 48 + len(questions[2]) - 64


def test_a_request_that_met_nan_shares_no_block_and_its_blocks_come_back_clean(model, tokenizer):
    engine = engine_with_blocks(model, tokenizer, 3, max_len=48, max_batch=1)
    prompt = list(range(100, 140))  # 2 full blocks and a partial one: the whole pool
    # NaN from the embeddings on: in every key and value the request writes, and in its logits.
    hook = engine.model.model.embed_tokens.register_forward_hook(lambda module, args, output: output * float("nan"))
    broken = engine.submit([EngineRequest(prompt, SamplingParams(max_new_tokens=4, **GREEDY))])[0]
    while not broken.completion:
        engine.step()
    hook.remove()
    assert broken.completion.finish_reason == "error"
    assert not torch.isfinite(engine.runner.cache.layers[0]).all()  # its freed blocks hold NaN ...
    # ... and are zeroed when handed out again: a request whose last block is one of them, only partly filled (the
    # masked positions after its end would otherwise be NaN), gets what it gets alone.
    request = [list(range(200, 220)), SamplingParams(max_new_tokens=2, **GREEDY)]
    alone = Engine(copy.deepcopy(model), tokenizer, EngineSettings(max_batch=1)).complete([request[0]], request[1])[0]
    assert engine.complete([request[0]], request[1])[0] == alone and alone.finish_reason == "length"
    assert engine.complete([prompt], SamplingParams(max_new_tokens=4, **GREEDY))[0].finish_reason == "length"
    assert engine.blocks.hits == 0  # ... and were not offered to the prefix cache


def plain_score(model, tokens, n) -> tuple[float, bool]:
    with torch.no_grad():
        logprobs = model(torch.tensor([tokens[:-1]]), use_cache=False).logits[0].float().log_softmax(-1)[-n:]
    targets = torch.tensor(tokens[-n:])
    return float(logprobs.gather(1, targets[:, None]).sum()), bool((logprobs.argmax(-1) == targets).all())


def test_scoring_requests_share_their_context_and_equal_the_plain_forward(model, tokenizer):
    """lm-eval's loglikelihood on the engine: each (tokens, n) scores its last n tokens. A question's context before
    each answer is prefilled once (the others wait for its blocks rather than prefill them alongside), and the scores
    equal the plain forward's log-softmax."""
    context = list(range(100, 150))  # 3 full blocks
    requests = [(context + [7, 8, 9], 3), (context + [20], 1), (context + [21], 1), (context[:10] + [5, 6], 2)]
    greedy = plain_model_greedy_continuation(model, context, 3)
    requests.append((context + greedy, 3))
    results = {}
    for prefix_caching in (True, False):
        engine = Engine(copy.deepcopy(model), tokenizer, EngineSettings(max_batch=4, prefill_chunk=32,
                                                                        prefix_caching=prefix_caching))
        results[prefix_caching] = (engine.score(requests), engine.prompt_tokens)
    for (ours, expected) in zip(results[True][0], [plain_score(model, *r) for r in requests]):
        assert ours[0] == pytest.approx(expected[0], abs=1e-4) and ours[1] == expected[1]
    assert results[True][0][-1][1] and not results[True][0][0][1]  # the greedy continuation is the argmax
    assert results[False][1] == sum(len(tokens) - 1 for tokens, _ in requests)
    assert results[True][1] == results[False][1] - 3 * 48  # three requests took the context's blocks
    with pytest.raises(ValueError, match="score must be an integer"):
        engine.score([([5, 6], 2)])


def plain_model_greedy_continuation(model, prompt, steps) -> list[int]:
    made = []
    with torch.no_grad():
        for _ in range(steps):
            made.append(int(model(torch.tensor([prompt + made]), use_cache=False).logits[0, -1].argmax()))
    return made


def test_a_request_cancelled_mid_prefill_leaves_no_claim_on_its_prefix(model, tokenizer):
    """Its unfinished blocks were claimed (others wait for them); cancelled, the claims go with it, and the same
    prompt later runs."""
    engine = Engine(copy.deepcopy(model), tokenizer, EngineSettings(max_batch=2, prefill_chunk=16))
    prompt = list(range(100, 164))  # 64 tokens: 3 blocks cacheable, prefilled 16 tokens a step
    first = engine.submit([EngineRequest(prompt, SamplingParams(max_new_tokens=4, **GREEDY))])[0]
    engine.step()
    assert engine.scheduler.computing  # blocks 1 and 2 claimed
    first.cancel()
    engine.step()
    assert first.completion.finish_reason == "cancelled" and not engine.scheduler.computing
    again = engine.complete([prompt], SamplingParams(max_new_tokens=4, **GREEDY))[0]
    assert again.finish_reason == "length" and engine.blocks.free_count == engine.blocks.num_blocks


def test_nan_from_one_request_reaches_no_other(model, tokenizer):
    """A prompt that makes NaN, prefilled beside others (its padding queries attend to its NaN keys): it alone
    ends with an error; padding writes a block nobody reads, and keys past a row's end read zeros."""
    poisoned = copy.deepcopy(model)
    poisoned.model.embed_tokens.register_forward_hook(
        lambda module, args, output: output.masked_fill((args[0] == 77)[..., None], float("nan")))
    engine = Engine(poisoned, tokenizer, EngineSettings(max_batch=4))
    running = engine.submit([EngineRequest([5, 6, 7], SamplingParams(max_new_tokens=20, **GREEDY))])[0]
    engine.step()
    engine.step()
    long, broken = engine.submit([EngineRequest(list(range(200, 240)), SamplingParams(max_new_tokens=20, **GREEDY)),
                                  EngineRequest([77, 8], SamplingParams(max_new_tokens=4, **GREEDY))])
    while not (running.completion and long.completion and broken.completion):
        engine.step()
    assert broken.completion.finish_reason == "error"
    assert running.completion.finish_reason == long.completion.finish_reason == "length"
    assert long.completion == Engine(copy.deepcopy(model), tokenizer).complete([list(range(200, 240))],
                                                                               SamplingParams(max_new_tokens=20,
                                                                                              **GREEDY))[0]


def test_n_choices_whose_leader_waits_still_get_what_they_get_alone(model, tokenizer):
    """The leader of two choices waits for a prefix another request is prefilling; its follower goes alone, makes
    tokens, is preempted: the leader's prefill must not be handed to it as if it had made nothing."""
    generator = torch.Generator().manual_seed(0)
    shared = torch.randint(1, 8000, (48,), generator=generator).tolist()
    other = torch.randint(1, 8000, (60,), generator=generator).tolist()
    first, choices = shared + [1], shared + [2]
    engine = engine_with_blocks(model, tokenizer, 8, max_len=96, max_batch=4, prefill_chunk=8)
    params = [SamplingParams(max_new_tokens=n, **GREEDY) for n in (24, 30, 30, 10)]
    handles = engine.submit([EngineRequest(first, params[0])])
    engine.step()
    handles += engine.submit([EngineRequest(choices, params[1]), EngineRequest(choices, params[2])])
    handles += engine.submit([EngineRequest(other, params[3])])
    while not all(h.completion for h in handles):
        engine.step()
    assert engine.scheduler.preemptions > 0
    alone = Engine(copy.deepcopy(model), tokenizer, EngineSettings(max_batch=1, prefix_caching=False))
    prompts = [first, choices, choices, other]
    assert [h.completion for h in handles] == [alone.complete([p], q)[0] for p, q in zip(prompts, params)]
    assert engine.blocks.free_count == engine.blocks.num_blocks and not engine.scheduler.computing
