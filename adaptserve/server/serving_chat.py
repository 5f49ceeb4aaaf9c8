"""POST /v1/chat/completions: messages through the model's chat template, whole or streamed."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from adaptserve.engine.request import CompletionOutput, RequestOutput
from adaptserve.server import serving
from adaptserve.server.errors import APIError, bad_request
from adaptserve.server.protocol import ChatCompletionRequest, ChatMessage
from adaptserve.server.serving import ServingContext


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, http_request: HTTPRequest):
    arrival_time = time.monotonic()
    serving.check_model(ctx, body.model)
    if body.tools:
        raise bad_request("tools are not supported by this server", "tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise bad_request("only response_format {'type': 'text'} is supported", "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    max_tokens, max_tokens_field = body.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens, max_tokens_field = body.max_tokens, "max_tokens"
    prompt_ids = serving.encode(ctx, _render(ctx, body.messages), "messages")
    serving.check_context(ctx, len(prompt_ids), max_tokens, max_tokens_field)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    try:
        params = serving.sampling_params(body, max_tokens, logprobs)
    except APIError as error:
        # the engine's names for what chat calls top_logprobs, and max_completion_tokens when given
        renamed = {"logprobs": "top_logprobs", "max_tokens": max_tokens_field}.get(error.param or "")
        if renamed is not None and renamed != error.param:
            error.message = error.message.replace(error.param, renamed, 1)
            error.param = renamed
        elif max_tokens_field != "max_tokens":  # e.g. min_tokens must be <= max_tokens
            error.message = re.sub(r"\bmax_tokens\b", max_tokens_field, error.message)
        raise
    priority = serving.resolve_priority(body.priority, http_request)
    completion_id = serving.new_id("chatcmpl")
    streams = await serving.start(
        ctx, [completion_id], [prompt_ids], params, priority, body.stream, arrival_time
    )
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        batches = _choice_batches(ctx, streams[0], body.n, logprobs or 0)
        events = serving.sse_stream(
            ctx, completion_id, "chat.completion.chunk", batches, len(prompt_ids), include_usage
        )
        return StreamingResponse(events, media_type="text/event-stream")
    (output,) = await serving.collect(ctx, streams, http_request)
    return JSONResponse(_response(ctx, completion_id, output, logprobs or 0))


def _render(ctx: ServingContext, messages: list[ChatMessage]) -> list[int]:
    """Prompt token ids: the template writes its own special tokens, so none are added when encoding."""
    if ctx.tokenizer is None:
        raise bad_request(
            "this model has no tokenizer and so no chat template; use /v1/completions", "messages"
        )
    conversation = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"messages[{i}].content: only text parts are supported, got type {part.type!r}",
                        "messages",
                    )
            content = "".join(part.text for part in content)
        role = "system" if message.role == "developer" else message.role
        conversation.append({"role": role, "content": content or ""})
    try:
        text = ctx.tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    except ValueError as error:
        raise bad_request(str(error), "messages") from None
    return ctx.tokenizer.encode(text, add_special_tokens=False)


def _response(ctx: ServingContext, completion_id: str, output: RequestOutput, top_n: int) -> dict:
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": _logprobs(ctx, c, top_n) if c.logprobs is not None else None,
            "finish_reason": serving.finish_reason(c.finish_reason),
            "stop_reason": c.stop_reason,
        }
        for c in output.outputs
    ]
    num_completion = sum(len(c.token_ids) for c in output.outputs)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": serving.now(),
        "model": ctx.model_name,
        "choices": choices,
        "usage": serving.usage(len(output.prompt_token_ids), num_completion),
    }


def _logprobs(ctx: ServingContext, completion: CompletionOutput, top_n: int) -> dict:
    """The chat shape: per token its text, logprob, UTF-8 bytes and the top alternatives."""

    def entry(token_id: int, logprob: float) -> dict:
        text = serving.token_text(ctx, token_id)
        return {"token": text, "logprob": serving.finite(logprob), "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, candidates in zip(completion.token_ids, completion.logprobs, strict=False):
        top = sorted(candidates.items(), key=lambda kv: -kv[1])[:top_n]  # the sampled one may be extra
        item = entry(token_id, candidates.get(token_id, float("-inf")))
        item["top_logprobs"] = [entry(t, lp) for t, lp in top]
        content.append(item)
    return {"content": content}


async def _choice_batches(
    ctx: ServingContext, outputs: AsyncIterator[RequestOutput], n: int, top_n: int
) -> AsyncIterator[tuple[list[dict], int]]:
    """The assistant role for every choice, then each step's content deltas.

    The role chunk waits for the first step's output (as in vLLM), so a client that times the first
    chunk measures the time to the first token, not the time to an empty envelope."""
    role_sent = False
    async with contextlib.aclosing(outputs):
        async for output in outputs:
            if not role_sent:
                role_sent = True
                role = {"role": "assistant", "content": ""}
                yield [{"index": i, "delta": role, "finish_reason": None} for i in range(n)], 0
            choices = [
                {
                    "index": c.index,
                    "delta": {"content": c.text} if c.text else {},
                    "logprobs": _logprobs(ctx, c, top_n) if c.logprobs is not None else None,
                    "finish_reason": serving.finish_reason(c.finish_reason),
                }
                for c in output.outputs
            ]
            yield choices, sum(len(c.token_ids) for c in output.outputs)
