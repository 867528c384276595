"""Instruction fine-tuning: assistant-only labels from the template's structure, bad rows, and learning."""

import json

import pytest
import torch

from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
from argonne.chat import ChatSession
from argonne.run_config import load_run_config
from argonne.data import DataError
from argonne.data.sft import IGNORE, SFTStats, build_windows, read_conversations, render_with_labels
from argonne.inference.engine import Engine
from argonne.inference.sampling import SamplingParams
from argonne.training.build import SFT
from argonne.training.loop import train

from .conftest import SAMPLE_TOKENIZER

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "Six, which is 6."},
]


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer(SAMPLE_TOKENIZER)


def labelled_spans(ids, labels):
    """Runs of consecutive labelled tokens, as token lists."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        spans.append(current)
    return spans


@pytest.mark.parametrize("which", ["chatml-bpe", "qwen"])
@pytest.mark.slow
def test_only_assistant_tokens_carry_labels(bpe, which, request):
    tokenizer = bpe if which == "chatml-bpe" else load_tokenizer(request.getfixturevalue("qwen_tokenizer_dir"))
    ids, labels = render_with_labels(tokenizer, CONVERSATION)
    spans = labelled_spans(ids, labels)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Token by token: each assistant turn is its reply and the end-of-turn token, nothing else is labelled.
    expected = [tokenizer(f"{m['content']}", add_special_tokens=False).input_ids + [end]
                for m in CONVERSATION if m["role"] == "assistant"]
    assert spans == expected
    assert sum(label != IGNORE for label in labels) == sum(map(len, expected))


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize(
    "row,message",
    [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}, "role 'robot'"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
         "empty content"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, "int, not a string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"prompt": "hi"}, "'response' must be a non-empty string"),
        ({"text": "hi"}, "needs 'messages' or 'prompt' and 'response'"),
        ("{broken", "not valid JSON"),
    ],
    ids=["bad-role", "empty-content", "wrong-type", "no-assistant", "no-response", "no-fields", "bad-json"],
)
def test_malformed_rows_are_reported_by_line(tmp_path, row, message):
    good = {"prompt": "Hello?", "response": "Hi."}
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, row])
    with pytest.raises(DataError, match=rf"data.jsonl:3: .*{message}"):
        read_conversations([path])
    stats = SFTStats()
    assert len(read_conversations([path], on_error="skip", stats=stats)) == 2
    assert stats.skipped == 1 and "data.jsonl:3" in stats.problems[0]


def test_parquet_rows_and_prompt_response_pairs(tmp_path, bpe):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["Hi?", "Bye?"], "response": ["Hello.", "Goodbye."]}), tmp_path / "d.parquet")
    conversations = read_conversations([str(tmp_path / "d.parquet")])
    assert [c.messages[1]["content"] for c in conversations] == ["Hello.", "Goodbye."]
    assert conversations[1].source.endswith("row 1")


def test_packing_padding_and_truncation(bpe):
    from argonne.data.sft import Conversation

    short = [Conversation(f"x:{i}", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
             for i in range(6)]
    packed, padded = build_windows(bpe, short, 64), build_windows(bpe, short, 64, packing=False)
    assert packed.shape[1:] == (2, 65) and len(packed) < len(padded) == 6
    assert (padded[:, 1] != IGNORE).sum() == (packed[:, 1] != IGNORE).sum()
    stats = SFTStats()
    long = [Conversation("x:9", [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}])]
    assert build_windows(bpe, long, 32, stats=stats).shape == (1, 2, 33) and stats.truncated == 1


INSTRUCTIONS = [
    ("What is the capital of France?", "Paris."),
    ("What color is the sky?", "Blue."),
    ("How many legs does a spider have?", "Eight."),
    ("Who wrote Pride and Prejudice?", "Jane Austen."),
    ("What is the opposite of hot?", "Cold."),
    ("Which database uses SQL?", "PostgreSQL."),
]


@pytest.fixture
def base_model(tmp_path, bpe):
    torch.manual_seed(0)
    config = ArgonneConfig.from_preset("tiny", num_hidden_layers=2, hidden_size=128, intermediate_size=344,
                                       max_position_embeddings=128)
    ArgonneForCausalLM(config).save_pretrained(tmp_path / "base")
    bpe.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def sft_args(tmp_path, base, data, *extra):
    return [f"--model.init_from={str(base)!r}", f"--data.sft=[{str(data)!r}]", "--data.prepared=''",
            f"--data.tokenizer={str(base)!r}", "--data.seq_len=64", "--data.val_windows=0",
            f"--train.run_dir={str(tmp_path / 'sft')!r}", "--train.micro_batch_size=4", "--train.peak_tflops=1",
            "--train.tensorboard=false", "--optim.warmup_steps=5", "--optim.weight_decay=0", *extra]


@pytest.mark.slow
def test_sft_learns_a_small_instruction_set_and_chat_answers_with_it(tmp_path, base_model):
    data = write_jsonl(tmp_path / "instructions.jsonl",
                       [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                        for q, a in INSTRUCTIONS])
    config = load_run_config(None, sft_args(tmp_path, base_model, data, "--train.steps=90", "--optim.lr=3e-3",
                                            "--optim.min_lr=3e-4", "--data.packing=false", "--train.log_every=10"))
    summary = train(config, SFT)
    assert summary["loss"] < 0.05, summary
    model = ArgonneForCausalLM.from_pretrained(tmp_path / "sft" / "model")
    session = ChatSession(Engine(model, load_tokenizer(tmp_path / "sft" / "model")),
                          SamplingParams(max_new_tokens=12, temperature=0))
    for question, answer in INSTRUCTIONS[:3]:
        assert session.reply(question) == answer
        session.messages.clear()


def test_starting_weights_must_fit_exactly(tmp_path, base_model):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi?", "response": "Hello."}])
    other = tmp_path / "other"
    ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", num_hidden_layers=3)).save_pretrained(other)
    (other / "config.json").write_text((base_model / "config.json").read_text())  # claims the base's shape
    from argonne.loading import ModelError

    with pytest.raises(ModelError, match=r"weights do not fit the model: missing \[\], unexpected "
                                          r"\['model.layers.2"):
        train(load_run_config(None, sft_args(tmp_path, other, data, "--train.steps=1",
                                             f"--data.tokenizer={str(base_model)!r}")), SFT)


def test_tokenizers_without_a_template_get_chatml(bpe):
    from copy import deepcopy

    plain = deepcopy(bpe)
    plain.chat_template = None
    assert render_with_labels(plain, CONVERSATION) == render_with_labels(bpe, CONVERSATION)  # bpe ships ChatML


@pytest.mark.slow
def test_sft_can_start_from_a_training_checkpoint(tmp_path, base_model):
    from argonne.checkpoint import save_checkpoint

    model = ArgonneForCausalLM.from_pretrained(base_model)
    checkpoint = save_checkpoint(tmp_path / "ckpts", 3, model, torch.optim.AdamW(model.parameters()), {"step": 3},
                                 is_main=True, tokenizer=load_tokenizer(base_model))
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi?", "response": "Hello."}] * 4)
    summary = train(load_run_config(None, sft_args(tmp_path, checkpoint, data, "--train.steps=1",
                                                   "--train.log_every=1", "--optim.lr=1e-9", "--optim.min_lr=0")),
                    SFT)
    tokens = torch.randint(3, 8192, (1, 12))
    with torch.no_grad():
        tuned = ArgonneForCausalLM.from_pretrained(tmp_path / "sft" / "model")
        torch.testing.assert_close(tuned(tokens).logits, model(tokens).logits, rtol=1e-4, atol=1e-4)
    assert summary["loss"] > 0
