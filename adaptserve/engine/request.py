"""Requests as plain data: what the user asked for, how far the engine got, what came out."""

from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass, field


class InvalidRequestError(ValueError):
    """A request field is out of range; the message names the field and the limit."""

    def __init__(self, message: str, field_name: str | None = None):
        super().__init__(message)
        self.field_name = field_name


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop (names and meanings as in vLLM and the OpenAI API)."""

    n: int = 1  # completions per prompt; they share the prompt's KV blocks
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0  # drop tokens below min_p * p(best)
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in prompt or output
    presence_penalty: float = 0.0  # subtracted once from logits of tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    seed: int | None = None  # per-request seed: same output in any batch
    max_tokens: int | None = 16  # None = up to the context window
    min_tokens: int = 0  # EOS and stop token ids cannot be sampled before this many tokens
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)  # extra token ids that end the output
    ignore_eos: bool = False  # keep going past EOS
    logprobs: int | None = None  # top-n logprobs per generated token (plus the sampled one)
    include_stop_str_in_output: bool = False  # keep the matched stop string in the text

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Repetition, frequency or presence penalty: sampling reads every earlier token."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def validate(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", f"n must be >= 1, got {self.n}")
        _check(self.temperature >= 0, "temperature", f"temperature must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _check(
            isinstance(self.top_k, int) and self.top_k >= 0,
            "top_k",
            f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k}",
        )
        _check(0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        _check(
            self.repetition_penalty > 0,
            "repetition_penalty",
            f"repetition_penalty must be > 0, got {self.repetition_penalty}",
        )
        _check(
            -2 <= self.presence_penalty <= 2,
            "presence_penalty",
            f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
        )
        _check(
            -2 <= self.frequency_penalty <= 2,
            "frequency_penalty",
            f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
        )
        _check(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens",
            f"max_tokens must be None or an integer >= 1, got {self.max_tokens!r}",
        )
        _check(
            _is_int(self.min_tokens) and self.min_tokens >= 0,
            "min_tokens",
            f"min_tokens must be an integer >= 0, got {self.min_tokens!r}",
        )
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
        )
        _check(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
            "logprobs",
            f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}",
        )
        # torch.Generator.manual_seed takes [-2**63, 2**64); child i of n > 1 uses seed + i
        _check(
            self.seed is None or (_is_int(self.seed) and _MIN_SEED <= self.seed <= _MAX_SEED - (self.n - 1)),
            "seed",
            f"seed must be None or an integer in [-2**63, 2**64 - n], got {self.seed!r}",
        )
        _check(
            all(_is_int(t) for t in self.stop_token_ids),
            "stop_token_ids",
            f"stop_token_ids must be integers, got {self.stop_token_ids!r}",
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings"
        )


_MIN_SEED, _MAX_SEED = -(2**63), 2**64 - 1


def _is_int(value: object) -> bool:
    """A real integer: bool and float are refused, numpy integers are fine."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message, field_name)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"  # EOS, stop token or stop string
    FINISHED_LENGTH = "length"  # max_tokens or context window
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


@dataclass(eq=False)
class Request:
    """One sequence being generated. `num_computed_tokens` catches up to `num_tokens`; that one
    counter covers prefill, chunked prefill, prefix-cache hits, resumed and decoding requests."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    priority: int = 0  # lower value = more important (as in vLLM)
    max_total_tokens: int = 1 << 30  # context window: prompt + output never exceed it
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0  # sampled by a step still running on the device (0 or 1)
    spec_token_ids: list[int] = field(default_factory=list)  # drafted tokens to verify in the next step
    num_drafts_in_flight: int = 0  # drafted tokens the launched step verifies (their KV is written)
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache at first scheduling
    num_preemptions: int = 0
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    output_text: str = ""  # filled when it finishes (or as it goes when it has stop strings)
    first_scheduled_time: float | None = None  # time.monotonic() stamps, for latency metrics
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def max_output_tokens(self) -> int:
        room = self.max_total_tokens - self.num_prompt_tokens
        limit = self.sampling_params.max_tokens
        return room if limit is None else min(limit, room)


@dataclass
class CompletionOutput:
    """One of the n completions of a prompt."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: {token_id: logprob}
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    """What `LLM.generate` returns per prompt (shaped like vLLM's RequestOutput)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
