"""Perplexity with a sliding window, and multi-turn chat."""


import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
from argonne.chat import ChatSession, fit_history, render, run_chat
from argonne_cli import main
from argonne.evaluate import document_nll, perplexity, scoring_windows
from argonne.inference.engine import Engine
from argonne.inference.sampling import NonFiniteLogits, SamplingParams

from .conftest import SAMPLE_TOKENIZER, break_weights


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SAMPLE_TOKENIZER)


def small_model(position_embedding="rope", context=64):
    torch.manual_seed(0)
    preset = "tiny" if position_embedding == "rope" else "argonne-1.0"
    return ArgonneForCausalLM(ArgonneConfig.from_preset(
        preset, vocab_size=8192, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        if preset == "tiny" else 4, head_dim=16, intermediate_size=128, max_position_embeddings=context,
        initializer_range=0.1)).eval()


def test_a_short_document_is_scored_in_one_pass(tokenizer):
    model = small_model()
    ids = [0] + tokenizer("The quick brown fox.", add_special_tokens=False).input_ids + [0]
    nll, count = document_nll(model, ids, window=64, stride=64)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    assert count == len(ids) - 1 and nll == pytest.approx(expected, rel=1e-5)


def brute_force_nll(model, ids: list[int], window: int, stride: int) -> float:
    """Each token scored on its own: token t's context is ids[s:t], where s is the start of the first window (a
    multiple of the stride) whose `window` inputs reach up to t - 1."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            s = 0
            while s + window < t:
                s += stride
            logits = model(torch.tensor([ids[s:t]])).logits[0, -1]
            total -= torch.log_softmax(logits.double(), -1)[ids[t]].item()
    return total


@pytest.mark.parametrize("position_embedding", ["rope", "learned"])
@pytest.mark.parametrize("stride", [32, 31, 8, 1])
@pytest.mark.slow
def test_long_documents_score_every_token_once_as_a_token_by_token_reference(tokenizer, position_embedding, stride):
    model = small_model(position_embedding, context=32)
    text = " ".join(["alpha beta gamma delta epsilon"] * 16)  # ~80 tokens, beyond the 32-token window
    ids = [0] + tokenizer(text, add_special_tokens=False).input_ids + [0]
    assert len(ids) > 70
    nll, count = document_nll(model, ids, window=32, stride=stride)
    assert count == len(ids) - 1
    assert nll == pytest.approx(brute_force_nll(model, ids, 32, stride), rel=1e-5)


def test_windows_score_each_token_once_with_the_promised_context():
    for length, window, stride in [(2, 4, 4), (10, 4, 4), (11, 4, 3), (50, 16, 1), (17, 16, 16), (18, 16, 5)]:
        scored = []
        for begin, end, first in scoring_windows(length, window, stride):
            assert end - begin <= window and first >= 0
            targets = range(begin + 1 + first, end + 1)
            scored += targets
            if begin > 0:  # past the document's start, a token has at least window - stride tokens before it
                assert all(t - begin >= window - stride for t in targets)
        assert scored == list(range(1, length)), (length, window, stride)


def test_batched_perplexity_equals_documents_one_at_a_time(tokenizer):
    model = small_model(context=32)
    texts = ["Short one.", " ".join(["alpha beta gamma"] * 20), "A middle-sized document, of a few words more."]
    batched = perplexity(model, tokenizer, texts, window=32, stride=16, batch_size=3)
    boundary = 0
    expected = [document_nll(model, [boundary] + tokenizer(t, add_special_tokens=False).input_ids + [boundary], 32, 16)
                for t in texts]
    assert batched.tokens == sum(c for _, c in expected)
    assert batched.nll == pytest.approx(sum(n for n, _ in expected), rel=1e-5)


def test_perplexity_command_on_parquet_and_text(tmp_path, tokenizer, capsys):
    model = small_model(context=64)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    pq.write_table(pa.table({"text": ["One document here.", "Another, longer document " * 20]}),
                   tmp_path / "docs.parquet")
    (tmp_path / "doc.txt").write_text("A text file is one document.")
    code = main(["eval", "perplexity", str(tmp_path / "model"), "--data", str(tmp_path / "docs.parquet"),
                 str(tmp_path / "doc.txt"), "--stride", "16"])
    assert code == 0
    captured = capsys.readouterr()
    assert "in 3 documents" in captured.out and "perplexity" in captured.out
    assert "perplexity: " in captured.err and "3doc" in captured.err  # progress, on stderr
    result = perplexity(model, tokenizer, ["One document here."])
    assert result.documents == 1 and result.value > 1
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokenizer, ["x"], window=16, stride=32)


def test_history_drops_the_oldest_exchange_first(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} " * 5},
                     {"role": "assistant", "content": f"answer {i} " * 5}]
    messages.append({"role": "user", "content": "last question"})
    full = len(render(tokenizer, messages))
    kept, ids = fit_history(tokenizer, messages, full - 10)
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last question"
    assert kept[1]["content"].startswith("question 1") and len(ids) <= full - 10
    assert render(tokenizer, messages).count(1) == 15  # <|im_start|> for 14 messages + the generation prompt


def test_chat_keeps_the_conversation_and_ends_turns(tokenizer):
    model = small_model(context=256)
    engine = Engine(model, tokenizer)
    session = ChatSession(engine, SamplingParams(max_new_tokens=8, temperature=0))
    first = session.reply("Hello there")
    second = session.reply("And again")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"] == first and session.messages[3]["content"] == second
    assert 2 in session.params.stop_token_ids  # <|im_end|> ends a reply
    lines, written = iter(["hi", "/quit"]), []
    run_chat(engine, SamplingParams(max_new_tokens=4, temperature=0), None, read=lambda _: next(lines),
             write=written.append)
    assert written[0] == "assistant> "


def test_bad_windows_empty_documents_and_non_utf8_files(tmp_path, tokenizer, capsys):
    model = small_model(context=32)
    for window, stride in ((0, None), (16, 0), (-1, None)):
        with pytest.raises(ValueError, match="window must be >= 1|stride"):
            perplexity(model, tokenizer, ["Some text."], window=window, stride=stride)
    with_empty = perplexity(model, tokenizer, ["", "Some text.", ""], window=32)
    alone = perplexity(model, tokenizer, ["Some text."], window=32)
    assert (with_empty.documents, with_empty.tokens) == (1, alone.tokens)  # nothing to score in an empty one
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert main(["eval", "perplexity", str(tmp_path / "model"), "--data", str(tmp_path / "latin1.txt")]) == 2
    assert "latin1.txt: not UTF-8 text" in capsys.readouterr().err


def test_perplexity_of_non_finite_logits_is_an_error_not_nan(tokenizer, overflowing_model_dir, tmp_path, capsys):
    with pytest.raises(NonFiniteLogits, match=r"non-finite logits \(NaN or Inf\)"):
        perplexity(break_weights(small_model()), tokenizer, ["One document here.", "And another."], batch_size=1)
    (tmp_path / "doc.txt").write_text("A text file is one document.")
    assert main(["eval", "perplexity", str(overflowing_model_dir), "--data", str(tmp_path / "doc.txt")]) == 2
    err = capsys.readouterr().err
    assert "\nargonne eval: error: the model produced non-finite logits" in err and "Traceback" not in err
