"""OpenAI's API as `argonne serve` speaks it: the requests it takes, as pydantic models that declare each field's type
and range, and the objects it answers, as TypedDicts built from the engine's completions and updates.

A request is validated with the server's limits and the model's vocabulary as context
(`CompletionRequest.model_validate(body, context={"limits": ServerLimits, "vocab_size": int})`); a null is the same as
leaving the field out, and fields this server does not know are ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticKnownError
from typing_extensions import NotRequired, TypedDict

from .inference.engine import MAX_TOP_LOGPROBS
from .inference.sampling import Completion, SamplingParams, TokenLogprob

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat's is "as many as fit")
GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily (vLLM's rule): logits divided by less than ~1e-37 overflow float32 to inf,
which sampling cannot take."""
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_LENGTH = 1000
"""Characters in one stop string: the engine's thread checks, at every token of the request, whether the text ends in
the start of one (a cost that grows with its length squared, paid by every request sharing the batch)."""
PROMPT_FORMS = "a string, a list of strings, a list of token ids or a list of lists of token ids"


# --- Requests ---------------------------------------------------------------------------------------------------------

def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): valid JSON, but no tokenizer takes it
        raise ValueError("holds a lone surrogate, which is not valid Unicode") from None
    return text


# 16.0 is taken for 16: what some JSON writers make of 16.
Integer = Annotated[int, BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)]
Text = Annotated[str, AfterValidator(_encodable)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]


class StrictSchema(BaseModel):
    # Strict: neither "1" nor true is 1. Fields not declared are ignored: OpenAI defines many that this server need
    # not honour (user, presence_penalty, a message's name, ...).
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(StrictSchema):
    include_usage: bool | None = None


class Message(StrictSchema):
    role: Literal["system", "user", "assistant"]
    content: Text


class GenerationRequest(StrictSchema):
    """What /v1/completions and /v1/chat/completions share, validated with the context {"limits": ServerLimits,
    "vocab_size": int}. A null is the same as leaving the field out."""

    model: str | None = None
    max_tokens: Annotated[Integer, Field(ge=1)] | None = None  # and at most the server's max_tokens
    n: Annotated[Integer, Field(ge=1)] = 1  # choices per prompt, and at most the server's max_prompts
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[Integer, Field(ge=-1)] = 0  # -1 is vLLM's "all tokens", as 0 is ours
    repetition_penalty: Annotated[float, Field(ge=0.01, le=100)] = 1.0
    """1 is no penalty. Positive logits are divided by the penalty: one near 0 would overflow them to inf."""
    stop: Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS),
                    BeforeValidator(lambda stop: [] if stop == "" else [stop] if isinstance(stop, str) else stop)] = []
    seed: Annotated[Integer, Field(ge=-2**63, le=2**64 - 1)] | None = None  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Fields this server cannot honour, each defaulting to the value that asks for nothing: another is refused rather
    # than silently ignored.
    echo: Any = False
    best_of: Any = 1
    suffix: Any = ""
    tools: Any = []

    default_max_tokens: ClassVar[int | None] = None  # without max_tokens: as many as fit, up to this (None: the limit)

    @model_validator(mode="before")
    def null_is_absent(cls, body: dict) -> dict:
        return {name: value for name, value in body.items() if value is not None}

    @field_validator("max_tokens", "max_completion_tokens", "n", check_fields=False)
    def within_server_limits(cls, value: int | None, info: ValidationInfo) -> int | None:
        limits = info.context["limits"]
        limit = limits.max_prompts if info.field_name == "n" else limits.max_tokens
        if value is not None and value > limit:
            raise PydanticKnownError("less_than_equal", {"le": limit})
        return value

    @field_validator("stream_options")
    def only_when_streaming(cls, options: StreamOptions, info: ValidationInfo) -> StreamOptions:
        if not info.data.get("stream"):
            raise ValueError("is only allowed with stream: true")
        return options

    @field_validator("echo", "best_of", "suffix", "tools")
    def refuse_unsupported(cls, value, info: ValidationInfo):
        if value != cls.model_fields[info.field_name].default:
            raise ValueError("is not supported by this server; leave it out")
        return value

    def sampling_params(self, vocab_size: int) -> SamplingParams:
        """The engine's settings; max_new_tokens is set per prompt once its length is known (plan_choices)."""
        return SamplingParams(
            max_new_tokens=1, temperature=0.0 if self.temperature < GREEDY_BELOW else self.temperature,
            # Any top_p <= 1/vocab keeps only the most likely token (whose probability is at least 1/vocab); below
            # float32's range (1e-300) the sampler would read it as 0 and keep nothing.
            top_p=max(self.top_p, 1 / vocab_size), top_k=max(0, self.top_k),
            repetition_penalty=self.repetition_penalty, stop=tuple(self.stop), seed=self.seed)

    def asked_max_tokens(self) -> tuple[str, int | None]:
        """The parameter that sets the completion's length, and its value."""
        return "max_tokens", self.max_tokens

    def top_logprobs_wanted(self) -> int | None:
        """None: no logprobs; k: each token's logprob and the k most likely tokens'."""
        raise NotImplementedError


class CompletionRequest(GenerationRequest):
    prompt: list[str | list[int]]  # any of OpenAI's forms (PROMPT_FORMS), as a list of prompts
    logprobs: Annotated[Integer, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # OpenAI's legacy form: k

    default_max_tokens: ClassVar[int | None] = COMPLETIONS_DEFAULT_MAX_TOKENS

    @field_validator("prompt", mode="before")
    def listed_prompts(cls, prompt, info: ValidationInfo) -> list:
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(map(_is_integer, prompt))):
            prompt = [prompt]
        if not (isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt)):
            raise ValueError(f"must be {PROMPT_FORMS}")
        max_prompts, vocab_size = info.context["limits"].max_prompts, info.context["vocab_size"]
        if len(prompt) > max_prompts:
            raise ValueError(f"lists {len(prompt)} prompts; this server takes at most {max_prompts} in one request")
        for text_or_ids in prompt:
            if isinstance(text_or_ids, str):
                _encodable(text_or_ids)
            elif not text_or_ids or not all(_is_integer(t) and 0 <= t < vocab_size for t in text_or_ids):
                raise ValueError(f"a prompt of token ids must be a non-empty list of integers in [0, {vocab_size})")
        return prompt

    @field_validator("logprobs", mode="before")
    def false_is_none(cls, logprobs):
        return None if logprobs is False else logprobs  # chat's "no logprobs", which clients send here too

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


class ChatRequest(GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1, fail_fast=True)]  # a 1 MiB list: one problem, not 10^5
    max_completion_tokens: Annotated[Integer, Field(ge=1)] | None = None  # OpenAI's current name for max_tokens
    logprobs: bool = False
    top_logprobs: Annotated[Integer, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @field_validator("top_logprobs")
    def only_with_logprobs(cls, top: int, info: ValidationInfo) -> int:
        if not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return top

    def asked_max_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:  # it wins when both are given
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# --- Answers ----------------------------------------------------------------------------------------------------------

class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TextLogprobs(TypedDict):
    """/v1/completions' legacy form: one entry per token in each list."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]  # {token text: logprob}
    text_offset: list[int]  # where the token's text starts in the choice's text


class ChatTokenLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]  # the token's text in UTF-8
    top_logprobs: NotRequired[list[ChatTokenLogprob]]  # the most likely tokens (which do not list their own)


class ChatLogprobs(TypedDict):
    content: list[ChatTokenLogprob]


class TextChoice(TypedDict):
    index: int
    text: str
    logprobs: TextLogprobs | None
    finish_reason: str | None  # null in a stream's chunks but the choice's last


class ChatMessage(TypedDict, total=False):
    """Both keys in a whole answer. A stream's delta: the role in the choice's first chunk only, the content when
    the chunk adds text."""

    role: Literal["assistant"]
    content: str


class ChatChoice(TypedDict):
    index: int
    message: NotRequired[ChatMessage]  # a whole answer's
    delta: NotRequired[ChatMessage]  # a stream chunk's
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class Answer(TypedDict):
    """A whole answer (object text_completion or chat.completion), or one chunk of a stream (text_completion or
    chat.completion.chunk)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[TextChoice] | list[ChatChoice]
    usage: NotRequired[Usage | None]  # chunks: only with include_usage, null but in the last (which has no choices)


def usage(prompt_tokens: int, completions: list[Completion]) -> Usage:
    completion_tokens = sum(c.token_count for c in completions)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


class CompletionAnswer:
    """OpenAI's text_completion objects, whole and as stream chunks."""

    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, model_name: str, tokenizer):
        self.id, self.model, self.created = f"{self.prefix}-{uuid.uuid4().hex}", model_name, int(time.time())
        self.tokenizer = tokenizer
        self.offsets: dict[int, int] = {}  # per choice: where the next token's text starts (text_offset)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def logprobs(self, index: int, entries: list[TokenLogprob] | None) -> TextLogprobs | None:
        if entries is None:
            return None
        block = TextLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for entry in entries:
            text = self.token_text(entry.token)
            block["tokens"].append(text)
            block["token_logprobs"].append(entry.logprob)
            block["top_logprobs"].append({self.token_text(t): lp for t, lp in entry.top})
            block["text_offset"].append(self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + len(text)
        return block

    def choice(self, index: int, text: str, entries: list[TokenLogprob] | None, finish_reason: str | None,
               first_chunk: bool | None = None) -> TextChoice:
        """A whole answer's choice, or (first_chunk given) a stream chunk's."""
        return TextChoice(index=index, text=text, logprobs=self.logprobs(index, entries), finish_reason=finish_reason)

    def whole(self, completions: list[Completion], prompt_tokens: int) -> Answer:
        choices = [self.choice(i, c.text, c.logprobs, c.finish_reason) for i, c in enumerate(completions)]
        return Answer(id=self.id, object=self.object, created=self.created, model=self.model, choices=choices,
                      usage=usage(prompt_tokens, completions))

    def chunk(self, choices: list, **usage: Usage | None) -> Answer:
        return Answer(id=self.id, object=self.chunk_object, created=self.created, model=self.model, choices=choices,
                      **usage)


class ChatAnswer(CompletionAnswer):
    """OpenAI's chat.completion objects; a stream's first chunk carries the role."""

    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def entry(self, token: int, logprob: float) -> ChatTokenLogprob:
        text = self.token_text(token)
        return ChatTokenLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    def logprobs(self, index: int, entries: list[TokenLogprob] | None) -> ChatLogprobs | None:
        if entries is None:
            return None
        return ChatLogprobs(content=[ChatTokenLogprob(**self.entry(e.token, e.logprob),
                                                      top_logprobs=[self.entry(t, lp) for t, lp in e.top])
                                     for e in entries])

    def choice(self, index: int, text: str, entries: list[TokenLogprob] | None, finish_reason: str | None,
               first_chunk: bool | None = None) -> ChatChoice:
        if first_chunk is None:
            message = {"message": ChatMessage(role="assistant", content=text)}
        else:
            message = {"delta": ChatMessage(role="assistant", content=text) if first_chunk else
                       ChatMessage(content=text) if text else ChatMessage()}
        return ChatChoice(index=index, **message, logprobs=self.logprobs(index, entries), finish_reason=finish_reason)
