"""POST /v1/completions: one or several prompts, n completions each, whole or streamed."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from adaptserve.engine.request import CompletionOutput, RequestOutput
from adaptserve.server import serving
from adaptserve.server.errors import bad_request
from adaptserve.server.protocol import CompletionRequest
from adaptserve.server.serving import ServingContext


async def create_completion(ctx: ServingContext, body: CompletionRequest, http_request: HTTPRequest):
    arrival_time = time.monotonic()
    serving.check_model(ctx, body.model)
    if body.echo:
        raise bad_request("echo is not supported", "echo")
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    prompts = [serving.encode(ctx, p, "prompt") for p in _prompt_list(body.prompt)]
    for prompt_ids in prompts:
        serving.check_context(ctx, len(prompt_ids), body.max_tokens, "max_tokens")
    params = serving.sampling_params(body, body.max_tokens, body.logprobs)
    priority = serving.resolve_priority(body.priority, http_request)
    completion_id = serving.new_id("cmpl")
    request_ids = [f"{completion_id}-{i}" for i in range(len(prompts))]
    streams = await serving.start(ctx, request_ids, prompts, params, priority, body.stream, arrival_time)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        batches = _choice_batches(ctx, streams, body.n)
        num_prompt_tokens = sum(len(p) for p in prompts)
        events = serving.sse_stream(
            ctx, completion_id, "text_completion", batches, num_prompt_tokens, include_usage
        )
        return StreamingResponse(events, media_type="text/event-stream")
    outputs = await serving.collect(ctx, streams, http_request)
    return JSONResponse(_response(ctx, completion_id, outputs, body.n))


def _prompt_list(prompt) -> list[str | list[int]]:
    """The four prompt shapes of the API: a string, strings, token ids, lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt is empty; give a string, a list of strings or token ids", "prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _response(ctx: ServingContext, completion_id: str, outputs: list[RequestOutput], n: int) -> dict:
    choices, num_prompt, num_completion = [], 0, 0
    for prompt_index, output in enumerate(outputs):
        num_prompt += len(output.prompt_token_ids)
        for completion in output.outputs:
            num_completion += len(completion.token_ids)
            choices.append(_choice(ctx, prompt_index * n + completion.index, completion, 0))
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": serving.now(),
        "model": ctx.model_name,
        "choices": choices,
        "usage": serving.usage(num_prompt, num_completion),
    }


def _choice(ctx: ServingContext, index: int, completion: CompletionOutput, text_offset: int) -> dict:
    return {
        "index": index,
        "text": completion.text,
        "logprobs": _logprobs(ctx, completion, text_offset) if completion.logprobs is not None else None,
        "finish_reason": serving.finish_reason(completion.finish_reason),
        "stop_reason": completion.stop_reason,
    }


def _logprobs(ctx: ServingContext, completion: CompletionOutput, text_offset: int) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, candidates in zip(completion.token_ids, completion.logprobs, strict=False):
        text = serving.token_text(ctx, token_id)
        tokens.append(text)
        token_logprobs.append(serving.finite(candidates.get(token_id, float("-inf"))))
        ranked = sorted(candidates.items(), key=lambda kv: -kv[1])
        top_logprobs.append({serving.token_text(ctx, t): serving.finite(lp) for t, lp in ranked})
        offsets.append(text_offset)
        text_offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


async def _choice_batches(
    ctx: ServingContext, streams: list[AsyncIterator[RequestOutput]], n: int
) -> AsyncIterator[tuple[list[dict], int]]:
    """One choice per batch, indexed prompt * n + completion, as the outputs of all prompts come."""
    offsets: dict[int, int] = {}  # text offset per choice, for logprobs
    merged = serving.merge(streams)
    async with contextlib.aclosing(merged):
        async for prompt_index, output in merged:
            for completion in output.outputs:
                index = prompt_index * n + completion.index
                choice = _choice(ctx, index, completion, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + len(completion.text)
                yield [choice], len(completion.token_ids)
