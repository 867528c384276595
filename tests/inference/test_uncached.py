"""The uncached greedy loop (models sharded in training): the engine's completions, stop strings and EOS included;
with lockstep every step runs; a row of NaN logits ends alone and is reported."""

import copy

import torch

from argonne import load_tokenizer
from argonne.inference.engine import Engine, EngineSettings
from argonne.inference.sampling import SamplingParams
from argonne.inference.uncached import greedy_uncached

from ..conftest import SAMPLE_TOKENIZER, small_model


def test_the_uncached_loop_completes_as_the_engine_does():
    model, tokenizer = small_model().eval(), load_tokenizer(SAMPLE_TOKENIZER)
    prompts = [tokenizer(text, add_special_tokens=False).input_ids for text in ("The database", "A table of")]
    engine = Engine(copy.deepcopy(model), tokenizer, EngineSettings(max_batch=2))
    free = engine.complete(prompts, SamplingParams(max_new_tokens=10, temperature=0))
    stop = free[0].text.split()[2]
    params = SamplingParams(max_new_tokens=10, temperature=0, stop=(stop,))
    expected = engine.complete(prompts, params)
    forwards = []

    def forward(rows):  # left-padded, as the harness pads them
        forwards.append(len(rows))
        width = max(map(len, rows))
        tokens = torch.tensor([[0] * (width - len(row)) + row for row in rows])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
        with torch.no_grad():
            return model(tokens, attention_mask=mask, use_cache=False).logits[:, -1].float()

    ours, broken = greedy_uncached(forward, prompts, 10, tokenizer, engine.eos_ids, params.stop)
    assert not broken and [(c.text, c.finish_reason) for c in ours] == [(c.text, c.finish_reason) for c in expected]
    assert expected[0].finish_reason == "stop"
    forwards.clear()
    greedy_uncached(forward, prompts, 10, tokenizer, engine.eos_ids, params.stop, lockstep=True)
    assert len(forwards) == 10  # every process runs every step, rows ended or not

    def nan_in_row_1(rows):
        logits = forward(rows)
        logits[1] = float("nan")
        return logits

    ours, broken = greedy_uncached(nan_in_row_1, prompts, 4, tokenizer, engine.eos_ids)
    assert broken and ours[1].finish_reason == "error" and ours[0].text == free[0].text[:len(ours[0].text)]
    assert ours[0].token_count == 4
