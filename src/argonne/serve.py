"""`argonne serve MODEL`: an OpenAI-compatible HTTP server on FastAPI + uvicorn, in front of the serving engine.

Routes: /v1/completions, /v1/chat/completions (`stream: true` sends server-sent events), /v1/models, /health and
/metrics (Prometheus' text format). Every request is checked whole before anything is queued: its size
(`max_body_bytes`, from Content-Length or while a chunked body arrives), its JSON, and each parameter's type and range.
Tokenizing and rendering the chat template run in worker threads, so a long prompt never stalls the event loop.
Generation is the engine's (inference/engine.py: continuous batching, its own thread); this module only turns HTTP
into engine requests and updates into OpenAI's objects. When the engine's queue is full a request gets 429 with `Retry-After`;
a client that closes its stream or hangs up has its sequences cancelled, freeing their rows and blocks at the next step.
Bad requests get a 4xx JSON error in OpenAI's shape ({"error": {"message", "type", "param", "code"}}, `param` naming
the parameter); a bug in the server answers 500 in the same shape.
With an API key (`--api-key` or ARGONNE_API_KEY) every route but /health needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2.exceptions import TemplateError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .chat import end_of_turn_ids, render
from .inference.engine import (MAX_TOP_LOGPROBS, Engine, EngineRequest, EngineSettings, EngineStopped, QueueFull, Timing,
                     Update)
from .inference.sampling import Completion, SamplingParams, TokenLogprob
from .server_metrics import ServerMetrics

API_KEY_ENV = "ARGONNE_API_KEY"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat's is "as many as fit")
GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily (vLLM's rule): logits divided by less than ~1e-37 overflow float32 to inf,
which sampling cannot take."""
REPETITION_PENALTY_RANGE = (0.01, 100.0)
"""1 is no penalty. Positive logits are divided by the penalty: one near 0 would overflow them to inf."""
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_LENGTH = 1000
"""Characters in one stop string: the engine's thread checks, at every token of the request, whether the text ends in
the start of one (a cost that grows with its length squared, paid by every request sharing the batch)."""
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
ROLES = ("system", "user", "assistant")
PROMPT_FORMS = "a string, a list of strings, a list of token ids or a list of lists of token ids"
UNSUPPORTED = {"echo": False, "best_of": 1, "suffix": "", "tools": []}
"""Fields this server cannot honour, each with the value that asks for nothing (null does too): anything else is
refused rather than silently ignored. Other fields OpenAI defines (user, presence_penalty, ...) are ignored."""

log = logging.getLogger(__name__)


@dataclass
class ServerLimits:
    max_prompt_tokens: int = 8192
    """Longest accepted prompt; the model's context is the other bound."""
    max_tokens: int = 1024
    """Largest accepted max_tokens, so one request cannot hold the server for long."""
    max_body_bytes: int = 1 << 20
    """Largest request body, 1 MiB: 8,192 tokens take about 32 KB as text and 60 KB as token ids, so long
    conversations and several prompts fit, while reading and tokenizing one request stays short (1 MiB of English
    takes 1.1 s with the sample BPE on this project's CPU, in a worker thread)."""
    max_prompts: int = 16
    """Most choices one request may ask for: prompts listed (in /v1/completions) times `n`."""

    def __post_init__(self):
        problems = [f"{name} must be an integer >= 1, got {value!r}" for name, value in vars(self).items()
                    if isinstance(value, bool) or not isinstance(value, int) or value < 1]
        if problems:
            raise ValueError("server limits: " + "; ".join(problems))


@dataclass
class ServerStats:
    """Running totals (app.state.stats): what the server generated, and how many generations ended early because
    their client went away (or the server shut down)."""

    completions: int = 0
    completion_tokens: int = 0
    cancelled: int = 0

    def add(self, timing: Timing) -> None:
        self.completions += 1
        self.completion_tokens += timing.completion_tokens
        self.cancelled += timing.finish_reason == "cancelled"


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error")
    kind = "server_error" if status >= 500 else kind
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def resolve_api_key(api_key: str | None) -> str | None:
    """--api-key, else $ARGONNE_API_KEY, else None (no authentication). An empty or blank key is refused: it is what
    an unset shell variable gives (`--api-key "$KEY"`), and taking it for "no key" would drop authentication."""
    source = "--api-key"
    if api_key is None:
        api_key, source = os.environ.get(API_KEY_ENV), f"${API_KEY_ENV}"
    if api_key is not None and not api_key.strip():
        raise ValueError(f"the API key from {source} is empty; give a key, or serve without authentication by "
                         f"leaving out --api-key and unsetting {API_KEY_ENV}")
    if api_key is not None and not (api_key.isprintable() and api_key.isascii() and " " not in api_key):
        # An HTTP header cannot carry it as given (a trailing newline from a file, say): no client could match it.
        raise ValueError(f"the API key from {source} holds spaces, control or non-ASCII characters: "
                         f"{api_key!r:.20}...; no client could send it in an Authorization header")
    return api_key


class RequireApiKey:
    """ASGI middleware: every route but /health needs `Authorization: Bearer <key>`. Plain ASGI, so that streamed
    answers and a client's disconnect pass straight through."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            # The scheme is case-insensitive (RFC 9110); the key is compared in constant time: no guessing it
            # byte by byte.
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.expected):
                body = _error_body(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                   code="invalid_api_key")
                return await JSONResponse(body, 401)(scope, receive, send)
        return await self.app(scope, receive, send)


# Reading one parameter: null or absent gives the default; a wrong type or a value out of range is a 400 naming it.

def _show(value) -> str:
    """A value for an error message: its repr, shortened (a request may send megabytes)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    # An int is finite however large; math.isfinite would overflow converting a huge one to float.
    finite = _is_integer(value) or (isinstance(value, float) and math.isfinite(value))
    if not finite or not (low < value if low_open else low <= value) or value > high:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(400, f"{name} must be a number in {bounds}, got {_show(value)}", name)
    return float(value)


def integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 16.0: what some JSON writers make of 16
    if not _is_integer(value) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise RequestError(400, f"{name} must be an integer {bounds}, got {_show(value)}", name)
    return value


def boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(400, f"{name} must be true or false, got {_show(value)}", name)
    return value


def check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): valid JSON, but no tokenizer takes it
        raise RequestError(400, f"{param} holds a character that is not valid Unicode (a lone surrogate)", param)


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stop = [] if stop in (None, "") else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stop)):
        raise RequestError(400, f"stop must be a string or a list of up to {MAX_STOP_STRINGS} strings of 1 to "
                           f"{MAX_STOP_LENGTH} characters, got {_show(body.get('stop'))}", "stop")
    return tuple(stop)


def refuse_unsupported(body: dict) -> None:
    for name, off in UNSUPPORTED.items():
        if body.get(name) not in (None, off):
            raise RequestError(400, f"{name} is not supported by this server (got {_show(body[name])}; leave it out)",
                               name)


@dataclass
class GenerationRequest:
    """A request's generation settings, checked; max_new_tokens is set per prompt once its length is known."""

    params: SamplingParams
    max_tokens: int | None
    """As asked; None: `default_max_tokens`, clipped to what fits the context."""
    default_max_tokens: int
    max_tokens_param: str
    stream: bool
    include_usage: bool
    n: int = 1
    """Choices per prompt; choice j > 0 samples with seed + j when a seed is given."""
    top_logprobs: int | None = None
    """None: no logprobs; k: each token's logprob and the k most likely tokens'."""

    def choice_params(self, params: SamplingParams, choice: int) -> SamplingParams:
        if choice == 0 or params.seed is None:
            return params
        return replace(params, seed=(params.seed + choice) % 2**64)


def read_logprobs(body: dict, chat: bool) -> int | None:
    """Chat: `logprobs: true` and `top_logprobs` k; completions: `logprobs` k (OpenAI's two forms)."""
    if not chat:
        return None if body.get("logprobs") is False else integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    wanted = boolean(body, "logprobs")
    top = integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if wanted else None


def read_generation(body: dict, limits: ServerLimits, chat: bool, vocab_size: int) -> GenerationRequest:
    refuse_unsupported(body)
    # Chat takes max_completion_tokens (OpenAI's current name) or max_tokens; the first wins when both are given.
    asked = {name: integer(body, name, None, 1, limits.max_tokens)
             for name in (("max_completion_tokens", "max_tokens") if chat else ("max_tokens",))}
    max_tokens_param, max_tokens = next(((k, v) for k, v in asked.items() if v is not None), ("max_tokens", None))
    n = integer(body, "n", 1, 1, limits.max_prompts)
    temperature = number(body, "temperature", 1.0, 0, 2)
    params = SamplingParams(
        max_new_tokens=1,  # set per prompt (fit_prompt)
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        # Any top_p <= 1/vocab keeps only the most likely token (whose probability is at least 1/vocab); below
        # float32's range (1e-300) the sampler would read it as 0 and keep nothing.
        top_p=max(number(body, "top_p", 1.0, 0, 1, low_open=True), 1 / vocab_size),
        top_k=max(0, integer(body, "top_k", 0, -1)),  # -1 is vLLM's "all tokens", as 0 is ours
        repetition_penalty=number(body, "repetition_penalty", 1.0, *REPETITION_PENALTY_RANGE),
        stop=stop_strings(body),
        seed=integer(body, "seed", None, *SEED_RANGE),
    )
    stream = boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise RequestError(400, "stream_options is only allowed with stream: true", "stream_options")
    if options is not None and not (isinstance(options, dict)
                                    and isinstance(options.get("include_usage"), (bool, type(None)))):
        raise RequestError(400, f"stream_options must be {{include_usage: true|false}}, got {_show(options)}",
                           "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    default = limits.max_tokens if chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS, limits.max_tokens)
    return GenerationRequest(params, max_tokens, default, max_tokens_param, stream, include_usage, n,
                             read_logprobs(body, chat))


def read_prompts(body: dict, vocab_size: int, max_prompts: int) -> list[str | list[int]]:
    """`prompt` in any of OpenAI's forms, as a list of prompts (texts or token ids)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(map(_is_integer, prompt))):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise RequestError(400, f"prompt must be {PROMPT_FORMS}, got {_show(prompt)}", "prompt")
    if len(prompts) > max_prompts:
        raise RequestError(400, f"prompt lists {len(prompts)} prompts; this server takes at most {max_prompts} in "
                           "one request", "prompt")
    for prompt in prompts:
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
        elif not prompt or not all(_is_integer(t) and 0 <= t < vocab_size for t in prompt):
            raise RequestError(400, f"a prompt of token ids must be a non-empty list of integers in "
                               f"[0, {vocab_size}), got {_show(prompt)}", "prompt")
    return prompts


def read_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                       for m in messages)):
        raise RequestError(400, f"messages must be a non-empty list of {{role: {'|'.join(ROLES)}, content: string}}",
                           "messages")
    for message in messages:
        check_text(message["content"], "messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, f"model must be a string, got {_show(model)}", "model")
    if model not in (None, model_name):
        raise RequestError(404, f"model {_show(model)} does not exist; this server serves {model_name!r}", "model",
                           "model_not_found")


def fit_prompt(ids: list[int], request: GenerationRequest, limits: ServerLimits, context: int,
               param: str) -> SamplingParams:
    """The prompt's sampling settings, max_new_tokens set to what was asked, or by default to what fits."""
    if not ids:
        raise RequestError(400, "the prompt is empty", param)
    if len(ids) > limits.max_prompt_tokens:
        raise RequestError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                           f"{limits.max_prompt_tokens}", param, "context_length_exceeded")
    room = context - len(ids)
    if request.max_tokens is None and room < 1:
        raise RequestError(400, f"the prompt ({len(ids)} tokens) fills the context window of {context} tokens, "
                           "leaving no room for a completion", param, "context_length_exceeded")
    if request.max_tokens is not None and request.max_tokens > room:
        raise RequestError(400, f"the prompt ({len(ids)} tokens) plus {request.max_tokens_param} "
                           f"({request.max_tokens}) exceeds the context window of {context} tokens", param,
                           "context_length_exceeded")
    return replace(request.params, max_new_tokens=request.max_tokens or min(request.default_max_tokens, room))


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit` bytes: from Content-Length before reading
    anything, or while a chunked body arrives."""
    too_large = RequestError(413, f"the request body is larger than this server's limit of {limit:,} bytes "
                             "(argonne serve --max-body-bytes)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):  # 18 digits: past any limit
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:  # nobody will read the answer; a 400 rather than a 500's traceback in the log
        raise RequestError(400, "the client disconnected before sending the whole body")
    return bytes(body)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    # ValueError: bad JSON, bad UTF-8, an integer of more digits than Python converts; RecursionError: deep nesting.
    except (ValueError, RecursionError) as error:
        raise RequestError(400, f"the request body is not valid JSON ({str(error)[:100]})", code="invalid_json")
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", code="invalid_json")
    return body


class CompletionAnswer:
    """OpenAI's text_completion objects, whole and as stream chunks."""

    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, model_name: str, tokenizer):
        self.id, self.model, self.created = f"{self.prefix}-{uuid.uuid4().hex}", model_name, int(time.time())
        self.tokenizer = tokenizer
        self.offsets: dict[int, int] = {}  # per choice: where the next token's text starts (text_offset)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def logprobs(self, index: int, entries: list[TokenLogprob] | None) -> dict | None:
        """The legacy completions form: tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset."""
        if entries is None:
            return None
        block = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in entries:
            text = self.token_text(entry.token)
            block["tokens"].append(text)
            block["token_logprobs"].append(entry.logprob)
            block["top_logprobs"].append({self.token_text(t): lp for t, lp in entry.top})
            block["text_offset"].append(self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + len(text)
        return block

    def choice(self, index: int, completion: Completion) -> dict:
        return {"index": index, "text": completion.text, "logprobs": self.logprobs(index, completion.logprobs),
                "finish_reason": completion.finish_reason}

    def chunk_choice(self, index: int, update: Update, first: bool, with_logprobs: bool) -> dict:
        finish = update.completion.finish_reason if update.completion else None
        return {"index": index, "text": update.text,
                "logprobs": self.logprobs(index, update.logprobs) if with_logprobs else None, "finish_reason": finish}

    def head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, completions: list[Completion], prompt_tokens: int) -> dict:
        choices = [self.choice(i, c) for i, c in enumerate(completions)]
        return {**self.head(self.object), "choices": choices, "usage": usage(prompt_tokens, completions)}

    def chunk(self, choices: list[dict], **extra) -> dict:
        return {**self.head(self.chunk_object), "choices": choices, **extra}


class ChatAnswer(CompletionAnswer):
    """OpenAI's chat.completion objects; a stream's first chunk carries the role."""

    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def entry(self, token: int, logprob: float) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def logprobs(self, index: int, entries: list[TokenLogprob] | None) -> dict | None:
        if entries is None:
            return None
        return {"content": [{**self.entry(e.token, e.logprob), "top_logprobs": [self.entry(t, lp) for t, lp in e.top]}
                            for e in entries]}

    def choice(self, index: int, completion: Completion) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": completion.text},
                "logprobs": self.logprobs(index, completion.logprobs), "finish_reason": completion.finish_reason}

    def chunk_choice(self, index: int, update: Update, first: bool, with_logprobs: bool) -> dict:
        piece = update.text
        delta = {"role": "assistant", "content": piece} if first else {"content": piece} if piece else {}
        return {"index": index, "delta": delta,
                "logprobs": self.logprobs(index, update.logprobs) if with_logprobs else None,
                "finish_reason": update.completion.finish_reason if update.completion else None}


def usage(prompt_tokens: int, completions: list[Completion]) -> dict:
    completion_tokens = sum(c.token_count for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class Handoff:
    """Engine updates into the event loop's queues, one wakeup of the loop per batch of updates (an engine step
    makes one per running request) rather than one per token: each wakeup writes to the loop's self-pipe and
    takes the interpreter lock from the engine's thread."""

    def __init__(self):
        self.lock, self.pending, self.loop = threading.Lock(), [], None

    def put(self, queue: asyncio.Queue, item) -> None:
        with self.lock:
            self.pending.append((queue, item))
            if len(self.pending) > 1:
                return  # a flush is already on its way
        self.loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, item in pending:
            queue.put_nowait(item)


ENGINE_FAILED = "internal server error (the engine's step failed; see the server's log)"


def failure_body(completion: Completion) -> dict:
    """The 500 answer for a request whose sequence ended in an error: its cause where the engine knows it (the
    model's non-finite logits), else a failed step."""
    if completion.error is not None:
        return _error_body(500, f"internal server error: {completion.error}")
    return _error_body(500, ENGINE_FAILED)


def build_app(engine: Engine, model_name: str, api_key: str | None = None, limits: ServerLimits | None = None):
    """The app in front of `engine`. Its lifespan starts the engine's thread if it is not running, and at shutdown
    stops what it started (cancelling what still runs)."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty; pass None to serve without authentication")
    limits = limits or ServerLimits()
    stats, metrics, handoff = ServerStats(), ServerMetrics(engine), Handoff()
    engine.listeners += [stats.add, metrics.observe]

    @asynccontextmanager
    async def lifespan(_):
        started = not engine.running
        if started:
            engine.start()
        yield
        if started:  # uvicorn has let the requests in flight finish, or cancelled them after --drain-timeout
            await asyncio.to_thread(engine.shutdown, True)

    app = FastAPI(title="Argonne", description="OpenAI-compatible API for an Argonne model", lifespan=lifespan)
    app.state.stats, app.state.engine, app.state.metrics = stats, engine, metrics
    context, vocab_size = engine.max_len, engine.config.vocab_size
    created = int(time.time())
    if api_key is not None:
        app.add_middleware(RequireApiKey, api_key=api_key)

    @app.exception_handler(RequestError)
    async def request_error(_, error: RequestError):
        return JSONResponse(_error_body(error.status, error.message, error.param, error.code), error.status,
                            headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = {404: f"no route {request.method} {request.url.path}; this server has POST /v1/completions, "
                        "POST /v1/chat/completions, GET /v1/models, GET /metrics and GET /health",
                   405: f"{request.url.path} does not take {request.method}"}.get(error.status_code, error.detail)
        return JSONResponse(_error_body(error.status_code, message), error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def server_error(_, error: Exception):
        # A bug, not a bad request (those are all RequestErrors): the traceback goes to the log (Starlette re-raises
        # it after this answer), the client gets OpenAI's shape.
        return JSONResponse(_error_body(500, f"internal server error ({type(error).__name__})"), 500)

    async def read_json(request: Request) -> dict:
        body = parse_json(await read_body(request, limits.max_body_bytes))
        read_model(body, model_name)
        return body

    def submit(jobs: list[tuple[list[int], SamplingParams]], top_logprobs: int | None):
        """The jobs (one per choice) queued in the engine, all or none; their updates arrive on the returned
        asyncio queue as (choice index, Update)."""
        handoff.loop, updates = asyncio.get_running_loop(), asyncio.Queue()

        def sink(index: int):
            return lambda update: handoff.put(updates, (index, update))

        requests = [EngineRequest(ids, params, top_logprobs, sink(i)) for i, (ids, params) in enumerate(jobs)]
        try:
            return engine.submit(requests), updates
        except QueueFull as full:
            metrics.rejected.inc()
            raise RequestError(429, f"{full}; the queue holds {engine.settings.max_queue} requests "
                               "(argonne serve --max-queue)", code="queue_full",
                               headers={"Retry-After": str(full.retry_after)})
        except EngineStopped:
            raise RequestError(503, "the server is shutting down", code="shutting_down")
        except ValueError as error:  # what the engine cannot take and the checks above let through
            raise RequestError(400, str(error))

    async def respond(jobs, answer: CompletionAnswer, request: GenerationRequest, http_request: Request,
                      prompt_tokens: int):
        handles, updates = submit(jobs, request.top_logprobs)
        completions: list[Completion | None] = [None] * len(jobs)
        with_logprobs = request.top_logprobs is not None

        def cancel_all():
            for handle in handles:
                handle.cancel()

        if not request.stream:
            loop = asyncio.get_running_loop()
            check_at = loop.time() + DISCONNECT_POLL_S
            try:
                while None in completions:
                    try:
                        index, update = await asyncio.wait_for(updates.get(), max(0.0, check_at - loop.time()))
                        completions[index] = update.completion
                    except asyncio.TimeoutError:
                        pass
                    if loop.time() >= check_at:  # a client that hangs up frees its slots at the next step
                        if await http_request.is_disconnected():
                            cancel_all()
                        check_at = loop.time() + DISCONNECT_POLL_S
            finally:
                cancel_all()  # (nothing, once all have ended)
            failed = [c for c in completions if c.finish_reason == "error"]
            if failed:
                return JSONResponse(failure_body(failed[0]), 500)
            return JSONResponse(answer.whole(completions, prompt_tokens))
        no_usage = {"usage": None} if request.include_usage else {}

        async def events() -> AsyncIterator[str]:
            started = set()
            try:
                while None in completions:
                    index, update = await updates.get()
                    if update.completion and update.completion.finish_reason == "error":
                        yield sse(failure_body(update.completion))
                        break
                    if update.text or update.logprobs or update.completion or index not in started:
                        choice = answer.chunk_choice(index, update, index not in started, with_logprobs)
                        yield sse(answer.chunk([choice], **no_usage))
                        started.add(index)
                    completions[index] = update.completion
                else:
                    if request.include_usage:  # OpenAI's last chunk: no choices, the whole request's usage
                        yield sse(answer.chunk([], usage=usage(prompt_tokens, completions)))
            finally:
                # Also when the client went away (Starlette cancels this stream): its sequences end at the next step.
                cancel_all()
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        if not engine.running:  # (its thread ended: shut down, or a bug it could not survive)
            return JSONResponse({"status": "engine stopped"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                             "owned_by": "argonne"}]}

    def encode(prompts: list[str | list[int]]) -> list[list[int]]:
        return [engine.tokenizer(p, add_special_tokens=False).input_ids if isinstance(p, str) else p for p in prompts]

    def choices(prompts: list[list[int]], generation: GenerationRequest, param: str) -> list:
        if len(prompts) * generation.n > limits.max_prompts:
            raise RequestError(400, f"{len(prompts)} prompts x n = {generation.n} asks for "
                               f"{len(prompts) * generation.n} choices; this server makes at most "
                               f"{limits.max_prompts} per request", "n")
        jobs = []
        for ids in prompts:  # OpenAI's order: each prompt's n choices together
            params = fit_prompt(ids, generation, limits, context, param)
            jobs += [(ids, generation.choice_params(params, j)) for j in range(generation.n)]
        return jobs

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        prompts = read_prompts(body, vocab_size, limits.max_prompts)
        generation = read_generation(body, limits, chat=False, vocab_size=vocab_size)
        ids = await asyncio.to_thread(encode, prompts)  # off the event loop: a long prompt takes a while
        jobs = choices(ids, generation, "prompt")
        return await respond(jobs, CompletionAnswer(model_name, engine.tokenizer), generation, request,
                             sum(map(len, ids)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        messages = read_messages(body)
        generation = read_generation(body, limits, chat=True, vocab_size=vocab_size)
        generation.params = replace(generation.params, stop_token_ids=tuple(end_of_turn_ids(engine.tokenizer)))
        try:
            ids = await asyncio.to_thread(render, engine.tokenizer, messages)
        except TemplateError as error:  # a template may refuse a conversation (roles that do not alternate, ...)
            raise RequestError(400, f"the chat template refused these messages: {error}", "messages")
        jobs = choices([ids], generation, "messages")
        return await respond(jobs, ChatAnswer(model_name, engine.tokenizer), generation, request, len(ids))

    return app


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServerLimits | None = None, device: str = "auto", kernels: str | None = None,
          tokenizer: str | None = None, settings: EngineSettings | None = None,
          drain_timeout: float = 30.0) -> None:  # pragma: no cover - blocking
    """Serves until SIGTERM or Ctrl-C: uvicorn then stops taking connections and lets the requests in flight
    finish for up to `drain_timeout` seconds (cancelling those still running), and the engine stops."""
    import uvicorn

    from .loading import open_model

    api_key = resolve_api_key(api_key)  # before the model loads: a refused key should not wait for it
    model, tokenizer = open_model(model_path, device, tokenizer=tokenizer)
    name = os.path.basename(os.path.normpath(model_path))
    engine = Engine(model, tokenizer, settings, kernels=kernels)
    log.info("serving up to %d sequences at once, of up to %d tokens, on a KV cache of %d blocks of %d tokens",
             engine.slots, engine.max_len, engine.blocks.num_blocks, engine.settings.block_size)
    if engine.compiled:  # on GPUs: one compiled, captured decode step per batch size, before the first request
        started = time.perf_counter()
        engine.warm_up()
        log.info("decode steps for batches of %s ready in %.1f s", engine.buckets, time.perf_counter() - started)
    app = build_app(engine, name, api_key, limits)
    # uvicorn drains on SIGTERM / SIGINT, then raises the signal again for the handler it found: a handler of ours
    # takes it, so a drained server exits with status 0 rather than as killed by the signal.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: None)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=drain_timeout)
    log.info("drained and stopped")
