"""`argonne serve MODEL`: an OpenAI-compatible HTTP server on FastAPI + uvicorn, in front of the serving engine.

Routes: /v1/completions, /v1/chat/completions (`stream: true` sends server-sent events), /v1/models, /health and
/metrics (Prometheus' text format). Every request is checked whole before anything is queued: its size
(`max_body_bytes`, from Content-Length or while a chunked body arrives), its JSON, and its fields against the route's
schema (server_schemas.py: each field's type and range declared on it). Tokenizing and rendering the chat template run
in worker threads, so a long prompt never stalls the event loop.
Generation is the engine's (inference/engine.py: continuous batching, its own thread); this module only turns HTTP
into engine requests and updates into OpenAI's objects. When the engine's queue is full a request gets 429 with `Retry-After`;
a client that closes its stream or hangs up has its sequences cancelled, freeing their rows and blocks at the next step.
Bad requests get a 4xx JSON error in OpenAI's shape ({"error": {"message", "type", "param", "code"}}, `param` naming
the parameter); a bug in the server answers 500 in the same shape.
With an API key (`--api-key` or ARGONNE_API_KEY) every route but /health needs `Authorization: Bearer <key>`.
The app's routes and handlers are module-level functions; what they share lives in app.state (engine, model_name,
limits, stats, metrics, handoff, created).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import reprlib
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2.exceptions import TemplateError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect

from .chat import end_of_turn_ids, render
from .inference.engine import Engine, EngineRequest, EngineSettings, EngineStopped, QueueFull, Timing
from .inference.sampling import Completion, SamplingParams
from .server_metrics import ServerMetrics
from .server_schemas import ChatAnswer, ChatRequest, CompletionAnswer, CompletionRequest, GenerationRequest, usage

API_KEY_ENV = "ARGONNE_API_KEY"
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
PROBLEMS_SHOWN = 3  # in one error message: a thousand bad messages need not be described a thousand times

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


def _show(value) -> str:
    """A value for an error message: its repr, shortened (a request may send megabytes; a list of them is not
    written whole)."""
    text = reprlib.repr(value) if isinstance(value, (list, dict)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def plan_choices(prompts: list[list[int]], request: GenerationRequest, params: SamplingParams, limits: ServerLimits,
                 context: int, param: str) -> list[tuple[list[int], SamplingParams]]:
    """One engine job per choice, in OpenAI's order (each prompt's n choices together; choice j > 0 samples with
    seed + j when a seed is given). max_new_tokens is what was asked, or by default what fits."""
    if len(prompts) * request.n > limits.max_prompts:
        raise RequestError(400, f"{len(prompts)} prompts x n = {request.n} asks for {len(prompts) * request.n} "
                           f"choices; this server makes at most {limits.max_prompts} per request", "n")
    max_tokens_param, max_tokens = request.asked_max_tokens()
    jobs = []
    for ids in prompts:
        if not ids:
            raise RequestError(400, "the prompt is empty", param)
        if len(ids) > limits.max_prompt_tokens:
            raise RequestError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                               f"{limits.max_prompt_tokens}", param, "context_length_exceeded")
        room = context - len(ids)
        if max_tokens is None and room < 1:
            raise RequestError(400, f"the prompt ({len(ids)} tokens) fills the context window of {context} tokens, "
                               "leaving no room for a completion", param, "context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise RequestError(400, f"the prompt ({len(ids)} tokens) plus {max_tokens_param} ({max_tokens}) exceeds "
                               f"the context window of {context} tokens", param, "context_length_exceeded")
        default = min(request.default_max_tokens or limits.max_tokens, limits.max_tokens, room)
        fitted = replace(params, max_new_tokens=max_tokens or default)
        jobs += [(ids, fitted if j == 0 or fitted.seed is None else replace(fitted, seed=(fitted.seed + j) % 2**64))
                 for j in range(request.n)]
    return jobs


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


# --- The app: routes and handlers at module level, the state in app.state -------------------------------------------

async def read_request(http: Request, schema: type[GenerationRequest]) -> GenerationRequest:
    """The body, checked whole: its size, its JSON, its fields against `schema`, and the model it names."""
    state = http.app.state
    body = parse_json(await read_body(http, state.limits.max_body_bytes))
    context = {"limits": state.limits, "vocab_size": state.engine.config.vocab_size}
    try:  # in a worker thread, as tokenizing: validating 10^4 messages takes a while
        request = await asyncio.to_thread(schema.model_validate, body, context=context)
    except ValidationError as error:  # the request's fault here, unlike a ValidationError anywhere else
        raise RequestValidationError(error.errors(include_url=False)) from None
    if request.model not in (None, state.model_name):
        raise RequestError(404, f"model {_show(request.model)} does not exist; this server serves "
                           f"{state.model_name!r}", "model", "model_not_found")
    return request


async def respond(http: Request, prompts: list[list[int]], params: SamplingParams, request: GenerationRequest,
                  answer: CompletionAnswer, param: str):
    """The prompts' choices queued in the engine (all or none), answered whole or streamed."""
    state, updates = http.app.state, asyncio.Queue()  # (choice index, Update), from the engine's thread
    state.handoff.loop = asyncio.get_running_loop()

    def sink(index: int):
        return lambda update: state.handoff.put(updates, (index, update))

    jobs = plan_choices(prompts, request, params, state.limits, state.engine.max_len, param)
    try:
        handles = state.engine.submit([EngineRequest(ids, choice_params, request.top_logprobs_wanted(), sink(i))
                                       for i, (ids, choice_params) in enumerate(jobs)])
    except QueueFull as full:
        state.metrics.rejected.inc()
        raise RequestError(429, f"{full}; the queue holds {state.engine.settings.max_queue} requests "
                           "(argonne serve --max-queue)", code="queue_full",
                           headers={"Retry-After": str(full.retry_after)})
    except EngineStopped:
        raise RequestError(503, "the server is shutting down", code="shutting_down")
    except ValueError as error:  # what the engine cannot take and the schema let through
        raise RequestError(400, str(error))
    prompt_tokens = sum(map(len, prompts))
    if request.stream:
        return StreamingResponse(events(handles, updates, answer, request, prompt_tokens),
                                 media_type="text/event-stream")
    completions = await wait_for_all(handles, updates, http)
    failed = [c for c in completions if c.finish_reason == "error"]
    if failed:
        return JSONResponse(failure_body(failed[0]), 500)
    return JSONResponse(answer.whole(completions, prompt_tokens))


def cancel_all(handles) -> None:
    for handle in handles:
        handle.cancel()


async def wait_for_all(handles, updates: asyncio.Queue, http: Request) -> list[Completion]:
    """Each choice's Completion. A client that hangs up meanwhile frees its slots at the next step."""
    completions: list[Completion | None] = [None] * len(handles)
    loop = asyncio.get_running_loop()
    check_at = loop.time() + DISCONNECT_POLL_S
    try:
        while None in completions:
            try:
                index, update = await asyncio.wait_for(updates.get(), max(0.0, check_at - loop.time()))
                completions[index] = update.completion
            except asyncio.TimeoutError:
                pass
            if loop.time() >= check_at:
                if await http.is_disconnected():
                    cancel_all(handles)
                check_at = loop.time() + DISCONNECT_POLL_S
    finally:
        cancel_all(handles)  # (nothing, once all have ended)
    return completions


async def events(handles, updates: asyncio.Queue, answer: CompletionAnswer, request: GenerationRequest,
                 prompt_tokens: int) -> AsyncIterator[str]:
    """Server-sent events: a chunk per update that adds something, then with include_usage OpenAI's last chunk (no
    choices, the whole request's usage), then [DONE]."""
    completions: list[Completion | None] = [None] * len(handles)
    with_logprobs = request.top_logprobs_wanted() is not None
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    started = set()
    try:
        while None in completions:
            index, update = await updates.get()
            if update.completion and update.completion.finish_reason == "error":
                yield sse(failure_body(update.completion))
                break
            if update.text or update.logprobs or update.completion or index not in started:
                choice = answer.choice(index, update.text, update.logprobs if with_logprobs else None,
                                       update.completion.finish_reason if update.completion else None,
                                       first_chunk=index not in started)
                yield sse(answer.chunk([choice], **({"usage": None} if include_usage else {})))
                started.add(index)
            completions[index] = update.completion
        else:
            if include_usage:
                yield sse(answer.chunk([], usage=usage(prompt_tokens, completions)))
    finally:
        # Also when the client went away (Starlette cancels this stream): its sequences end at the next step.
        cancel_all(handles)
    yield sse("[DONE]")


routes = APIRouter()


@routes.get("/health")
async def health(http: Request):
    if not http.app.state.engine.running:  # (its thread ended: shut down, or a bug it could not survive)
        return JSONResponse({"status": "engine stopped"}, 503)
    return {"status": "ok"}


@routes.get("/metrics")
async def prometheus_metrics(http: Request):
    return Response(http.app.state.metrics.exposition(), media_type=http.app.state.metrics.content_type)


@routes.get("/v1/models")
async def models(http: Request):
    state = http.app.state
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                         "owned_by": "argonne"}]}


def encode(tokenizer, prompts: list[str | list[int]]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False).input_ids if isinstance(p, str) else p for p in prompts]


@routes.post("/v1/completions")
async def completions(http: Request):
    engine, request = http.app.state.engine, await read_request(http, CompletionRequest)
    ids = await asyncio.to_thread(encode, engine.tokenizer, request.prompt)  # off the event loop: it takes a while
    return await respond(http, ids, request.sampling_params(engine.config.vocab_size), request,
                         CompletionAnswer(http.app.state.model_name, engine.tokenizer), "prompt")


@routes.post("/v1/chat/completions")
async def chat_completions(http: Request):
    engine, request = http.app.state.engine, await read_request(http, ChatRequest)
    try:
        ids = await asyncio.to_thread(render, engine.tokenizer, [m.model_dump() for m in request.messages])
    except TemplateError as error:  # a template may refuse a conversation (roles that do not alternate, ...)
        raise RequestError(400, f"the chat template refused these messages: {error}", "messages")
    params = replace(request.sampling_params(engine.config.vocab_size),
                     stop_token_ids=tuple(end_of_turn_ids(engine.tokenizer)))
    return await respond(http, [ids], params, request, ChatAnswer(http.app.state.model_name, engine.tokenizer),
                         "messages")


def describe(problem: dict) -> str:
    """One of pydantic's validation problems: where (dotted: messages.0.content), what is wrong, the value sent."""
    where = ".".join(map(str, problem["loc"]))
    what = str(problem["ctx"]["error"]) if problem["type"] == "value_error" else problem["msg"]
    return f"{where}: {what}" if problem["type"] == "missing" else f"{where}: {what} (got {_show(problem['input'])})"


async def answer_invalid_request(_, error: RequestValidationError) -> JSONResponse:
    """400 naming, as `param`, the parameter of the first problem (messages for messages.0.content), and describing
    each problem in the message."""
    problems = error.errors()
    message = "; ".join(map(describe, problems[:PROBLEMS_SHOWN]))
    if len(problems) > PROBLEMS_SHOWN:
        message += f"; and {len(problems) - PROBLEMS_SHOWN} more"
    return JSONResponse(_error_body(400, message, problems[0]["loc"][0] if problems[0]["loc"] else None), 400)


async def answer_request_error(_, error: RequestError) -> JSONResponse:
    return JSONResponse(_error_body(error.status, error.message, error.param, error.code), error.status,
                        headers=error.headers)


async def answer_http_error(http: Request, error: HTTPException) -> JSONResponse:
    message = {404: f"no route {http.method} {http.url.path}; this server has POST /v1/completions, "
                    "POST /v1/chat/completions, GET /v1/models, GET /metrics and GET /health",
               405: f"{http.url.path} does not take {http.method}"}.get(error.status_code, error.detail)
    return JSONResponse(_error_body(error.status_code, message), error.status_code, headers=error.headers)


async def answer_server_error(_, error: Exception) -> JSONResponse:
    # A bug, not a bad request (those are RequestErrors and validation errors): the traceback goes to the log
    # (Starlette re-raises it after this answer), the client gets OpenAI's shape.
    return JSONResponse(_error_body(500, f"internal server error ({type(error).__name__})"), 500)


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Starts the engine's thread if it is not running, and at shutdown stops what it started (cancelling what
    still runs)."""
    engine = app.state.engine
    started = not engine.running
    if started:
        engine.start()
    yield
    if started:  # uvicorn has let the requests in flight finish, or cancelled them after --drain-timeout
        await asyncio.to_thread(engine.shutdown, True)


def build_app(engine: Engine, model_name: str, api_key: str | None = None,
              limits: ServerLimits | None = None) -> FastAPI:
    """The app in front of `engine`: routes, error handlers, the API key's middleware and the shared state."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty; pass None to serve without authentication")
    app = FastAPI(title="Argonne", description="OpenAI-compatible API for an Argonne model", lifespan=lifespan,
                  middleware=[Middleware(RequireApiKey, api_key=api_key)] if api_key is not None else [],
                  exception_handlers={RequestValidationError: answer_invalid_request, HTTPException: answer_http_error,
                                      RequestError: answer_request_error, Exception: answer_server_error})
    app.include_router(routes)
    app.state.engine, app.state.model_name, app.state.limits = engine, model_name, limits or ServerLimits()
    app.state.stats, app.state.metrics, app.state.handoff = ServerStats(), ServerMetrics(engine), Handoff()
    app.state.created = int(time.time())
    engine.listeners += [app.state.stats.add, app.state.metrics.observe]
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
