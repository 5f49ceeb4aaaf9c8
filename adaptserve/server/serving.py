"""What completions and chat share: checking a request, turning it into engine requests, and
collecting or streaming the outputs with client-disconnect handling."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request as HTTPRequest

from adaptserve.engine.request import InvalidRequestError, RequestOutput, SamplingParams
from adaptserve.server.admission import AdmissionRejected
from adaptserve.server.async_engine import AsyncEngine, EngineError
from adaptserve.server.config import NAMED_PRIORITIES
from adaptserve.server.errors import APIError, bad_request
from adaptserve.server.metrics import ServerMetrics
from adaptserve.server.protocol import SamplingFields

MAX_N = 128  # as OpenAI
_LOGPROB_FLOOR = -9999.0  # JSON has no -inf


@dataclass
class ServingContext:
    """What a handler needs from the running server."""

    engine: AsyncEngine
    metrics: ServerMetrics
    model_name: str

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its request was aborted."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(ctx: ServingContext, model: str | None) -> None:
    if model is not None and model != ctx.model_name:
        raise APIError(
            404, f"the model {model!r} does not exist; this server serves {ctx.model_name!r}", "model"
        )


def resolve_priority(body_priority: int | str | None, http_request: HTTPRequest) -> int:
    """The body's `priority` wins over the `x-priority` header; names map to tiers."""
    value: int | str | None = body_priority
    if value is None:
        value = http_request.headers.get("x-priority")
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    text = value.strip().lower()
    if text in NAMED_PRIORITIES:
        return NAMED_PRIORITIES[text]
    try:
        return int(text)
    except ValueError:
        raise bad_request(
            f"priority must be an integer (lower = more important) or one of {sorted(NAMED_PRIORITIES)}, "
            f"got {value!r}",
            "priority",
        ) from None


def sampling_params(body: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    if not 1 <= body.n <= MAX_N:
        raise bad_request(f"n must be in [1, {MAX_N}], got {body.n}", "n")
    if body.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    try:
        return SamplingParams(
            n=body.n,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=body.seed,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            stop=body.stop or [],
            stop_token_ids=body.stop_token_ids or [],
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            include_stop_str_in_output=body.include_stop_str_in_output,
        )
    except InvalidRequestError as error:
        raise bad_request(str(error), error.field_name) from None


def encode(ctx: ServingContext, prompt: str | list[int], param: str) -> list[int]:
    try:
        return ctx.engine.engine.encode_prompt(prompt)
    except InvalidRequestError as error:
        raise bad_request(str(error), param) from None


def check_context(ctx: ServingContext, num_prompt_tokens: int, max_tokens: int | None, param: str) -> None:
    """As vLLM: a prompt plus max_tokens past the context window is an error, not a silent cut."""
    if max_tokens is not None and num_prompt_tokens + max_tokens > ctx.max_model_len:
        raise bad_request(
            f"this model's context window is {ctx.max_model_len} tokens; the prompt has {num_prompt_tokens} "
            f"and {param}={max_tokens} asks for {num_prompt_tokens + max_tokens} in all; lower {param}",
            param,
        )


async def start(
    ctx: ServingContext,
    request_ids: list[str],
    prompts: list[list[int]],
    params: SamplingParams,
    priority: int,
    stream: bool,
    arrival_time: float,
) -> list[AsyncIterator[RequestOutput]]:
    """Add one engine request per prompt now, so that their errors come before any response bytes;
    maps validation and admission failures to HTTP errors (and counts them). All or none are added."""
    streams = []
    try:
        for request_id, prompt_ids in zip(request_ids, prompts, strict=True):
            streams.append(
                await ctx.engine.add_request(request_id, prompt_ids, params, priority, stream, arrival_time)
            )
    except InvalidRequestError as error:
        raise bad_request(str(error), error.field_name) from None
    except AdmissionRejected as rejected:
        ctx.metrics.record_rejection(rejected.rejection.reason)
        raise APIError(
            429, rejected.rejection.message, None, {"Retry-After": str(rejected.rejection.retry_after_s)}
        ) from None
    except EngineError as error:
        ctx.metrics.record_outcome("error")
        raise APIError(500, str(error)) from None
    finally:
        if len(streams) < len(request_ids):
            for request_id in request_ids[: len(streams)]:
                ctx.engine.abort(request_id)
    return streams


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several streams as they come; closing it closes them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]):
            async for item in streams[0]:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    await queue.put((index, item))
        except BaseException as error:  # handed to the reader
            await queue.put((index, error))
        await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(
    ctx: ServingContext, streams: list[AsyncIterator[RequestOutput]], http_request: HTTPRequest
) -> list[RequestOutput]:
    """The final output of each stream; aborts them all if the client disconnects first."""

    async def final(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
        outputs = []
        async with contextlib.aclosing(stream):
            async for output in stream:
                outputs.append(output)
        return outputs[-1]

    results = asyncio.ensure_future(asyncio.gather(*(final(s) for s in streams)))
    disconnect = asyncio.ensure_future(_wait_for_disconnect(http_request))
    try:
        await asyncio.wait({results, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
    if not results.done():
        results.cancel()  # closes the streams, which aborts their requests
        with contextlib.suppress(BaseException):
            await results
        raise ClientDisconnected()
    try:
        return results.result()
    except EngineError as error:
        ctx.metrics.record_outcome("error")
        raise APIError(500, str(error)) from None


async def _wait_for_disconnect(http_request: HTTPRequest) -> None:
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


async def sse_stream(
    ctx: ServingContext,
    completion_id: str,
    object_name: str,
    batches: AsyncIterator[tuple[list[dict], int]],
    num_prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """OpenAI's stream around batches of (choices, tokens they add): one chunk per batch, an error
    event if the engine fails mid-stream, the usage chunk if asked for, then `[DONE]`. Closing it (a
    client that went away) closes `batches`, which aborts the requests behind them."""
    created = now()
    num_completion_tokens = 0

    def chunk(choices: list[dict]) -> dict:
        data = {"id": completion_id, "object": object_name, "created": created, "model": ctx.model_name}
        data["choices"] = choices
        if include_usage:
            data["usage"] = None
        return data

    async with contextlib.aclosing(batches):
        try:
            async for choices, num_tokens in batches:
                num_completion_tokens += num_tokens
                yield sse(chunk(choices))
        except APIError as error:
            yield sse(error.body())
        except Exception as error:  # an engine failure mid-stream: tell the client, then end cleanly
            ctx.metrics.record_outcome("error")
            yield sse(APIError(500, str(error)).body())
    if include_usage:
        last = chunk([])
        last["usage"] = usage(num_prompt_tokens, num_completion_tokens)
        yield sse(last)
    yield sse("[DONE]")


def finish_reason(reason: str | None) -> str | None:
    """OpenAI has no "abort": a request cut short by shutdown reads as stopped."""
    return None if reason is None else "stop" if reason == "abort" else reason


def token_text(ctx: ServingContext, token_id: int) -> str:
    """One token as text, special tokens included (for logprobs)."""
    tokenizer = ctx.tokenizer
    return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else str(token_id)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _LOGPROB_FLOOR


def now() -> int:
    return int(time.time())
