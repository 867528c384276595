"""Generation: the static-cache decoder against transformers and full recomputation, sampling filters, stops."""

import json
import math

import pytest
import torch

from argonne import load_tokenizer
from argonne.cli import main
from argonne.loading import open_model
from argonne.generate import (
    Generator,
    NonFiniteLogits,
    SamplingParams,
    StopStrings,
    apply_repetition_penalty,
    argmax_in_pieces,
    default_kernels,
    filter_logits,
    read_prompts,
    sample_next,
)

from .conftest import SAMPLE_TOKENIZER, scramble_norms, small_model
from .test_model import GPT2_STYLE, LLAMA_STYLE, make_model

GREEDY = dict(temperature=0.0)


class IdTokenizer:
    """Token ids as text ("5 17 3"), so tests can drive the generator with exact ids."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": [int(t) for t in text.split()]})

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


@pytest.fixture(params=[("tiny", LLAMA_STYLE), ("argonne-1.0", GPT2_STYLE)], ids=["llama-style", "gpt2-style"])
def model(request):
    preset, shape = request.param
    return make_model(preset, **{**shape, "max_position_embeddings": 96})


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.slow
def test_greedy_equals_transformers_generate(model):
    generator = Generator(model, IdTokenizer())
    for prompt in prompts_of([5, 9, 1]):
        ours = generator.generate_ids([prompt], SamplingParams(max_new_tokens=20, **GREEDY))[0]
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0,
                                eos_token_id=None)[0, len(prompt):].tolist()
        assert ours == theirs


@pytest.mark.slow
def test_cached_decoding_equals_full_recomputation(model):
    prompt = prompts_of([6])[0]
    ours = Generator(model, IdTokenizer()).generate_ids([prompt], SamplingParams(max_new_tokens=25, **GREEDY))[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(25):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert ours == ids[len(prompt):]
    assert len(set(ours)) > 3


@pytest.mark.slow
def test_batched_prompts_of_different_lengths_equal_each_alone(model):
    generator = Generator(model, IdTokenizer())
    prompts = prompts_of([3, 11, 7, 1])
    params = SamplingParams(max_new_tokens=15, **GREEDY)
    batched = generator.generate_ids(prompts, params)
    assert batched == [generator.generate_ids([p], params)[0] for p in prompts]


def test_sampled_tokens_fed_to_the_step_equal_its_own_greedy_choice(model):
    """Greedy decoding feeds each step's choice to the next inside the step; sampling feeds tokens from outside.
    Sampling with top-k 1 picks the greedy token, so both must give the same tokens."""
    prompts = prompts_of([5, 3])
    greedy = Generator(model, IdTokenizer()).generate_ids(prompts, SamplingParams(max_new_tokens=10, **GREEDY))
    top_1 = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=1, seed=0)
    assert Generator(model, IdTokenizer()).generate_ids(prompts, top_1) == greedy


def test_generation_stops_at_eos(model):
    prompt = prompts_of([4])[0]
    free = Generator(model, IdTokenizer()).generate_ids([prompt], SamplingParams(max_new_tokens=12, **GREEDY))[0]
    model.config.eos_token_id = free[5]
    stopped = Generator(model, IdTokenizer()).generate_ids([prompt], SamplingParams(max_new_tokens=12, **GREEDY))[0]
    assert stopped == free[: free.index(free[5])]


@pytest.mark.slow
def test_decoding_checks_for_finished_rows_only_every_few_steps(model, monkeypatch):
    """Without a per-step consumer (streaming, stop strings) the loop does not wait for the device at every step;
    a batch whose rows all stopped early still returns exactly the tokens up to each row's EOS."""
    from argonne.generate import FINISHED_CHECK_EVERY

    prompts = prompts_of([4, 7])
    free = Generator(model, IdTokenizer()).generate_ids(prompts, SamplingParams(max_new_tokens=40, **GREEDY))
    model.config.eos_token_id = free[0][3]
    expected = [row[: row.index(free[0][3])] if free[0][3] in row else row for row in free]
    checks = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: checks.append(1) or real_bool(self))
    model.config.eos_token_id = 10**6  # an EOS that never comes: every row runs to max_new_tokens
    Generator(model, IdTokenizer()).generate_ids(prompts, SamplingParams(max_new_tokens=40, **GREEDY))
    assert len(checks) == 40 // FINISHED_CHECK_EVERY
    monkeypatch.undo()
    model.config.eos_token_id = free[0][3]
    stopped = Generator(model, IdTokenizer()).generate_ids(prompts, SamplingParams(max_new_tokens=40, **GREEDY))
    assert stopped == expected


def test_the_next_step_is_queued_before_the_host_looks_at_a_token(model, monkeypatch):
    """Streaming and stop strings read each token on the host; the next decoding step is already queued by then, so
    the device does not wait for the host's printing. The tokens are those of generation without a consumer."""
    from argonne.generate import DecodeStep

    prompts = prompts_of([4, 6])
    params = SamplingParams(max_new_tokens=9, **GREEDY)
    expected = Generator(model, IdTokenizer()).generate_ids(prompts, params)
    steps_queued, seen = [0], []
    real_call = DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, *a: steps_queued.__setitem__(0, steps_queued[0] + 1)
                        or real_call(self, *a))

    def on_tokens(tokens):
        seen.append((steps_queued[0], tokens.tolist()))

    assert Generator(model, IdTokenizer()).generate_ids(prompts, params, on_tokens) == expected
    assert [queued for queued, _ in seen] == [1, 2, 3, 4, 5, 6, 7, 8, 8]  # token t is read after step t + 1 is queued
    assert [tokens for _, tokens in seen] == [list(column) for column in zip(*expected)]


@pytest.mark.slow
def test_stop_strings_cut_the_text_and_streaming_matches(model):
    generator = Generator(model, IdTokenizer())
    prompt = " ".join(map(str, prompts_of([4])[0]))
    params = SamplingParams(max_new_tokens=12, **GREEDY)
    full = generator.generate([prompt], params)[0]
    stop = full.split()[6]
    cut = generator.generate([prompt], SamplingParams(max_new_tokens=12, stop=[f" {stop}"], **GREEDY))[0]
    assert cut == full[: full.index(f" {stop}")]
    pieces = []
    assert generator.stream(prompt, SamplingParams(max_new_tokens=12, stop=[f" {stop}"], **GREEDY),
                            pieces.append) == cut
    assert "".join(pieces) == cut and len(pieces) > 1


MIXED_TEXT = "The cat sat on the mat. Über naïve café, 東京 🙂 and again: 'the cat' 🙂🙂 sat."


class DecodeLengths:
    """A tokenizer that records how many tokens each decode call was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids, skip_special_tokens=True):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def feed_one_token_at_a_time(tokenizer, ids, stop=(), stream=None) -> str:
    texts = StopStrings(tokenizer, 1, stop, eos_ids=[], stream=stream)
    for token in ids:
        if texts.add(torch.tensor([token])):
            break
    return texts.finish()[0]


def sentencepiece_style_tokenizer():
    """A SentencePiece-style tokenizer (Llama 2's kind): a word's leading space is a "▁" the decoder drops at the start
    of a decode, so decoding tokens one by one and joining the pieces would lose the spaces."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = SentencePieceBPETokenizer()
    tokenizer.train_from_iterator([MIXED_TEXT] * 3, vocab_size=120, min_frequency=1, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.mark.parametrize("kind", ["qwen2.5", "sample-bpe", "sentencepiece-style"])
@pytest.mark.slow
def test_text_is_detokenized_incrementally_and_equals_decoding_the_whole_row(kind, request):
    """Each token's text comes from a short decode (context of the previous piece), never the whole row: the host's
    cost per token stays flat however long the generation; the text is what decoding the whole row gives, multi-byte
    characters split across tokens included, and streamed pieces add up to it."""
    if kind == "qwen2.5":
        tokenizer = load_tokenizer(request.getfixturevalue("qwen_tokenizer_dir"))
    elif kind == "sample-bpe":
        tokenizer = load_tokenizer(SAMPLE_TOKENIZER)
    else:
        tokenizer = sentencepiece_style_tokenizer()
    ids = tokenizer(MIXED_TEXT * 8, add_special_tokens=False).input_ids
    recording, pieces = DecodeLengths(tokenizer), []
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert "<unk>" not in whole and "\ufffd" not in whole
    assert feed_one_token_at_a_time(recording, ids, stream=pieces.append) == whole
    assert "".join(pieces) == whole and all("\ufffd" not in piece for piece in pieces)
    assert len(ids) > 100 and max(recording.lengths) <= 8


def test_a_stop_string_across_pieces_cuts_the_text_before_it():
    tokenizer = sentencepiece_style_tokenizer()
    ids = tokenizer(MIXED_TEXT, add_special_tokens=False).input_ids
    pieces = []
    text = feed_one_token_at_a_time(tokenizer, ids, stop=["naïve ca"], stream=pieces.append)
    assert text == "The cat sat on the mat. Über " and "".join(pieces) == text
    assert feed_one_token_at_a_time(tokenizer, ids, stop=["not there"]) == MIXED_TEXT


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


def test_top_k_and_top_p_never_leave_the_allowed_set():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    probs = logits.softmax(-1)[0]
    generator = torch.Generator().manual_seed(0)
    top_k = {int(i) for i in logits[0].topk(3).indices}
    draws = {int(sample_next(logits, SamplingParams(top_k=3, top_p=1.0, temperature=1.0), generator))
             for _ in range(500)}
    assert draws == top_k
    order = probs.argsort(descending=True)
    nucleus = {int(order[0]), int(order[1])}  # 0.60 + 0.22 >= 0.8: the first two tokens reach top_p
    assert probs[order[0]] < 0.8 <= probs[order[0]] + probs[order[1]]
    draws = {int(sample_next(logits, SamplingParams(top_k=0, top_p=0.8, temperature=1.0), generator))
             for _ in range(500)}
    assert draws == nucleus
    only_best = filter_logits(logits, top_k=0, top_p=1e-6)
    assert torch.equal(filter_logits(logits, top_k=0, top_p=1e-300), only_best)  # 1e-300 is 0 in float32
    assert torch.isfinite(only_best).sum() == 1 and only_best.argmax() == 5


def test_repetition_penalty_makes_seen_tokens_less_likely():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_bad_parameters_and_too_long_prompts_are_errors(model):
    generator = Generator(model, IdTokenizer())
    with pytest.raises(ValueError, match="top_p must be in"):
        generator.generate_ids([[1, 2]], SamplingParams(top_p=0))
    with pytest.raises(ValueError, match=r"exceeds the context window \(96 tokens\)"):
        generator.generate_ids([list(range(3, 90))], SamplingParams(max_new_tokens=10))


@pytest.mark.slow
def test_compiled_decode_step_matches_eager():
    model = make_model(**{**LLAMA_STYLE, "max_position_embeddings": 64})
    prompts = prompts_of([5, 3])
    params = SamplingParams(max_new_tokens=8, **GREEDY)
    eager = Generator(model, IdTokenizer(), compile=False).generate_ids(prompts, params)
    assert Generator(model, IdTokenizer(), compile=True).generate_ids(prompts, params) == eager


@pytest.mark.slow
def test_the_generator_merges_projections_and_decodes_what_the_unmerged_model_does():
    config = {**LLAMA_STYLE, "max_position_embeddings": 64}
    unmerged = make_model(**config)
    generator = Generator(make_model(**config), IdTokenizer())
    assert generator.model.model.layers[0].self_attn.qkv is not None
    prompt = prompts_of([5])[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(unmerged(torch.tensor([ids])).logits[0, -1].argmax()))
    assert generator.generate_ids([prompt], SamplingParams(max_new_tokens=12, **GREEDY))[0] == ids[len(prompt):]


def full_recomputation(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens from the plain forward over the whole sequence at each step (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_a_qk_norm_model_decodes_what_full_recomputation_gives():
    """QK-norm on the cached path (keys normed before they are cached), for a batch of prompts of two lengths."""
    config = {**LLAMA_STYLE, "max_position_embeddings": 64, "qk_norm": True}
    unmerged = scramble_norms(make_model(**config))
    generator = Generator(scramble_norms(make_model(**config)), IdTokenizer())
    prompts = prompts_of([6, 3])
    ours = generator.generate_ids(prompts, SamplingParams(max_new_tokens=12, **GREEDY))
    assert ours == [full_recomputation(unmerged, prompt, 12) for prompt in prompts]
    assert len(set(ours[0])) > 3


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(model_dir):
    model, tokenizer = open_model(model_dir, "cpu")
    generator = Generator(model, tokenizer)
    a, b = (generator.generate(["The table"], SamplingParams(max_new_tokens=12, seed=7))[0] for _ in range(2))
    assert a == b and a
    c = generator.generate(["The table"], SamplingParams(max_new_tokens=12, seed=8))[0]
    assert c != a


def test_cli_streams_the_continuation(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


def test_triton_kernels_on_a_cpu_are_a_clear_error(model_dir, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["generate", str(model_dir), "--prompt", "Hello", "--kernels", "gemv+attention"]) == 2
    assert "Triton kernels for CUDA GPUs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kernels must be one of torch, gemv, gemv\\+attention"):
        Generator(open_model(model_dir, "cpu")[0], None, kernels="fast")


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_prompts_from_a_file_one_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first\n\nsecond\n")
    assert read_prompts(None, str(path)) == ["first", "second"]
    path.write_text("\n")
    with pytest.raises(ValueError, match="no prompt given"):
        read_prompts(None, str(path))


def test_gpus_decode_on_the_gemv_kernels_by_default_and_cpus_on_torch(monkeypatch):
    """The GEMV kernels measured faster on an H200 (README); a CPU keeps torch's kernels (Triton needs a GPU), and so
    does a GPU machine without Triton."""
    import importlib.util

    assert default_kernels(torch.device("cuda")) == "gemv"
    assert default_kernels(torch.device("cpu")) == "torch"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    assert default_kernels(torch.device("cuda")) == "torch"


def nan_logits_from_call(model, call: int, row: int | None = None):
    """Makes the model's logits NaN (in `row`, else every row) from its `call`-th forward on (1: the prefill)."""
    calls = []

    def poison(module, args, output):
        calls.append(1)
        if len(calls) >= call:
            output.logits[slice(None) if row is None else row] = float("nan")
        return output

    model.register_forward_hook(poison)
    return model


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("call", [1, 3], ids=["in-prefill", "in-decode"])
def test_non_finite_logits_raise_instead_of_becoming_a_token(temperature, call):
    params = SamplingParams(max_new_tokens=6, temperature=temperature, seed=0)
    # complete_ids reads the tokens at every step (on_tokens), generate_ids alone at the end
    for way in (Generator.complete_ids, Generator.generate_ids):
        generator = Generator(nan_logits_from_call(small_model(), call, row=1), IdTokenizer())
        with pytest.raises(NonFiniteLogits, match=r"non-finite logits \(NaN or Inf\)"):
            way(generator, prompts_of([4, 3]), params)


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_generate_on_overflowing_logits_ends_with_one_line_and_no_traceback(overflowing_model_dir, capsys,
                                                                           temperature):
    argv = ["generate", str(overflowing_model_dir), "--prompt", "hi", "--max-new-tokens", "3", "--temperature",
            temperature, "--seed", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("argonne generate: error: the model produced non-finite logits (NaN or Inf)")
    assert err.count("\n") == 1 and "Traceback" not in err
