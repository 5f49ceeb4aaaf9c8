"""Request bodies of the OpenAI API (and vLLM's extensions), as pydantic models.

Types are checked by pydantic (a wrong type is a 400 naming the field); ranges by SamplingParams,
whose errors name the field and its limits. Fields that clients send but we do not use (`user`,
unknown extras) are accepted and ignored, as vLLM and OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = 1
    temperature: float | None = None  # default 1.0
    top_p: float | None = None
    top_k: int | None = None  # extension
    min_p: float | None = None  # extension
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    include_stop_str_in_output: bool = False  # extension
    ignore_eos: bool = False  # extension
    min_tokens: int = 0  # extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: int | str | None = None  # extension: lower = more important, or "high" | "normal" | "low"
    logit_bias: dict[str, float] | None = None  # accepted only when empty


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None  # top-n per token, 0..20
    echo: bool = False
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None  # 0..20, needs logprobs=true
    tools: list[dict] | None = None  # not supported: refused when non-empty
    response_format: dict | None = None  # only {"type": "text"}
