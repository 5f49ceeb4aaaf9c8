"""The client's reading of OpenAI streams, on hand-written streams (timing is covered by test_metrics and
the end-to-end run in test_serve)."""

import asyncio
import json
import time

import httpx
import pytest

from adaptserve.bench.client import Target, request_body, send_request
from adaptserve.bench.workloads import BenchRequest

REQUEST = BenchRequest([300, 301, 302], 3, 4)
TARGET = Target("t", "http://server", "m")


def _sse(*events) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def _send(status: int, body: bytes):
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"] = str(request.url)
        seen["body"] = json.loads(request.content)
        return httpx.Response(status, content=body)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            body_json = request_body(TARGET, REQUEST, ignore_eos=True)
            return await send_request(client, TARGET, REQUEST, body_json, time.perf_counter())

    return asyncio.run(go()), seen


def _choice(text):
    return {"choices": [{"index": 0, "text": text, "finish_reason": None}], "usage": None}


def test_chunks_with_choices_are_timed_and_usage_gives_output_tokens():
    stream = _sse(
        _choice("a"),
        _choice("bc"),
        _choice("d"),
        {"choices": [], "usage": {"completion_tokens": 4}},
        "[DONE]",
    )
    outcome, seen = _send(200, stream)
    assert outcome.success and outcome.error == ""
    assert outcome.output_tokens == 4  # from usage, not from the 3 chunks
    assert len(outcome.itl) == 2  # 3 chunks with choices -> 2 gaps
    assert 0 < outcome.ttft <= outcome.latency
    assert outcome.latency == pytest.approx(outcome.ttft + sum(outcome.itl))
    assert seen["url"] == "http://server/v1/completions"
    assert seen["body"]["prompt"] == [300, 301, 302] and seen["body"]["max_tokens"] == 4
    assert seen["body"]["ignore_eos"] is True and seen["body"]["stream_options"] == {"include_usage": True}


def test_http_errors_error_events_and_empty_streams_fail_cleanly():
    outcome, _ = _send(429, b'{"error": {"message": "over SLO"}}')
    assert not outcome.success and outcome.error.startswith("HTTP 429") and "over SLO" in outcome.error
    outcome, _ = _send(200, _sse(_choice("a"), {"error": {"message": "engine failed"}}, "[DONE]"))
    assert not outcome.success and "engine failed" in outcome.error
    outcome, _ = _send(200, _sse({"choices": [], "usage": {"completion_tokens": 0}}, "[DONE]"))
    assert not outcome.success and outcome.error == "Never received a valid chunk to calculate TTFT."


def test_network_errors_fail_cleanly():
    def handler(request):
        raise httpx.ConnectError("refused")

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await send_request(client, TARGET, REQUEST, {}, time.perf_counter())

    outcome = asyncio.run(go())
    assert not outcome.success and outcome.error == "ConnectError: refused"


def test_chat_bodies_need_text():
    chat = Target("c", "http://server/", "m", chat=True)
    assert chat.url == "http://server/v1/chat/completions"
    text = BenchRequest("hello there", 2, 5)
    body = request_body(chat, text, ignore_eos=False)
    assert body["messages"] == [{"role": "user", "content": "hello there"}]
    assert body["max_completion_tokens"] == 5 and "ignore_eos" not in body
    with pytest.raises(ValueError, match="--tokenizer"):
        request_body(chat, REQUEST, ignore_eos=False)
