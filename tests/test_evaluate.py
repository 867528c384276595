"""Perplexity with a sliding window, and multi-turn chat."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
from argonne.chat import ChatSession, fit_history, render, run_chat
from argonne.cli import main
from argonne.evaluate import document_nll, perplexity
from argonne.generate import Generator, SamplingParams

from .conftest import SAMPLE_TOKENIZER


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


@pytest.mark.parametrize("position_embedding", ["rope", "learned"])
def test_long_documents_score_every_token_once_and_more_context_helps(tokenizer, position_embedding):
    model = small_model(position_embedding, context=32)
    text = " ".join(["alpha beta gamma delta epsilon"] * 40)  # ~200 tokens, far beyond the 32-token window
    ids = [0] + tokenizer(text, add_special_tokens=False).input_ids + [0]
    assert len(ids) > 150
    disjoint_nll, count = document_nll(model, ids, window=32, stride=32)
    overlapping_nll, count_again = document_nll(model, ids, window=32, stride=8)
    assert count == count_again == len(ids) - 1
    # With stride 1 every token sees the full window: scoring equals one token at a time.
    nll_one, _ = document_nll(model, ids[:50], window=32, stride=1)
    with torch.no_grad():
        manual = sum(
            torch.nn.functional.cross_entropy(model(torch.tensor([ids[max(0, t - 31):t]])).logits[0, -1:],
                                              torch.tensor([ids[t]]), reduction="sum").item()
            for t in range(1, 50))
    assert nll_one == pytest.approx(manual, rel=1e-4)
    assert math.isfinite(disjoint_nll) and math.isfinite(overlapping_nll)


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
    out = capsys.readouterr().out
    assert "in 3 documents" in out and "perplexity" in out
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
    generator = Generator(model, tokenizer)
    session = ChatSession(generator, SamplingParams(max_new_tokens=8, temperature=0))
    first = session.reply("Hello there")
    second = session.reply("And again")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"] == first and session.messages[3]["content"] == second
    assert 2 in session.params.stop_token_ids  # <|im_end|> ends a reply
    lines, written = iter(["hi", "/quit"]), []
    run_chat(generator, SamplingParams(max_new_tokens=4, temperature=0), None, read=lambda _: next(lines),
             write=written.append)
    assert written[0] == "assistant> "
