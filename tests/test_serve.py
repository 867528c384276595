"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn on 127.0.0.1, with
the serving engine behind it; what it generates is checked against a second engine, run in the test's own thread,
on a copy of the same model."""

import contextlib
import copy
import http.client
import json
import math
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient
from pydantic import ValidationError

import argonne_cli as cli
from argonne import load_tokenizer
from argonne.chat import render
from argonne.inference.engine import Engine, EngineRequest, EngineSettings
from argonne.inference.sampling import SamplingParams
from argonne.serve import API_KEY_ENV, ServerLimits, build_app
from argonne.server_schemas import ChatRequest, CompletionRequest

from .conftest import SAMPLE_TOKENIZER, free_port, small_model

KEY = "test-key"


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def generator(model):
    """The reference: an engine of its own on a copy of the served model, stepped in the caller's thread."""
    return Engine(copy.deepcopy(model), load_tokenizer(SAMPLE_TOKENIZER))


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, load_tokenizer(SAMPLE_TOKENIZER), EngineSettings(max_batch=8, prefill_chunk=32))
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def app(engine):
    return build_app(engine, "tiny", api_key=KEY, limits=ServerLimits(max_prompt_tokens=120, max_tokens=32))


@contextlib.contextmanager
def serving(app):
    """The app on a real uvicorn at 127.0.0.1, in a thread: its base URL."""
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(app):
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy_text(generator, prompt, max_tokens, stop=()):
    return generator.generate([prompt], SamplingParams(max_new_tokens=max_tokens, temperature=0, top_k=0,
                                                       top_p=1.0, stop=stop))[0]


def test_health_and_models(server, client):
    with urllib.request.urlopen(f"{server}/health") as response:  # no key needed
        assert json.loads(response.read()) == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_equals_local_greedy_generation(client, generator):
    result = client.completions.create(model="tiny", prompt="The database", max_tokens=12, temperature=0)
    assert result.choices[0].text == greedy_text(generator, "The database", 12)
    assert result.usage.prompt_tokens == len(generator.tokenizer("The database").input_ids)


def test_completion_stop_strings(client, generator):
    full = greedy_text(generator, "The table", 16)
    stop = full.split()[2]
    result = client.completions.create(model="tiny", prompt="The table", max_tokens=16, temperature=0, stop=[stop])
    assert result.choices[0].text == full[: full.index(stop)]


def test_chat_completion_and_streaming_agree(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


@pytest.mark.slow
def test_concurrent_requests_do_not_corrupt_each_other(client, generator):
    prompts = [f"Request number {i} about tables" for i in range(6)]
    expected = [greedy_text(generator, p, 10) for p in prompts]

    def ask(index):
        if index % 2:  # half of them stream
            chunks = client.completions.create(model="tiny", prompt=prompts[index], max_tokens=10, temperature=0,
                                               stream=True)
            return "".join(c.choices[0].text for c in chunks)
        reply = client.completions.create(model="tiny", prompt=prompts[index], max_tokens=10, temperature=0)
        return reply.choices[0].text

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(ask, range(6))) == expected


def raw_post(server, path, body: bytes, key=KEY, parse=True):
    request = urllib.request.Request(f"{server}{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    read = json.loads if parse else bytes.decode
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, read(response.read())
    except urllib.error.HTTPError as error:
        return error.code, read(error.read())


@pytest.mark.parametrize(
    "body,status,param",
    [
        (b"{not json", 400, None),
        (json.dumps({"model": "gpt-4", "prompt": "hi"}).encode(), 404, "model"),
        (json.dumps({"prompt": "word " * 200}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "hi", "max_tokens": 1000}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": "hi", "temperature": -1}).encode(), 400, "temperature"),
        (json.dumps({"prompt": "hi", "top_p": 0}).encode(), 400, "top_p"),
        (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "hi", "stop": [1]}).encode(), 400, "stop"),
        (json.dumps({"prompt": "hi", "top_k": -5}).encode(), 400, "top_k"),
        (json.dumps({"prompt": "hi", "repetition_penalty": 0}).encode(), 400, "repetition_penalty"),
        (json.dumps({"prompt": "hi", "repetition_penalty": -1}).encode(), 400, "repetition_penalty"),
        (json.dumps({"prompt": "hi", "repetition_penalty": 1e-300}).encode(), 400, "repetition_penalty"),
        (json.dumps({"prompt": "hi", "seed": "abc"}).encode(), 400, "seed"),
        (json.dumps({"prompt": "hi", "seed": 1.5}).encode(), 400, "seed"),
        (json.dumps({"prompt": "hi", "seed": 1e23}).encode(), 400, "seed"),
        (json.dumps({"prompt": "hi", "seed": 2**64}).encode(), 400, "seed"),
        (b'{"prompt": "hi", "max_tokens": 1e400}', 400, "max_tokens"),  # JSON's 1e400 parses as inf
        (b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
        (json.dumps({"prompt": "hi", "stream": "yes"}).encode(), 400, "stream"),
        (json.dumps({"prompt": "hi", "stream_options": {"include_usage": True}}).encode(), 400, "stream_options"),
        (json.dumps({"prompt": "hi", "n": 0}).encode(), 400, "n"),
            (json.dumps({"prompt": "hi", "stop": ["x" * 1001]}).encode(), 400, "stop"),
            (json.dumps({"prompt": ["a", "b"], "n": 9}).encode(), 400, "n"),  # 18 choices: over max_prompts
            (json.dumps({"prompt": "hi", "logprobs": 21}).encode(), 400, "logprobs"),
        (json.dumps({"prompt": "hi", "echo": True}).encode(), 400, "echo"),
        (json.dumps({"prompt": "a\ud800b"}).encode(), 400, "prompt"),  # a lone surrogate the tokenizer refuses
        (json.dumps({"prompt": [1, -1]}).encode(), 400, "prompt"),
        (json.dumps({"prompt": [[5, 8192]]}).encode(), 400, "prompt"),  # the tiny model's vocabulary is 8,192
        (json.dumps({"prompt": [5, True]}).encode(), 400, "prompt"),
        (json.dumps({"prompt": ["a", 5]}).encode(), 400, "prompt"),
        (json.dumps({"prompt": []}).encode(), 400, "prompt"),
        (json.dumps({"prompt": ["hi"] * 17}).encode(), 400, "prompt"),
        (b"[" * 100_000, 400, None),  # nesting deeper than Python's JSON parser recurses
        (b'{"prompt": "hi", "seed": 1' + b"0" * 5000 + b"}", 400, None),  # more digits than Python converts
    ],
    ids=["malformed-json", "unknown-model", "prompt-too-long", "max-tokens", "temperature", "top-p",
         "prompt-type", "stop-type", "top-k-negative", "repetition-penalty-0", "repetition-penalty-negative",
         "repetition-penalty-tiny", "seed-string", "seed-float", "seed-1e23", "seed-2**64", "max-tokens-inf",
         "temperature-nan", "stream-string", "stream-options-without-stream", "n-0", "stop-too-long", "n-times-prompts",
             "logprobs-21", "echo", "lone-surrogate",
         "token-id-negative", "token-id-outside-vocabulary", "token-id-bool", "prompt-list-mixed",
         "prompt-list-empty", "too-many-prompts", "deep-nesting", "huge-integer"],
)
def test_bad_requests_get_4xx_json_errors(server, body, status, param):
    code, reply = raw_post(server, "/v1/completions", body)
    assert code == status, reply
    assert reply["error"]["message"] and reply["error"]["param"] == param
    assert raw_post(server, "/v1/completions", json.dumps({"prompt": "still up", "max_tokens": 2}).encode())[0] == 200


def test_bad_chat_messages_and_context_overflow(server, generator):
    code, reply = raw_post(server, "/v1/chat/completions", json.dumps({"messages": [{"role": "wizard"}]}).encode())
    assert code == 400 and reply["error"]["param"] == "messages"
    long_prompt = " ".join(["tables"] * 110)
    assert 96 < len(generator.tokenizer(long_prompt).input_ids) <= 120  # within the prompt limit, not the context
    code, reply = raw_post(server, "/v1/completions",
                           json.dumps({"prompt": long_prompt, "max_tokens": 32}).encode())
    assert code == 400 and reply["error"]["code"] == "context_length_exceeded"


def test_api_key_is_required_except_for_health(server):
    code, reply = raw_post(server, "/v1/completions", json.dumps({"prompt": "hi"}).encode(), key="wrong")
    assert code == 401 and reply["error"]["code"] == "invalid_api_key"
    unauthenticated = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        unauthenticated.models.list()


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1e400}, "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"include_usage": 1}},
         "stream_options"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
    ],
    ids=["max-completion-tokens", "content-list", "lone-surrogate", "messages-string", "top-p-inf",
         "include-usage-type", "top-logprobs-without-logprobs", "top-logprobs-21", "logprobs-integer"],
)
def test_bad_chat_requests_get_4xx_json_errors(server, body, param):
    code, reply = raw_post(server, "/v1/chat/completions", json.dumps(body).encode())
    assert code == 400, reply
    assert reply["error"]["param"] == param


def test_a_validation_error_names_each_problem_and_where_it_lies(server):
    messages = [{"role": "user", "content": "hi"}, {"role": "user", "content": 5}]
    code, reply = raw_post(server, "/v1/chat/completions", json.dumps({"messages": messages}).encode())
    assert code == 400 and reply["error"]["param"] == "messages"  # the parameter sent, as OpenAI names it
    assert reply["error"]["message"].startswith("messages.1.content: ") and "got 5" in reply["error"]["message"]
    body = {"prompt": "hi", "temperature": -1, "top_p": 2, "stop": ["a", ""]}
    code, reply = raw_post(server, "/v1/completions", json.dumps(body).encode())
    assert code == 400 and reply["error"]["param"] == "temperature"  # the first; the message lists them all
    assert [problem.split(":")[0] for problem in reply["error"]["message"].split("; ")] == [
        "temperature", "top_p", "stop.1"]
    code, reply = raw_post(server, "/v1/chat/completions", json.dumps({"messages": [5] * 100_000}).encode())
    assert code == 400 and reply["error"]["message"].count("messages.") == 1  # the first bad message ends the check


def test_request_schemas_read_nulls_as_absent_and_refuse_lookalikes():
    context = {"limits": ServerLimits(max_tokens=32), "vocab_size": 100}
    request = CompletionRequest.model_validate(
        {"prompt": [1, 2], "temperature": None, "max_tokens": 16.0, "logprobs": False, "echo": False, "user": "me"},
        context=context)
    assert (request.prompt, request.temperature, request.max_tokens, request.top_logprobs_wanted()) == (
        [[1, 2]], 1.0, 16, None)
    for field, lookalike in [("max_tokens", "16"), ("max_tokens", True), ("max_tokens", 16.5), ("max_tokens", 33),
                             ("stream", 1), ("temperature", "0.5"), ("prompt", [1, 100])]:
        with pytest.raises(ValidationError) as refused:
            CompletionRequest.model_validate({"prompt": "hi", field: lookalike}, context=context)
        assert [problem["loc"][0] for problem in refused.value.errors()] == [field]
    chat = ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi", "name": "x"}],
                                       "max_tokens": 5, "max_completion_tokens": 7}, context=context)
    assert chat.asked_max_tokens() == ("max_completion_tokens", 7)  # OpenAI's current name wins


def raw_events(server, path, body: dict) -> list[dict]:
    status, text = raw_post(server, path, json.dumps(body).encode(), parse=False)
    assert status == 200, text
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def test_answers_have_openai_fields_null_or_absent_as_its_clients_expect(server):
    chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "temperature": 0}
    code, whole = raw_post(server, "/v1/chat/completions", json.dumps(chat).encode())
    assert list(whole) == ["id", "object", "created", "model", "choices", "usage"]
    assert whole["object"] == "chat.completion"
    assert list(whole["choices"][0]) == ["index", "message", "logprobs", "finish_reason"]
    assert whole["choices"][0]["logprobs"] is None and whole["choices"][0]["message"]["role"] == "assistant"
    chunks = raw_events(server, "/v1/chat/completions", {**chat, "stream": True,
                                                         "stream_options": {"include_usage": True}})
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert all(chunk["usage"] is None for chunk in chunks[:-1]) and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == whole["usage"]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks[:-1]]
    assert list(deltas[0]) == ["role", "content"] and all("role" not in delta for delta in deltas[1:])
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks[:-1]][-1] == "length"
    text = {"prompt": "The database", "max_tokens": 3, "temperature": 0, "stream": True}
    chunks = raw_events(server, "/v1/completions", text)
    assert all("usage" not in chunk and chunk["object"] == "text_completion" for chunk in chunks)  # absent, not null
    assert [list(chunk["choices"][0]) for chunk in chunks] == [["index", "text", "logprobs", "finish_reason"]] * 3


def test_a_tiny_temperature_decodes_greedily(client, generator):
    # Logits divided by 1e-300 overflow to inf and sampling would fail; such temperatures decode greedily.
    result = client.completions.create(model="tiny", prompt="The database", max_tokens=6, temperature=1e-300)
    assert result.choices[0].text == greedy_text(generator, "The database", 6)


def test_an_unexpected_server_error_answers_500_in_openai_shape(engine, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine, "_decode", broken)
    with TestClient(build_app(engine, "tiny"), raise_server_exceptions=False) as test_client:
        reply = test_client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert reply.status_code == 500
        assert reply.json()["error"]["type"] == "server_error"
        streamed = test_client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True})
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert "error" in json.loads(events[-2]) and events[-1] == "[DONE]"  # the stream says so and ends
        assert test_client.get("/health").json() == {"status": "ok"}
    assert "engine step failed" in caplog.text  # the traceback is in the log
    assert engine.active == 0  # the failed sequences gave their slots back


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_non_finite_logits_answer_500_naming_them_and_the_server_goes_on(engine, temperature):
    def nan_logits(module, args, output):
        output.logits[:] = float("nan")

    requests = [("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": [{"role": "user",
                                                                                             "content": "hi"}]})]
    with TestClient(build_app(engine, "tiny"), raise_server_exceptions=False) as test_client:
        hook = engine.model.register_forward_hook(nan_logits)
        try:
            for path, body in requests:
                body = {**body, "max_tokens": 3, "temperature": temperature}
                reply = test_client.post(path, json=body)
                error = reply.json()["error"]
                assert reply.status_code == 500 and error["type"] == "server_error"
                assert "the model produced non-finite logits (NaN or Inf)" in error["message"]
                streamed = test_client.post(path, json={**body, "stream": True})
                events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]" and '"finish_reason": "stop"' not in streamed.text
                assert "non-finite logits" in json.loads(events[-2])["error"]["message"]
        finally:
            hook.remove()
        assert test_client.post(*requests[0][:1], json={"prompt": "hi", "max_tokens": 3}).status_code == 200
    assert engine.active == 0


def raw_connection(server) -> http.client.HTTPConnection:
    address = urlparse(server)
    return http.client.HTTPConnection(address.hostname, address.port, timeout=5)


def test_a_body_over_the_limit_gets_413_before_it_is_read(server):
    connection = raw_connection(server)
    connection.putrequest("POST", "/v1/completions")
    for name, value in [("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY}"),
                        ("Content-Length", str(30_000_000))]:
        connection.putheader(name, value)
    connection.endheaders(b'{"prompt": "')  # and never the other 30 MB: the answer must not wait for them
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()


def test_a_chunked_body_over_the_limit_gets_413(server):
    connection = raw_connection(server)
    connection.putrequest("POST", "/v1/completions")
    for name, value in [("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY}"),
                        ("Transfer-Encoding", "chunked")]:
        connection.putheader(name, value)
    connection.endheaders()
    piece = b"x" * 65536
    body = [b'{"prompt": "'] + [piece] * (ServerLimits().max_body_bytes // len(piece) + 1) + [b'"}']
    with contextlib.suppress(ConnectionError):  # the server may close the connection before reading it all
        for chunk in body:
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        connection.send(b"0\r\n\r\n")
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()


class GatedTokenizer:
    """The generator's tokenizer, except that encoding waits (up to 10 s) until `release` is set: a slow, long
    prompt that the test can hold while it checks the server still answers."""

    def __init__(self, tokenizer):
        self.tokenizer, self.entered, self.release = tokenizer, threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(timeout=10)
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "tables", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "tables"}], "max_tokens": 2}),
])
def test_health_answers_while_a_prompt_is_tokenized(server, engine, monkeypatch, route, body):
    gated = GatedTokenizer(engine.tokenizer)
    monkeypatch.setattr(engine, "tokenizer", gated)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(raw_post, server, route, json.dumps(body).encode())
        try:
            assert gated.entered.wait(timeout=10)
            # Tokenizing on the event loop would hold this until the tokenizer gave up waiting: a timeout here.
            with urllib.request.urlopen(f"{server}/health", timeout=3) as response:
                assert json.loads(response.read()) == {"status": "ok"}
        finally:
            gated.release.set()
        assert pending.result()[0] == 200


@pytest.mark.parametrize("argv,env", [
    (["--api-key", ""], None), (["--api-key", "  "], None), ([], ""), ([], " \t"),
], ids=["flag-empty", "flag-blank", "env-empty", "env-blank"])
def test_an_empty_api_key_is_refused(monkeypatch, capsys, argv, env):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    if env is not None:
        monkeypatch.setenv(API_KEY_ENV, env)
    assert cli.main(["serve", "no/such/model", *argv]) == 2
    error = capsys.readouterr().err
    assert "API key" in error and "config.json" not in error  # refused before the model is loaded


def test_build_app_refuses_an_empty_api_key(generator):
    with pytest.raises(ValueError, match="API key"):
        build_app(generator, "tiny", api_key=" ")


@pytest.mark.parametrize("key", ["sekret\n", " sekret", "sek ret", "s\u00e9kret"])
def test_a_key_no_client_could_send_is_refused(monkeypatch, capsys, key):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert cli.main(["serve", "no/such/model", "--api-key", key]) == 2
    assert "no client could send it" in capsys.readouterr().err


def test_the_bearer_scheme_is_case_insensitive(server):
    for scheme in ("Bearer", "bearer", "BEARER"):
        request = urllib.request.Request(f"{server}/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
        with urllib.request.urlopen(request) as response:
            assert response.status == 200
    assert raw_post(server, "/v1/completions", b"{}", key=KEY + "x")[0] == 401


def long_chat(tokens: int) -> list[dict]:
    return [{"role": "user", "content": " ".join(["tables"] * tokens)}]


def test_chat_without_max_tokens_gets_what_fits(server, generator):
    messages = long_chat(100)
    prompt_tokens = len(render(generator.tokenizer, messages))
    assert 128 - 32 < prompt_tokens < 128  # the default limit of 32 would not fit the context of 128
    code, reply = raw_post(server, "/v1/chat/completions",
                           json.dumps({"messages": messages, "temperature": 0}).encode())
    assert code == 200, reply
    assert reply["usage"]["prompt_tokens"] == prompt_tokens
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 128 - prompt_tokens
    code, reply = raw_post(server, "/v1/chat/completions",
                           json.dumps({"messages": messages, "max_tokens": 32}).encode())
    assert code == 400 and reply["error"]["code"] == "context_length_exceeded"  # asked for: refused


def test_completion_without_max_tokens_gets_16_or_what_fits(server, generator):
    short = raw_post(server, "/v1/completions", json.dumps({"prompt": "The database", "temperature": 0}).encode())
    assert short[0] == 200 and short[1]["usage"]["completion_tokens"] == 16  # OpenAI's default
    prompt = " ".join(["tables"] * 116)
    prompt_tokens = len(generator.tokenizer(prompt).input_ids)
    assert 128 - 16 < prompt_tokens <= 120
    code, reply = raw_post(server, "/v1/completions", json.dumps({"prompt": prompt, "temperature": 0}).encode())
    assert code == 200, reply
    assert reply["usage"]["completion_tokens"] == 128 - prompt_tokens


def test_a_prompt_that_leaves_no_room_is_refused(engine):
    app = build_app(engine, "tiny", limits=ServerLimits(max_prompt_tokens=1000))
    with TestClient(app) as test_client:
        reply = test_client.post("/v1/completions", json={"prompt": [7] * 128})
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"
        assert test_client.post("/v1/completions", json={"prompt": [7] * 127}).status_code == 200


def greedy_ids(generator, prompt_ids, max_tokens) -> list[int]:
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, top_k=0, top_p=1.0)
    return generator.complete([prompt_ids], params)[0].token_ids


def test_complete_counts_each_rows_tokens_and_why_it_ended(generator, monkeypatch):
    prompts = [generator.tokenizer(p, add_special_tokens=False).input_ids for p in ("The database", "A table of")]
    alone = [greedy_ids(generator, p, 10) for p in prompts]
    eos = alone[0][3]
    monkeypatch.setattr(generator, "eos_ids", [eos])  # row 0 "ends" there; row 1 where it makes it, if it does

    def expected(ids):
        return (ids.index(eos) + 1, "stop") if eos in ids else (10, "length")

    params = SamplingParams(max_new_tokens=10, temperature=0, top_k=0, top_p=1.0)
    rows = generator.complete(prompts, params)  # one batch: row 0's later tokens are not counted
    assert [(row.token_count, row.finish_reason) for row in rows] == [expected(ids) for ids in alone]
    assert [row.text for row in rows] == generator.generate(["The database", "A table of"], params)
    # Cancelled after their first step (a client that went away): they end "cancelled", counting the tokens made.
    updates = [0, 0]

    def counter(row):
        def sink(update):
            updates[row] += update.completion is None  # one update per token but the last, which ends it
        return sink

    handles = generator.submit([EngineRequest(p, params, sink=counter(row)) for row, p in enumerate(prompts)])
    generator.step()
    assert all(1 <= made < 10 for made in updates)
    for handle in handles:
        handle.cancel()
    generator.step()
    cancelled = [handle.completion for handle in handles]
    assert [(row.token_count, row.finish_reason) for row in cancelled] == [(made, "cancelled") for made in updates]
    assert not generator.scheduler.running and len(generator.scheduler.free_rows) == generator.slots


@pytest.mark.parametrize("stream", [False, True])
def test_usage_counts_the_generated_tokens_and_length_is_reported(client, generator, stream):
    prompt_ids = generator.tokenizer("The database", add_special_tokens=False).input_ids
    for max_tokens in (8, 20):
        assert len(greedy_ids(generator, prompt_ids, max_tokens)) == max_tokens  # no EOS: the length ends it
        if stream:
            chunks = list(client.completions.create(model="tiny", prompt="The database", max_tokens=max_tokens,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}))
            assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
            finish, usage = chunks[-2].choices[0].finish_reason, chunks[-1].usage
        else:
            result = client.completions.create(model="tiny", prompt="The database", max_tokens=max_tokens,
                                                temperature=0)
            finish, usage = result.choices[0].finish_reason, result.usage
        assert finish == "length"
        assert usage.completion_tokens == max_tokens
        assert usage.total_tokens == usage.prompt_tokens + max_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_eos_ends_with_stop_and_counts_as_a_generated_token(client, generator, engine, monkeypatch, stream):
    prompt_ids = generator.tokenizer("The database", add_special_tokens=False).input_ids
    ids = greedy_ids(generator, prompt_ids, 12)
    eos = ids[4]
    monkeypatch.setattr(engine, "eos_ids", [eos])  # the model "ends" at the first occurrence of this token
    made = ids.index(eos) + 1  # the tokens before it and the EOS itself
    chunks = list(client.completions.create(model="tiny", prompt="The database", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})) if stream else None
    result = None if stream else client.completions.create(model="tiny", prompt="The database", max_tokens=12,
                                                           temperature=0)
    finish = chunks[-2].choices[0].finish_reason if stream else result.choices[0].finish_reason
    usage = chunks[-1].usage if stream else result.usage
    assert finish == "stop" and usage.completion_tokens == made


def test_a_stop_string_ends_with_stop(client, generator):
    full = greedy_text(generator, "The table", 16)
    stop = full.split()[2]
    result = client.completions.create(model="tiny", prompt="The table", max_tokens=16, temperature=0, stop=[stop])
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens < 16


def test_prompts_as_lists(client, generator):
    prompts = ["The database", "A table of"]
    result = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in result.choices] == [0, 1]
    assert [c.text for c in result.choices] == [greedy_text(generator, p, 6) for p in prompts]
    assert result.usage.completion_tokens == 12
    ids = [generator.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    assert client.completions.create(model="tiny", prompt=ids[0], max_tokens=6,
                                     temperature=0).choices[0].text == result.choices[0].text
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in result.choices]
    streamed = list(client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0,
                                              stream=True))
    for index, choice in enumerate(result.choices):
        pieces = [c.choices[0] for c in streamed if c.choices[0].index == index]
        assert "".join(p.text for p in pieces) == choice.text and pieces[-1].finish_reason == "length"


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/v1/nothing-here", 404), ("POST", "/v1/nothing-here", 404), ("GET", "/v1/completions", 405),
    ("DELETE", "/v1/models", 405),
])
def test_unknown_routes_and_methods_answer_in_openai_shape(server, method, path, status):
    request = urllib.request.Request(f"{server}{path}", method=method, headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request)
    assert error.value.code == status
    assert json.loads(error.value.read())["error"]["message"]


def pace(engine, monkeypatch, seconds: float = 0.1):
    """Each decode step takes `seconds` longer, as on a big model: 32 tokens take 3.2 s."""
    decode = engine._decode

    def slow():
        time.sleep(seconds)
        decode()

    monkeypatch.setattr(engine, "_decode", slow)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_closing_a_stream_cancels_its_generation(server, app, engine, monkeypatch):
    pace(engine, monkeypatch)
    before = dict(app.state.stats.__dict__)
    connection = raw_connection(server)
    body = json.dumps({"prompt": "The database", "max_tokens": 32, "temperature": 0, "stream": True})
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json",
                                                          "Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    events = 0
    while events < 2:
        events += response.fp.readline().startswith(b"data: ")
    response.close()
    connection.close()
    stats = app.state.stats
    wait_until(lambda: stats.cancelled == before["cancelled"] + 1)
    assert engine.active == 0  # its slot is free
    assert stats.completion_tokens - before["completion_tokens"] < 32


def test_hanging_up_on_a_request_cancels_its_generation(server, app, engine, monkeypatch):
    """Not streamed: the server notices the closed connection while it generates and stops at the next token."""
    pace(engine, monkeypatch)
    before = dict(app.state.stats.__dict__)
    connection = raw_connection(server)
    body = json.dumps({"prompt": "The database", "max_tokens": 32, "temperature": 0})
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json",
                                                          "Authorization": f"Bearer {KEY}"})
    time.sleep(0.5)  # generating, a token every 0.1 s
    connection.close()
    stats = app.state.stats
    wait_until(lambda: stats.cancelled == before["cancelled"] + 1)
    assert engine.active == 0
    assert stats.completion_tokens - before["completion_tokens"] < 32


FUZZ_ROUTES = [("POST", "/v1/completions")] * 6 + [("POST", "/v1/chat/completions")] * 6 + [
    ("GET", "/v1/models"), ("GET", "/health"), ("POST", "/v1/models"), ("GET", "/v1/completions"),
    ("POST", "/v1/unknown"), ("DELETE", "/health"),
]
BASE = {"/v1/completions": {"model": "tiny", "prompt": "The table", "max_tokens": 1},
        "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}}
HUGE = "__1e400__"  # written into the JSON text as 1e400, which Python's parser reads as inf
ODD_NUMBERS = [HUGE, math.inf, -math.inf, math.nan, 1e-300, 5e-324, 1e23, 2**64, -2**63 - 1, 10**30, -1, 0, -0.0,
               0.5, 1.5, 3, 7.0, True, False]
ODD_STRINGS = ["", " ", "abc", "tiny", "\ud800", "\x00", "é" * 50, "1e400", "NaN", "<|im_end|>"]
GOOD = {
    "model": ["tiny"], "prompt": ["The table", ["a", "b"], [5, 6, 7], [[5], [6, 7]], "x" * 300],
    "messages": [[{"role": "user", "content": "hi"}], [{"role": "system", "content": "s"},
                                                       {"role": "user", "content": "q"}]],
    "max_tokens": [1, 2, 3, 4], "max_completion_tokens": [1, 2, None], "temperature": [0, 0.7, 2, 1e-9],
    "top_p": [0.5, 1, 1e-9], "top_k": [0, 1, 5, -1], "repetition_penalty": [1, 1.3, 0.5], "stop": ["a", ["x", "y"], []],
    "seed": [0, 1, 2**63], "n": [1, None], "stream": [True, False, None],
    "stream_options": [{"include_usage": True}, None], "user": ["me"], "logprobs": [None, False],
}
FIELDS = [*GOOD, "echo", "best_of", "suffix", "unknown_field"]


def fuzz_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(ODD_NUMBERS)
    if kind == 1:
        return rng.choice(ODD_STRINGS)
    if kind == 2:
        return rng.randint(-10**6, 10**6)
    if kind == 3:
        return rng.uniform(-10, 10)
    if kind == 4:
        return None
    if kind == 5:
        return [fuzz_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 6:
        return {rng.choice(FIELDS + ["role", "content", "include_usage"]): fuzz_value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return [{"role": rng.choice(["user", "system", "assistant", "tool", 5]),
             "content": rng.choice(ODD_STRINGS) if rng.random() < 0.5 else fuzz_value(rng, depth + 1)}]


def encode_fuzz(body) -> bytes:
    return json.dumps(body).replace(json.dumps(HUGE), "1e400").encode()


def fuzz_requests(rng: random.Random, count: int) -> list[tuple[str, str, bytes]]:
    """Every odd value in every field of a valid request (on the two generation routes in turn), then `count` random
    requests: any route, mostly a valid request with one to three fields changed, sometimes not JSON at all."""
    odd_values = ODD_NUMBERS + ODD_STRINGS + [None, [], {}, [1, "a"], {"include_usage": "yes"}]
    routes = {"prompt": ["/v1/completions"], "messages": ["/v1/chat/completions"]}
    requests = []
    for field in [f for f in FIELDS if f not in ("user", "unknown_field")]:  # ignored: the random part sends them
        for index, value in enumerate(odd_values):
            path = routes.get(field, list(BASE))[index % len(routes.get(field, BASE))]
            requests.append(("POST", path, encode_fuzz({**BASE[path], field: value})))
    for _ in range(count):
        method, path = rng.choice(FUZZ_ROUTES)
        if rng.random() < 0.08:
            body = rng.choice([b"", b"{", b"null", b"[]", b'"text"', b"\xff\xfe", b"[" * 5000, b"{}" * 3])
        else:
            fields = dict(BASE.get(path, {})) if rng.random() < 0.8 else {}
            for field in rng.sample(FIELDS, rng.randrange(1, 4)):
                good = GOOD.get(field)
                fields[field] = rng.choice(good) if good and rng.random() < 0.4 else fuzz_value(rng)
            body = encode_fuzz(fields)
        requests.append((method, path, body))
    return requests


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx(engine):
    rng = random.Random(1234)
    app = build_app(engine, "tiny", api_key=KEY, limits=ServerLimits(max_prompt_tokens=64, max_tokens=4))
    statuses = {}
    with TestClient(app, raise_server_exceptions=False) as test_client:
        for method, path, body in fuzz_requests(rng, 150):
            key = KEY if rng.random() < 0.97 else "wrong"
            reply = test_client.request(method, path, content=body, headers={"Authorization": f"Bearer {key}",
                                                                             "Content-Type": "application/json"})
            assert reply.status_code < 500, (method, path, body[:200], reply.text)
            if reply.status_code >= 400:
                assert reply.json()["error"]["message"]
            elif reply.headers["content-type"].startswith("text/event-stream"):
                assert reply.text.rstrip().endswith("data: [DONE]") and '"error"' not in reply.text
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
        assert test_client.get("/health").json() == {"status": "ok"}
    assert statuses.get(200, 0) > 100 and statuses.get(400, 0) > 300, statuses  # both answers and refusals ran


def test_limits_below_1_are_refused_at_start(capsys):
    assert cli.main(["serve", "no/such/model", "--max-body-bytes", "0"]) == 2
    assert "max_body_bytes must be an integer >= 1" in capsys.readouterr().err


# --- many users at once: the engine behind the server ----------------------------------------------------------


@pytest.mark.slow
def test_32_concurrent_streams_each_get_what_they_get_alone(client, generator, engine):
    prompts = [f"Request {i}: " + " ".join(["tables"] * (i % 9)) for i in range(32)]
    lengths = [4 + i % 13 for i in range(32)]  # they finish at different times

    def ask(index):
        chunks = client.completions.create(model="tiny", prompt=prompts[index], max_tokens=lengths[index],
                                           temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(ask, range(32)))
    assert texts == [greedy_text(generator, p, n) for p, n in zip(prompts, lengths)]
    wait_until(lambda: engine.active == 0 and engine.queue_length == 0)


def test_cancelling_a_stream_with_the_openai_client_frees_its_slot(client, app, engine, monkeypatch):
    pace(engine, monkeypatch, 0.05)
    before = app.state.stats.cancelled
    stream = client.completions.create(model="tiny", prompt="The database", max_tokens=32, temperature=0,
                                       stream=True)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    wait_until(lambda: app.state.stats.cancelled == before + 1)
    assert engine.active == 0
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].finish_reason == "length"


def test_a_full_queue_answers_429_with_retry_after_and_the_server_recovers(model, monkeypatch):
    engine = Engine(copy.deepcopy(model), load_tokenizer(SAMPLE_TOKENIZER), EngineSettings(max_batch=1, max_queue=1))
    pace(engine, monkeypatch, 0.05)
    with serving(build_app(engine, "tiny")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)

        def ask(_):
            return client.completions.create(model="tiny", prompt="The table", max_tokens=20, temperature=0)

        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(ask, 0)
            wait_until(lambda: engine.active == 1)
            queued = pool.submit(ask, 1)
            wait_until(lambda: engine.queue_length == 1)
            with pytest.raises(openai.RateLimitError) as refused:
                ask(2)
            assert running.result().choices[0].text == queued.result().choices[0].text
        response = refused.value.response
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "queue_full"
        assert "--max-queue" in response.json()["error"]["message"]
        assert ask(3).choices[0].finish_reason == "length"  # healthy afterwards
        metrics = urllib.request.urlopen(f"{url}/metrics").read().decode()
        assert "argonne_rejected_requests_total 1.0" in metrics


def test_n_choices_and_their_seeds(client):
    greedy = client.completions.create(model="tiny", prompt="The database", max_tokens=6, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.text for c in greedy.choices}) == 1 and greedy.usage.completion_tokens == 18
    sampled = client.completions.create(model="tiny", prompt=["The database", "A table"], max_tokens=8,
                                        temperature=1.0, seed=7, n=2)
    alone = client.completions.create(model="tiny", prompt="A table", max_tokens=8, temperature=1.0, seed=7)
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]  # each prompt's n choices together
    assert sampled.choices[2].text == alone.choices[0].text  # choice 0 keeps the seed; choice j takes seed + j
    again = client.completions.create(model="tiny", prompt="A table", max_tokens=8, temperature=1.0, seed=8)
    assert sampled.choices[3].text == again.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content


def test_completion_logprobs(client, generator, engine):
    result = client.completions.create(model="tiny", prompt="The database", max_tokens=8, temperature=0,
                                       logprobs=2)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    assert "".join(logprobs.tokens) == result.choices[0].text
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(8)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 2 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the most likely
    # The engine's own figures (test_engine checks them against the model's log-softmax), and the stream's.
    ids = engine.tokenizer("The database", add_special_tokens=False).input_ids
    mine = engine.complete([ids], SamplingParams(max_new_tokens=8, **{"temperature": 0}), top_logprobs=2)[0]
    assert logprobs.token_logprobs == pytest.approx([entry.logprob for entry in mine.logprobs])
    chunks = list(client.completions.create(model="tiny", prompt="The database", max_tokens=8, temperature=0,
                                            logprobs=2, stream=True))
    streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(logprobs.token_logprobs)
    plain = client.completions.create(model="tiny", prompt="The database", max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_and_top_logprobs(client):
    messages = [{"role": "user", "content": "Hello"}]
    result = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = result.choices[0].logprobs.content
    assert 1 <= len(content) <= 6 and all(len(entry.top_logprobs) == 3 for entry in content)
    assert all(entry.top_logprobs[0].logprob == pytest.approx(entry.logprob) for entry in content)
    assert all(bytes(entry.bytes).decode("utf-8", "replace") == entry.token for entry in content)
    without_top = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, logprobs=True)
    assert all(entry.top_logprobs == [] for entry in without_top.choices[0].logprobs.content)


def test_metrics_in_prometheus_format(server, client, engine):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model="tiny", prompt="The database", max_tokens=4, temperature=0)
    request = urllib.request.Request(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request) as response:
        assert response.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    value = {s.name: s.value for f in families.values() for s in f.samples}
    assert value["argonne_kv_cache_slots"] == 8 and value["argonne_queue_length"] == 0
    assert value["argonne_running_requests"] == 0
    assert value["argonne_time_to_first_token_seconds_count"] >= 1
    assert value["argonne_time_per_output_token_seconds_count"] >= 1
    assert value["argonne_generation_tokens_total"] >= 4 and value["argonne_prompt_tokens_total"] >= 2
    # The paged KV cache: 8 rows of 128 tokens in blocks of 16, every block free between requests.
    assert value["argonne_kv_cache_blocks"] == engine.blocks.num_blocks == 8 * 128 // 16
    assert value["argonne_kv_cache_blocks_free"] == engine.blocks.num_blocks
    assert value["argonne_prefix_cache_hit_tokens_total"] >= 0
    assert "argonne_generation_tokens_per_second" in value
    assert {s.labels["finish_reason"] for s in families["argonne_requests"].samples
            if s.name == "argonne_requests_total"} >= {"length"}
    with pytest.raises(urllib.error.HTTPError) as error:  # behind the key, as every route but /health
        urllib.request.urlopen(f"{server}/metrics")
    assert error.value.code == 401


@pytest.mark.parametrize("flag,value,message", [("--max-batch", "0", "max_batch must be an integer >= 1"),
                                                ("--prefill-chunk", "-1", "prefill_chunk must be"),
                                                ("--kv-cache-memory", "nan", "kv_cache_memory must be"),
                                                ("--drain-timeout", "-1", "--drain-timeout must be")])
def test_engine_flags_are_checked_at_start(capsys, flag, value, message):
    assert cli.main(["serve", "no/such/model", flag, value]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_lets_the_request_in_flight_finish_and_exits_cleanly(model_dir):
    import signal
    import subprocess
    import sys

    from .conftest import env

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "argonne", "serve", str(model_dir), "--port", str(port),
                                "--max-batch", "2", "--drain-timeout", "60"], env=env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.time() < deadline, "the server did not start"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.completions.create(model=model_dir.name, prompt="The database", max_tokens=200,
                                           temperature=0, stream=True)
        chunks = [next(iter(stream))]
        process.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")  # finished, not cut
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_stopped_engine_fails_health_and_refuses_requests(model):
    engine = Engine(copy.deepcopy(model), load_tokenizer(SAMPLE_TOKENIZER), EngineSettings(max_batch=2))
    with TestClient(build_app(engine, "tiny")) as test_client:  # the app's lifespan starts the engine
        assert test_client.get("/health").json() == {"status": "ok"}
        engine.shutdown()
        assert test_client.get("/health").status_code == 503
        reply = test_client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "shutting_down"
