"""One streamed request to an OpenAI-compatible server, timed as vLLM's `vllm bench serve` times it:
TTFT from just before the POST to the first chunk with choices, ITL as the gaps between chunks with
choices, E2EL to the last such chunk, output tokens from the final `usage` chunk."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from adaptserve.bench.metrics import RequestOutcome
from adaptserve.bench.workloads import BenchRequest


@dataclass(frozen=True)
class Target:
    """A server under test: where it is and how to talk to it."""

    label: str  # name in the results, e.g. "adaptserve" or "vllm"
    base_url: str  # e.g. http://127.0.0.1:8000
    model: str  # model name the server expects
    chat: bool = False  # /v1/chat/completions instead of /v1/completions
    api_key: str | None = None

    @property
    def url(self) -> str:
        path = "/v1/chat/completions" if self.chat else "/v1/completions"
        return self.base_url.rstrip("/") + path


def request_body(target: Target, request: BenchRequest, ignore_eos: bool, tokenizer=None) -> dict[str, Any]:
    """Greedy, streamed, usage in the last chunk; `ignore_eos` (a vLLM/SGLang extension) only if asked."""
    body: dict[str, Any] = {
        "model": target.model,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.chat:
        text = request.prompt if isinstance(request.prompt, str) else _text(request.prompt, tokenizer)
        body["messages"] = [{"role": "user", "content": text}]
        body["max_completion_tokens"] = request.output_len
    else:
        body["prompt"] = request.prompt
        body["max_tokens"] = request.output_len
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def _text(token_ids: list[int], tokenizer) -> str:
    if tokenizer is None:
        raise ValueError("the chat endpoint needs text prompts: pass --tokenizer to turn token ids into text")
    return tokenizer.decode(token_ids)


async def send_request(
    client: httpx.AsyncClient, target: Target, request: BenchRequest, body: dict[str, Any], start_time: float
) -> RequestOutcome:
    """POST one request and time its stream; never raises for server or network errors."""
    outcome = RequestOutcome(success=False, prompt_len=request.prompt_len)
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else None
    sent = time.perf_counter()
    outcome.start_time = sent - start_time
    last = sent
    first_seen = False
    try:
        async with client.stream("POST", target.url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                outcome.error = f"HTTP {response.status_code}: {text[:300]}"
                return outcome
            async for line in response.aiter_lines():
                data = _event(line)
                if data is None:
                    continue
                if "error" in data:
                    outcome.error = f"error event: {json.dumps(data['error'])[:300]}"
                    return outcome
                now = time.perf_counter()
                if data.get("choices"):
                    if first_seen:
                        outcome.itl.append(now - last)
                    else:
                        first_seen = True
                        outcome.ttft = now - sent
                    last = now
                elif data.get("usage"):
                    outcome.output_tokens = data["usage"].get("completion_tokens")
    except (httpx.HTTPError, OSError) as error:
        outcome.error = f"{type(error).__name__}: {error}"
        return outcome
    if not first_seen:
        outcome.error = "Never received a valid chunk to calculate TTFT."
        return outcome
    outcome.latency = last - sent
    outcome.success = True
    return outcome


def _event(line: str) -> dict[str, Any] | None:
    """The JSON of one SSE `data:` line; None for blank lines, comments and `[DONE]`."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[len("data:") :].strip()
    if payload == "[DONE]":
        return None
    try:
        data = json.loads(payload)
    except json.JSONDecodeError:
        return {"error": f"malformed event: {payload[:100]}"}
    return data if isinstance(data, dict) else None


async def served_models(client: httpx.AsyncClient, base_url: str) -> list[str]:
    """Model ids from GET /v1/models; errors say where the server was looked for."""
    url = base_url.rstrip("/") + "/v1/models"
    try:
        response = await client.get(url, timeout=10.0)
        response.raise_for_status()
    except httpx.HTTPError as error:
        raise ValueError(f"cannot reach an OpenAI-compatible server at {url}: {error}") from None
    return [m["id"] for m in response.json().get("data", [])]
