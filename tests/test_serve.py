"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn on 127.0.0.1."""

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import uvicorn

from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer
from argonne.generate import Generator, SamplingParams
from argonne.serve import ServerLimits, build_app

from .conftest import SAMPLE_TOKENIZER
from .test_distributed import free_port

KEY = "test-key"


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    config = ArgonneConfig.from_preset("tiny", num_hidden_layers=2, max_position_embeddings=128,
                                       initializer_range=0.1)
    return Generator(ArgonneForCausalLM(config), load_tokenizer(SAMPLE_TOKENIZER))


@pytest.fixture(scope="module")
def server(generator):
    app = build_app(generator, "tiny", api_key=KEY, limits=ServerLimits(max_prompt_tokens=120, max_tokens=32))
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


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
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


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


def raw_post(server, path, body: bytes, key=KEY):
    request = urllib.request.Request(f"{server}{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


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
    ],
    ids=["malformed-json", "unknown-model", "prompt-too-long", "max-tokens", "temperature", "top-p",
         "prompt-type", "stop-type"],
)
def test_bad_requests_get_4xx_json_errors(server, body, status, param):
    code, reply = raw_post(server, "/v1/completions", body)
    assert code == status
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
