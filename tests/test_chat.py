"""`argonne chat`'s loop: Ctrl-C at the prompt and mid-reply (the conversation itself: test_evaluate.py)."""

import pytest

from argonne import load_tokenizer
from argonne.chat import ChatSession, run_chat
from argonne.inference.sampling import Completion, SamplingParams

from .conftest import SAMPLE_TOKENIZER


class ScriptedEngine:
    """Stands in for the Engine: every reply is "Hello there", streamed in two pieces; records each prompt."""

    def __init__(self):
        self.tokenizer = load_tokenizer(SAMPLE_TOKENIZER)
        self.max_len = 1024
        self.prompts = []

    def stream(self, ids, params, write):
        self.prompts.append(self.tokenizer.decode(ids))
        for piece in ("Hello", " there"):
            write(piece)
        ids = self.tokenizer("Hello there", add_special_tokens=False).input_ids
        return Completion("Hello there", len(ids), "length", token_ids=ids)


def scripted(*replies):
    """A `read` that answers each prompt from `replies`, raising the exceptions among them."""
    replies = iter(replies)

    def read(prompt):
        reply = next(replies)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    return read


PARAMS = SamplingParams(max_new_tokens=8, temperature=0)


def test_ctrl_c_at_the_prompt_says_how_to_quit_and_goes_on():
    written = []
    session = run_chat(ScriptedEngine(), PARAMS, None, read=scripted(KeyboardInterrupt(), "hi", "/quit"),
                       write=written.append)
    assert "/quit or Ctrl-D to exit" in "".join(written)
    assert [m["content"] for m in session.messages] == ["hi", "Hello there"]


def test_ctrl_c_mid_reply_stops_it_and_drops_the_exchange():
    engine, written = ScriptedEngine(), []

    def write(text):
        if text == " there" and len(engine.prompts) == 1:
            raise KeyboardInterrupt  # the user presses Ctrl-C while the first reply streams
        written.append(text)

    session = run_chat(engine, PARAMS, "Be brief.", read=scripted("first", "second", "/quit"), write=write)
    assert "".join(written).startswith("assistant> Hello\n")  # the prompt comes back on a new line
    # The interrupted question and its partial reply are not in the history the next reply sees.
    assert "first" not in engine.prompts[1] and "second" in engine.prompts[1]
    assert [m["content"] for m in session.messages] == ["Be brief.", "second", "Hello there"]


def test_an_interrupted_reply_leaves_the_session_as_it_was():
    session = ChatSession(ScriptedEngine(), PARAMS)
    session.reply("first")

    def interrupt(text):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.reply("second", interrupt)
    assert [m["content"] for m in session.messages] == ["first", "Hello there"]


def test_a_chat_template_that_raises_is_one_error_naming_it_before_the_first_turn():
    from argonne.chat import ChatTemplateError

    engine = ScriptedEngine()
    engine.tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match=r"the chat template of .*sample-bpe-8k fails on a one-question "
                                                r"conversation \(TemplateError: roles must alternate\)"):
        run_chat(engine, PARAMS, None, read=scripted("hi", "/quit"), write=lambda text: None)
    engine.tokenizer.chat_template = "{% if messages | length > 1 %}{{ raise_exception('one only') }}{% endif %}x"
    written = []
    session = run_chat(engine, PARAMS, None, read=scripted("hi", "again", "/quit"), write=written.append)
    assert "the chat template refused this conversation (one only)" in "".join(written)
    assert [m["content"] for m in session.messages] == ["hi", "Hello there"]  # the refused question is left out
