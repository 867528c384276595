"""The one sampler: top-k and top-p never leave the allowed set, the repetition penalty, the argmax in pieces,
non-finite rows flagged."""

import math

import pytest
import torch

from argonne.inference.sampling import (NON_FINITE, SamplingParams, apply_repetition_penalty, argmax_in_pieces,
                                        filter_logits, sample)


def draws(logits, params: SamplingParams, count: int = 500) -> set[int]:
    generator = torch.Generator().manual_seed(0)
    return {int(sample(logits, [params], [generator])[0]) for _ in range(count)}


def test_top_k_and_top_p_never_leave_the_allowed_set():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    probs = logits.softmax(-1)[0]
    assert draws(logits, SamplingParams(top_k=3, top_p=1.0, temperature=1.0)) == {
        int(i) for i in logits[0].topk(3).indices}
    order = probs.argsort(descending=True)
    nucleus = {int(order[0]), int(order[1])}  # 0.60 + 0.22 >= 0.8: the first two tokens reach top_p
    assert probs[order[0]] < 0.8 <= probs[order[0]] + probs[order[1]]
    assert draws(logits, SamplingParams(top_k=0, top_p=0.8, temperature=1.0)) == nucleus
    everything = draws(logits, SamplingParams(top_k=0, top_p=1.0, temperature=1.0), 2000)
    assert everything == set(range(6))  # the filters are what narrows the draws
    keep = torch.tensor([[0]]), torch.tensor([[1e-6]])
    only_best = filter_logits(logits, *keep)
    assert torch.equal(filter_logits(logits, keep[0], torch.tensor([[1e-300]])), only_best)  # 1e-300 is 0 in fp32
    assert torch.isfinite(only_best).sum() == 1 and only_best.argmax() == 5


def test_each_row_is_filtered_by_its_own_settings():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]] * 2)
    filtered = filter_logits(logits, torch.tensor([[1], [0]]), torch.tensor([[1.0], [1.0]]))
    assert torch.isfinite(filtered[0]).sum() == 1 and torch.isfinite(filtered[1]).all()


def test_repetition_penalty_makes_seen_tokens_less_likely():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
    greedy = SamplingParams(temperature=0.0, repetition_penalty=4.0)
    assert int(sample(logits, [greedy], [torch.Generator()], seen)[0]) == 2  # 2 / 4 < 1: the unseen token wins


def test_a_rows_draw_depends_on_its_own_generator_only():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)

    def row_1(other_seed):
        generators = [torch.Generator().manual_seed(s) for s in (other_seed, 7, other_seed + 1)]
        return [int(sample(logits, [params] * 3, generators)[1]) for _ in range(20)]

    assert row_1(0) == row_1(100)


def test_settings_out_of_range_are_errors_naming_them():
    for params, message in [(SamplingParams(top_p=0), "top_p must be in"), (SamplingParams(stop=("",)), "stop strings"),
                            (SamplingParams(max_new_tokens=0), "max_new_tokens"), (SamplingParams(top_k=-1), "top_k")]:
        with pytest.raises(ValueError, match=message):
            params.validate()
    huge_top_k = SamplingParams(temperature=1.0, top_k=2**63)  # (a server takes any integer): all tokens
    assert sample(torch.randn(1, 10), [huge_top_k], [torch.Generator()]).item() in range(10)


def test_non_finite_rows_are_flagged_greedy_or_sampled():
    logits = torch.randn(2, 10)
    logits[1, 3] = math.nan
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8)):
        chosen = sample(logits, [params] * 2, [torch.Generator(), torch.Generator()])
        assert chosen[1] == NON_FINITE and chosen[0] != NON_FINITE


@pytest.mark.parametrize("vocab", [151_665, 151_936, 100, 7])
@pytest.mark.slow
def test_argmax_in_pieces_equals_argmax_ties_and_nan_included(vocab):
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(0))
    logits[1] = 3.0  # every logit tied: the first index
    logits[2, [vocab // 3, vocab // 2]] = 1e9  # a tie between pieces
    logits[3] = -math.inf
    logits[4, [vocab // 4, vocab // 2]] = math.nan  # argmax takes the first NaN
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(argmax_in_pieces(logits.to(dtype)), logits.to(dtype).argmax(dim=-1))
    compiled = torch.compile(argmax_in_pieces, fullgraph=True)
    assert torch.equal(compiled(logits[:3]), logits[:3].argmax(dim=-1))
