"""Text out of tokens: incremental detokenization equals decoding the whole row, stop strings cut the text (also
across pieces) and streaming matches; prompts from a file."""

import pytest
import torch

from argonne import load_tokenizer
from argonne.inference.engine import Engine, EngineSettings
from argonne.inference.sampling import SamplingParams
from argonne.inference.text import StopStrings, read_prompts

from ..conftest import SAMPLE_TOKENIZER
from ..test_model import LLAMA_STYLE, make_model
from .test_runner import IdTokenizer, prompts_of

GREEDY = dict(temperature=0.0)


@pytest.mark.slow
def test_stop_strings_cut_the_text_and_streaming_matches():
    engine = Engine(make_model(**{**LLAMA_STYLE, "max_position_embeddings": 96}), IdTokenizer(),
                    EngineSettings(max_batch=2))
    prompt = " ".join(map(str, prompts_of([4])[0]))
    params = SamplingParams(max_new_tokens=12, **GREEDY)
    full = engine.generate([prompt], params)[0]
    stop = full.split()[6]
    cut = engine.generate([prompt], SamplingParams(max_new_tokens=12, stop=[f" {stop}"], **GREEDY))[0]
    assert cut == full[: full.index(f" {stop}")]
    pieces = []
    ids = [int(t) for t in prompt.split()]
    assert engine.stream(ids, SamplingParams(max_new_tokens=12, stop=[f" {stop}"], **GREEDY), pieces.append).text == cut
    assert "".join(pieces) == cut and len([p for p in pieces if p]) > 1


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


def test_the_text_ends_before_the_earliest_stop_string_whatever_their_order():
    tokenizer = load_tokenizer(SAMPLE_TOKENIZER)
    ids = tokenizer("hello world", add_special_tokens=False).input_ids
    for stops in (["wor", "o w"], ["o w", "wor"]):
        assert feed_one_token_at_a_time(tokenizer, ids, stop=stops) == "hell"
        together = StopStrings(tokenizer, 1, stops, eos_ids=[])
        together.tokens[0] += ids[:-1]
        together.add([ids[-1]])  # one piece completing both
        assert together.finish() == ["hell"]


def test_a_stop_string_across_pieces_cuts_the_text_before_it():
    tokenizer = sentencepiece_style_tokenizer()
    ids = tokenizer(MIXED_TEXT, add_special_tokens=False).input_ids
    pieces = []
    text = feed_one_token_at_a_time(tokenizer, ids, stop=["naïve ca"], stream=pieces.append)
    assert text == "The cat sat on the mat. Über " and "".join(pieces) == text
    assert feed_one_token_at_a_time(tokenizer, ids, stop=["not there"]) == MIXED_TEXT


def test_prompts_from_a_file_one_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first\n\nsecond\n")
    assert read_prompts(None, str(path)) == ["first", "second"]
    path.write_text("\n")
    with pytest.raises(ValueError, match="no prompt given"):
        read_prompts(None, str(path))
