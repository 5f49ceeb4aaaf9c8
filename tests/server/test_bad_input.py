"""Bad requests to a real server: the right HTTP status, OpenAI's error JSON naming the field at fault
(and its limit), and a server that still answers afterwards."""

from __future__ import annotations

import re
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adaptserve.server.app import Phase, ServerState
from tests.server.live import live_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 2048
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 503: "service_unavailable"}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 1, **fields}


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1, **fields}


def body_for(route: str, **fields) -> dict:
    return completion(**fields) if route == COMPLETIONS else chat(**fields)


def assert_error(response: httpx.Response, status: int, param: str | None, *words: str) -> str:
    """OpenAI's error shape with this status and param; the message holds every one of `words`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == ERROR_TYPES[status]
    assert error["code"] == status
    assert error["param"] == param, error
    message = error["message"]
    assert isinstance(message, str) and message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def assert_still_serves(http: httpx.Client) -> None:
    response = http.post(COMPLETIONS, json=completion(temperature=0))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 1


# (route, fields, param, words the message must hold: the field and its limit or allowed values)
INVALID_VALUES = [
    (COMPLETIONS, {"temperature": -1}, "temperature", [">= 0", "-1"]),
    (CHAT, {"temperature": -1}, "temperature", [">= 0", "-1"]),
    (COMPLETIONS, {"top_p": 1.5}, "top_p", ["(0, 1]", "1.5"]),
    (COMPLETIONS, {"top_k": -5}, "top_k", ["-1, 0", "positive", "-5"]),
    (COMPLETIONS, {"min_p": 2}, "min_p", ["[0, 1]"]),
    (COMPLETIONS, {"n": 0}, "n", ["[1, 128]", "got 0"]),
    (COMPLETIONS, {"n": 129}, "n", ["[1, 128]", "129"]),
    (CHAT, {"n": 129}, "n", ["[1, 128]", "129"]),
    (COMPLETIONS, {"presence_penalty": 3}, "presence_penalty", ["[-2, 2]"]),
    (COMPLETIONS, {"frequency_penalty": -3}, "frequency_penalty", ["[-2, 2]"]),
    (COMPLETIONS, {"logprobs": 21}, "logprobs", ["[0, 20]", "21"]),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs", ["[0, 20]", "21"]),
    (CHAT, {"top_logprobs": 2}, "top_logprobs", ["logprobs=true"]),
    (COMPLETIONS, {"max_tokens": 0}, "max_tokens", [">= 1", "got 0"]),
    (CHAT, {"max_tokens": 0}, "max_tokens", [">= 1", "got 0"]),
    (CHAT, {"max_completion_tokens": 0}, "max_completion_tokens", [">= 1", "got 0"]),
    (CHAT, {"max_completion_tokens": 2, "min_tokens": 5}, "min_tokens", ["<= max_completion_tokens (2)"]),
    (COMPLETIONS, {"seed": "forty-two"}, "seed", ["integer", "forty-two"]),
    (COMPLETIONS, {"stop": [""]}, "stop", ["non-empty"]),
    (CHAT, {"stop": [""]}, "stop", ["non-empty"]),
    (COMPLETIONS, {"priority": "urgent"}, "priority", ["high", "normal", "low", "integer", "urgent"]),
    (COMPLETIONS, {"logit_bias": {"50256": -100}}, "logit_bias", ["not supported"]),
    (COMPLETIONS, {"echo": True}, "echo", ["not supported"]),
    (COMPLETIONS, {"temperature": "hot"}, "temperature", ["number", "'hot'"]),
    (CHAT, {"temperature": "hot"}, "temperature", ["number", "'hot'"]),
]


@pytest.mark.parametrize(
    "route, fields, param, words",
    INVALID_VALUES,
    ids=[
        f"{route.split('/')[-1]}-{'-'.join(f'{k}={v}' for k, v in f.items())}"
        for route, f, *_ in INVALID_VALUES
    ],
)
def test_invalid_field_value_is_400_naming_it(http, route, fields, param, words):
    response = http.post(route, json=body_for(route, **fields))
    message = assert_error(response, 400, param, *words)
    assert param in message
    assert_still_serves(http)


def test_prompt_longer_than_context_window(http, smollm2):
    prompt = "hello " * 3000
    num_tokens = len(smollm2.tokenizer.encode(prompt))
    assert num_tokens > MAX_MODEL_LEN
    response = http.post(COMPLETIONS, json=completion(prompt=prompt))
    assert_error(response, 400, "prompt", f"prompt is {num_tokens} tokens", f"{MAX_MODEL_LEN} tokens")
    assert_still_serves(http)


def test_chat_longer_than_context_window(http):
    response = http.post(CHAT, json=chat(messages=[{"role": "user", "content": "hello " * 3000}]))
    message = assert_error(response, 400, "messages", f"{MAX_MODEL_LEN} tokens")
    num_tokens = int(re.search(r"prompt is (\d+) tokens", message).group(1))
    assert num_tokens > 3000  # the templated prompt
    assert_still_serves(http)


def test_prompt_plus_max_tokens_over_context_window(http, smollm2):
    prompt = "hello " * 1000
    num_tokens = len(smollm2.tokenizer.encode(prompt))
    response = http.post(COMPLETIONS, json=completion(prompt=prompt, max_tokens=1500))
    assert_error(
        response, 400, "max_tokens", f"{MAX_MODEL_LEN} tokens", f"has {num_tokens}", "max_tokens=1500"
    )
    assert_still_serves(http)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_chat_prompt_plus_max_tokens_over_context_window(http, field):
    body = chat(messages=[{"role": "user", "content": "hello " * 1000}])
    del body["max_tokens"]
    body[field] = 1500
    response = http.post(CHAT, json=body)
    assert_error(response, 400, field, f"{MAX_MODEL_LEN} tokens", f"{field}=1500", f"lower {field}")
    assert_still_serves(http)


def test_context_window_boundary_is_exact(http, smollm2):
    """prompt + max_tokens == max_model_len fits, one more does not; a prompt of the whole window
    leaves no room at all."""
    prompt = "1, 2, 3, 4, 5,"  # greedy goes on " 6," and so stops at once
    room = MAX_MODEL_LEN - len(smollm2.tokenizer.encode(prompt))
    fits = completion(prompt=prompt, max_tokens=room, stop=[","], temperature=0)
    response = http.post(COMPLETIONS, json=fits)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "stop"
    response = http.post(COMPLETIONS, json={**fits, "max_tokens": room + 1})
    assert_error(response, 400, "max_tokens", f"asks for {MAX_MODEL_LEN + 1}")
    response = http.post(COMPLETIONS, json=completion(prompt=[1000] * MAX_MODEL_LEN))
    assert_error(response, 400, "prompt", f"prompt is {MAX_MODEL_LEN} tokens", "at least one generated")
    assert_still_serves(http)


@pytest.mark.parametrize("route", [COMPLETIONS, CHAT])
def test_unknown_model_is_404(http, route):
    response = http.post(route, json=body_for(route, model="gpt-4o"))
    assert_error(response, 404, "model", "'gpt-4o'", MODEL)
    assert_still_serves(http)


@pytest.mark.parametrize("route", [COMPLETIONS, CHAT])
def test_malformed_json_is_400(http, route):
    response = http.post(route, content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert_error(response, 400, None, "not valid JSON")
    assert_still_serves(http)


@pytest.mark.parametrize("route", [COMPLETIONS, CHAT])
def test_json_array_body_is_400(http, route):
    response = http.post(route, json=[body_for(route)])
    assert_error(response, 400, None, "object")
    assert_still_serves(http)


@pytest.mark.parametrize("route, field", [(COMPLETIONS, "prompt"), (CHAT, "messages")])
def test_missing_required_field_is_400_naming_it(http, route, field):
    body = body_for(route)
    del body[field]
    response = http.post(route, json=body)
    assert_error(response, 400, field, f"{field}: Field required")
    assert_still_serves(http)


def test_empty_messages_is_400(http):
    response = http.post(CHAT, json=chat(messages=[]))
    assert_error(response, 400, "messages", "messages", "at least 1")
    assert_still_serves(http)


def test_empty_prompt_is_400(http):
    for prompt in ("", []):
        response = http.post(COMPLETIONS, json=completion(prompt=prompt))
        assert_error(response, 400, "prompt", "prompt is empty")
    assert_still_serves(http)


def test_image_content_part_is_400(http):
    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    ]
    response = http.post(CHAT, json=chat(messages=[{"role": "user", "content": content}]))
    assert_error(response, 400, "messages", "messages[0].content", "only text parts", "'image_url'")
    assert_still_serves(http)


def test_get_on_post_route_is_405(http):
    response = http.get(COMPLETIONS)
    assert response.status_code == 405
    assert response.json()["error"]["message"] == "Method Not Allowed"
    assert response.json()["error"]["code"] == 405
    assert_still_serves(http)


def test_unknown_route_is_404_in_the_error_shape(http):
    response = http.post("/v1/embeddings", json={"input": "hi"})
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert_still_serves(http)


OPENAI_CASES = {
    "completions-temperature": (
        lambda c: c.completions.create(model=MODEL, prompt="Hello", max_tokens=1, temperature=-1),
        openai.BadRequestError,
        "temperature",
        "temperature must be >= 0",
    ),
    "chat-top_logprobs": (
        lambda c: c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=1, top_logprobs=3
        ),
        openai.BadRequestError,
        "top_logprobs",
        "top_logprobs needs logprobs=true",
    ),
    "chat-unknown-model": (
        lambda c: c.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=1
        ),
        openai.NotFoundError,
        "model",
        "the model 'gpt-4o' does not exist",
    ),
}


@pytest.mark.parametrize("case", OPENAI_CASES)
def test_openai_client_raises_with_the_message(client, http, case):
    call, error_type, param, message = OPENAI_CASES[case]
    with pytest.raises(error_type) as raised:
        call(client)
    assert raised.value.param == param
    assert message in raised.value.message
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=1).usage.completion_tokens == 1


def test_503_while_loading_then_ready(smollm2, monkeypatch):
    gate = threading.Event()
    load = ServerState.load

    def gated_load(self, checkpoint):
        if not gate.wait(timeout=120):
            raise TimeoutError("the test never opened the gate")
        return load(self, checkpoint)

    monkeypatch.setattr(ServerState, "load", gated_load)
    with live_server(smollm2, wait_ready=False) as live, httpx.Client(base_url=live.url, timeout=60) as http:
        try:
            assert live.state.phase is Phase.LOADING
            for response in (
                http.get("/health"),
                http.get("/v1/models"),
                http.post(COMPLETIONS, json=completion()),
                http.post(CHAT, json=chat()),
            ):
                assert_error(response, 503, None, "loading")
                assert int(response.headers["retry-after"]) > 0
            # the two refused requests count as rejections; the probes of /health and /v1/models do not
            samples = {
                (s.name, s.labels.get("outcome") or s.labels.get("reason")): s.value
                for family in text_string_to_metric_families(http.get("/metrics").text)
                for s in family.samples
            }
            assert samples["adaptserve:requests_total", "rejected"] == 2
            assert samples["adaptserve:request_rejected_total", "loading"] == 2
        finally:
            gate.set()
        deadline = time.monotonic() + 120
        while live.health() != 200:
            assert time.monotonic() < deadline, "the server did not become ready after loading"
            time.sleep(0.05)
        assert live.state.phase is Phase.READY
        assert http.get("/v1/models").json()["data"][0]["id"] == MODEL
        assert_still_serves(http)
