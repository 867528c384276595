"""`argonne serve MODEL`: an OpenAI-compatible HTTP server on FastAPI + uvicorn.

Routes: /v1/completions, /v1/chat/completions (`stream: true` sends server-sent events), /v1/models, /health.
Requests are queued and served one generation at a time by the single model (a lock), so concurrent requests never
share a cache or a sampler; the event loop stays free while a generation runs in a worker thread. Bad requests get a
4xx JSON error in OpenAI's shape ({"error": {"message", "type", "param", "code"}}) and the server keeps running.
With an API key (`--api-key` or ARGONNE_API_KEY) every route but /health needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from .chat import end_of_turn_ids, render
from .generate import Generator, SamplingParams

API_KEY_ENV = "ARGONNE_API_KEY"


@dataclass
class ServerLimits:
    max_prompt_tokens: int = 8192
    """Longest accepted prompt; the model's context is the other bound."""
    max_tokens: int = 1024
    """Largest accepted max_tokens, so one request cannot hold the server for long."""


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def build_app(generator: Generator, model_name: str, api_key: str | None = None,
              limits: ServerLimits | None = None):
    limits = limits or ServerLimits()
    app = FastAPI(title="Argonne", description="OpenAI-compatible API for an Argonne model")
    lock = threading.Lock()  # one generation at a time: the generator owns one cache and one sampler
    context = generator.config.max_position_embeddings
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(_, error: RequestError):
        return JSONResponse(_error_body(error.status, error.message, error.param, error.code), error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return JSONResponse(_error_body(400, f"invalid request: {problems}", code="invalid_request"), 400)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.url.path != "/health":
            if request.headers.get("authorization") != f"Bearer {api_key}":
                body = _error_body(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                   code="invalid_api_key")
                return JSONResponse(body, 401)
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(400, f"the request body is not valid JSON ({error})", code="invalid_json")
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object", code="invalid_json")
        if body.get("model") not in (None, model_name):
            raise RequestError(404, f"model {body.get('model')!r} does not exist; this server serves "
                               f"{model_name!r}", "model", "model_not_found")
        return body

    def sampling(body: dict, chat: bool) -> SamplingParams:
        def number(name, default, kind=float):
            value = body.get(name, default)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise RequestError(400, f"{name} must be a number, got {value!r}", name)
            return kind(value)

        max_tokens = number("max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                            16 if not chat else limits.max_tokens, int)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise RequestError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
        checks = [
            ("max_tokens", 1 <= max_tokens <= limits.max_tokens, f"max_tokens must be in 1..{limits.max_tokens}"),
            ("temperature", 0 <= number("temperature", 1.0) <= 2, "temperature must be in [0, 2]"),
            ("top_p", 0 < number("top_p", 1.0) <= 1, "top_p must be in (0, 1]"),
            ("n", number("n", 1, int) == 1, "only n = 1 is supported"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise RequestError(400, message, param)
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=number("temperature", 1.0), top_p=number("top_p", 1.0),
            top_k=number("top_k", 0, int), repetition_penalty=number("repetition_penalty", 1.0), stop=tuple(stop),
            seed=body.get("seed"),
        )

    def check_prompt(ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise RequestError(400, "the prompt is empty", "prompt")
        if len(ids) > limits.max_prompt_tokens:
            raise RequestError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                               f"{limits.max_prompt_tokens}", "prompt", "context_length_exceeded")
        if len(ids) + params.max_new_tokens > context:
            raise RequestError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_new_tokens}) "
                               f"exceeds the context window of {context} tokens", "prompt",
                               "context_length_exceeded")

    def run(ids: list[int], params: SamplingParams, write) -> tuple[str, int]:
        """Generate under the lock (in a worker thread); returns the text and the completion token count."""
        with lock:
            text = generator.stream_ids(ids, params, write)
        # Counted by re-encoding the returned text (a stop string's tokens are not counted).
        return text, len(generator.tokenizer(text, add_special_tokens=False).input_ids) if text else 0

    async def respond(ids, params, stream: bool, chunk, final):
        """Run a generation; either a whole JSON body or an SSE stream of chunks."""
        if not stream:
            text, completion_tokens = await asyncio.to_thread(run, ids, params, lambda piece: None)
            return JSONResponse(final(text, len(ids), completion_tokens))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def work():
            try:
                run(ids, params, lambda piece: loop.call_soon_threadsafe(queue.put_nowait, piece))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        async def events() -> AsyncIterator[str]:
            task = asyncio.create_task(asyncio.to_thread(work))
            first = True
            while (piece := await queue.get()) is not None:
                yield f"data: {json.dumps(chunk(piece, first, None))}\n\n"
                first = False
            await task
            yield f"data: {json.dumps(chunk('', first, 'stop'))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                             "owned_by": "argonne"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError(400, "prompt must be a string", "prompt")
        params = sampling(body, chat=False)
        ids = generator.tokenizer(prompt, add_special_tokens=False).input_ids
        check_prompt(ids, params)
        request_id, stamp = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(piece, first, finish):
            return {"id": request_id, "object": "text_completion", "created": stamp, "model": model_name,
                    "choices": [{"index": 0, "text": piece, "finish_reason": finish, "logprobs": None}]}

        def final(text, prompt_tokens, completion_tokens):
            finish = "length" if completion_tokens >= params.max_new_tokens else "stop"
            return {**chunk(text, True, finish), "usage": usage(prompt_tokens, completion_tokens)}

        return await respond(ids, params, bool(body.get("stream")), chunk, final)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        messages = body.get("messages")
        valid_roles = ("system", "user", "assistant")
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and m.get("role") in valid_roles and isinstance(m.get("content"), str)
                           for m in messages)):
            raise RequestError(400, "messages must be a non-empty list of {role: system|user|assistant, "
                               "content: string}", "messages")
        params = sampling(body, chat=True)
        params = SamplingParams(**{**params.__dict__,
                                   "stop_token_ids": tuple(end_of_turn_ids(generator.tokenizer))})
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        ids = render(generator.tokenizer, messages)
        check_prompt(ids, params)
        request_id, stamp = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(piece, first, finish):
            delta = ({"role": "assistant", "content": piece} if first else {"content": piece}) if piece or first \
                else {}
            return {"id": request_id, "object": "chat.completion.chunk", "created": stamp, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        def final(text, prompt_tokens, completion_tokens):
            return {"id": request_id, "object": "chat.completion", "created": stamp, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "length" if completion_tokens >= params.max_new_tokens
                                 else "stop"}],
                    "usage": usage(prompt_tokens, completion_tokens)}

        return await respond(ids, params, bool(body.get("stream")), chunk, final)

    return app


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServerLimits | None = None, device: str = "auto",
          kernels: str | None = None) -> None:  # pragma: no cover - blocking
    import uvicorn

    from .generate import load_model

    model, tokenizer = load_model(model_path, device)
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    name = os.path.basename(os.path.normpath(model_path))
    app = build_app(Generator(model, tokenizer, kernels=kernels), name, api_key, limits)
    uvicorn.run(app, host=host, port=port)
