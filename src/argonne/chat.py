"""`argonne chat MODEL`: multi-turn chat through the tokenizer's chat template (ChatML when it has none).

The history is kept whole while it fits: when the rendered conversation plus the reply budget would exceed the
context window, the oldest turns (after any system message) are dropped first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from jinja2.exceptions import TemplateError

from .inference.engine import Engine
from .inference.sampling import SamplingParams
from .tokenizer import CHATML_TEMPLATE

END_OF_TURN = "<|im_end|>"


class ChatTemplateError(ValueError):
    """The tokenizer's chat template fails to render a conversation; the message names the tokenizer."""


def chat_template_of(tokenizer) -> str:
    return tokenizer.chat_template or CHATML_TEMPLATE


def render(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, chat_template=chat_template_of(tokenizer), tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def check_template(tokenizer, system: str | None) -> None:
    """Render a one-question conversation before the first turn, so that a template that raises (a
    raise_exception, a syntax error, a variable it lacks) ends the command with one line, not a traceback."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hello"}]
    try:
        render(tokenizer, messages)
    except TemplateError as error:
        raise ChatTemplateError(
            f"the chat template of {tokenizer.name_or_path} fails on a one-question conversation "
            f"({type(error).__name__}: {error}); fix chat_template in its tokenizer_config.json, or pass a tokenizer "
            f"with a working one (--tokenizer)"
        ) from None


def fit_history(tokenizer, messages: list[dict], budget: int) -> tuple[list[dict], list[int]]:
    """The most recent messages whose rendering fits `budget` tokens (a system message is always kept)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        ids = render(tokenizer, system + turns)
        if len(ids) <= budget:
            return system + turns, ids
        if len(turns) <= 1:
            raise ValueError(f"the last message alone takes {len(ids)} tokens; the budget is {budget}")
        turns = turns[2:] if len(turns) >= 3 else turns[-1:]  # drop the oldest exchange


def end_of_turn_ids(tokenizer) -> list[int]:
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return [token_id] if token_id is not None and token_id != tokenizer.unk_token_id else []


class ChatSession:
    """A conversation: each reply ends at the end-of-turn token (or EOS)."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None):
        stop_ids = tuple(params.stop_token_ids) + tuple(end_of_turn_ids(engine.tokenizer))
        self.engine, self.params = engine, replace(params, stop_token_ids=stop_ids)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def reply(self, user_text: str, write: Callable[[str], None] | None = None) -> str:
        """The assistant's answer to `user_text`, streamed to `write`. A reply that does not finish (Ctrl-C, an
        error) leaves the history as it was before the question, so turns keep alternating user / assistant."""
        before = self.messages
        tokenizer = self.engine.tokenizer
        budget = self.engine.max_len - self.params.max_new_tokens
        try:
            self.messages, ids = fit_history(tokenizer, before + [{"role": "user", "content": user_text}], budget)
            answer = self.engine.stream(ids, self.params, write or (lambda text: None)).text.strip()
        except BaseException:
            self.messages = before
            raise
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def run_chat(engine: Engine, params: SamplingParams, system: str | None, read=input, write=None) -> ChatSession:
    """The interactive loop, until /quit, /exit or Ctrl-D; returns the session. As in ollama, Ctrl-C at the prompt
    only says how to quit, and Ctrl-C during a reply stops that reply: the question and the partial answer are left
    out of the history (ask again), and the prompt comes back."""
    write = write or (lambda text: print(text, end="", flush=True))
    check_template(engine.tokenizer, system)
    session = ChatSession(engine, params, system)
    while True:
        try:
            user_text = read("you> ")
        except EOFError:
            write("\n")
            return session
        except KeyboardInterrupt:
            write("\nUse /quit or Ctrl-D to exit.\n")
            continue
        if not user_text.strip():
            continue
        if user_text.strip() in ("/quit", "/exit"):
            return session
        write("assistant> ")
        try:
            session.reply(user_text, write)
        except KeyboardInterrupt:
            pass  # the reply stops here; the session is as it was before the question
        except TemplateError as error:  # it rendered the first question: it refuses this conversation only
            write(f"the chat template refused this conversation ({error}); the question is left out\n")
        write("\n")
