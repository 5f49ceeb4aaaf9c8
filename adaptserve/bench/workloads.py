"""Benchmark workloads: which prompts (token ids) and how many output tokens, deterministic by seed.

Every workload says its length rule in `describe()["rule"]`, and that label travels into the result
JSON. Prompts are random token ids from [256, vocab_size) (the low ids hold special tokens in the
Llama-family vocabularies), sent as token ids so every server sees exactly `prompt_len` tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

FIRST_ORDINARY_TOKEN = 256  # ids below this are control and byte tokens in the vocabularies we serve


@dataclass(slots=True)
class BenchRequest:
    """One request of a workload: token ids or text, and how many tokens to ask for."""

    prompt: list[int] | str
    prompt_len: int
    output_len: int
    arrival_s: float | None = None  # from a trace file; None = the arrival process decides
    session_id: int | None = None  # multi-turn workloads: requests of one conversation share it


def random_ids(rng: np.random.Generator, num: int, vocab_size: int) -> list[int]:
    return rng.integers(FIRST_ORDINARY_TOKEN, vocab_size, size=num).tolist()


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, size: int) -> np.ndarray:
    """Lognormal samples with the given mean (mu = ln(mean) - sigma^2 / 2)."""
    return rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, size)


def _check_positive(**fields: float) -> None:
    for name, value in fields.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


@dataclass(frozen=True)
class RandomWorkload:
    """vLLM's random dataset: lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)]."""

    vocab_size: int
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check_positive(input_len=self.input_len, output_len=self.output_len)
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"random_range_ratio must be in [0, 1), got {self.range_ratio}")

    def requests(self, num: int, seed: int) -> list[BenchRequest]:
        rng = np.random.default_rng(seed)
        lo_in, hi_in = _bounds(self.input_len, self.range_ratio)
        lo_out, hi_out = _bounds(self.output_len, self.range_ratio)
        input_lens = rng.integers(lo_in, hi_in + 1, size=num)
        output_lens = rng.integers(lo_out, hi_out + 1, size=num)
        return [
            BenchRequest(random_ids(rng, int(n_in), self.vocab_size), int(n_in), int(n_out))
            for n_in, n_out in zip(input_lens, output_lens, strict=True)
        ]

    def describe(self) -> dict[str, Any]:
        rule = f"uniform lengths: input {self.input_len}, output {self.output_len}, +-{self.range_ratio:.0%}"
        return {"name": "random", "rule": rule, **asdict(self)}


def _bounds(length: int, ratio: float) -> tuple[int, int]:
    return max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))


@dataclass(frozen=True)
class ShareGPTShapedWorkload:
    """Synthetic conversations shaped like ShareGPT: lognormal prompt and output lengths with means of
    about 202 and 179 tokens, clipped to [4, max_len] as vLLM filters the real set."""

    vocab_size: int
    mean_input_len: float = 202.0
    mean_output_len: float = 179.0
    input_sigma: float = 1.0  # heavy-tailed prompts, as in the real set
    output_sigma: float = 0.8
    max_len: int = 1024

    def requests(self, num: int, seed: int) -> list[BenchRequest]:
        rng = np.random.default_rng(seed)
        input_lens = _clipped(_lognormal(rng, self.mean_input_len, self.input_sigma, num), self.max_len)
        output_lens = _clipped(_lognormal(rng, self.mean_output_len, self.output_sigma, num), self.max_len)
        return [
            BenchRequest(random_ids(rng, n_in, self.vocab_size), n_in, n_out)
            for n_in, n_out in zip(input_lens, output_lens, strict=True)
        ]

    def describe(self) -> dict[str, Any]:
        rule = (
            f"lognormal lengths: input mean {self.mean_input_len:g} (sigma {self.input_sigma}), output mean "
            f"{self.mean_output_len:g} (sigma {self.output_sigma}), clipped to [4, {self.max_len}]"
        )
        return {"name": "sharegpt-synth", "rule": rule, **asdict(self)}


def _clipped(lengths: np.ndarray, max_len: int) -> list[int]:
    return np.clip(np.rint(lengths), 4, max_len).astype(int).tolist()


@dataclass(frozen=True)
class SharedPrefixChatWorkload:
    """Multi-turn chats behind one shared system prompt: the prompt of turn k holds the system prompt,
    the session's earlier user messages and (synthetic) replies, then the new message. Sessions run in
    waves of `concurrent_sessions`, turn by turn, so a turn arrives after its wave's previous turns and
    its prefix is still warm in a prefix cache (or in an offload tier)."""

    vocab_size: int
    system_len: int = 512
    turns: int = 4
    mean_user_len: float = 64.0
    mean_reply_len: float = 128.0
    concurrent_sessions: int = 8

    def __post_init__(self) -> None:
        _check_positive(
            system_len=self.system_len, turns=self.turns, concurrent_sessions=self.concurrent_sessions
        )

    def requests(self, num: int, seed: int) -> list[BenchRequest]:
        rng = np.random.default_rng(seed)
        system = random_ids(rng, self.system_len, self.vocab_size)
        num_sessions = math.ceil(num / self.turns)
        out: list[BenchRequest] = []
        for wave_start in range(0, num_sessions, self.concurrent_sessions):
            wave = range(wave_start, min(wave_start + self.concurrent_sessions, num_sessions))
            histories = {s: list(system) for s in wave}
            for _ in range(self.turns):
                for session in wave:
                    (user_len,) = _clipped(_lognormal(rng, self.mean_user_len, 0.5, 1), 2048)
                    (reply_len,) = _clipped(_lognormal(rng, self.mean_reply_len, 0.5, 1), 2048)
                    prompt = histories[session] + random_ids(rng, user_len, self.vocab_size)
                    out.append(BenchRequest(prompt, len(prompt), reply_len, session_id=session))
                    histories[session] = prompt + random_ids(rng, reply_len, self.vocab_size)
        return out[:num]

    def describe(self) -> dict[str, Any]:
        rule = (
            f"{self.turns}-turn chats sharing a {self.system_len}-token system prompt; user messages "
            f"lognormal mean {self.mean_user_len:g}, replies lognormal mean {self.mean_reply_len:g} "
            f"(sigma 0.5); {self.concurrent_sessions} sessions at a time"
        )
        return {"name": "shared-prefix", "rule": rule, **asdict(self)}


@dataclass(frozen=True)
class MixedLengthWorkload:
    """Mostly ShareGPT-shaped requests plus a fraction with long prompts (8k+), for routing and chunked
    prefill: the long ones must not starve the short ones."""

    vocab_size: int
    long_fraction: float = 0.1
    long_min_len: int = 8192
    long_max_len: int = 16384
    long_output_len: int = 128

    def __post_init__(self) -> None:
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError(f"long_fraction must be in [0, 1], got {self.long_fraction}")
        if not 0 < self.long_min_len <= self.long_max_len:
            raise ValueError(
                f"long lengths need 0 < long_min_len <= long_max_len, got {self.long_min_len}, "
                f"{self.long_max_len}"
            )

    def requests(self, num: int, seed: int) -> list[BenchRequest]:
        rng = np.random.default_rng(seed)
        short = ShareGPTShapedWorkload(self.vocab_size).requests(num, seed + 1)
        is_long = rng.random(num) < self.long_fraction
        long_lens = rng.integers(self.long_min_len, self.long_max_len + 1, size=num)
        return [
            BenchRequest(random_ids(rng, int(n), self.vocab_size), int(n), self.long_output_len)
            if long
            else s
            for s, long, n in zip(short, is_long, long_lens, strict=True)
        ]

    def describe(self) -> dict[str, Any]:
        rule = (
            f"{1 - self.long_fraction:.0%} ShareGPT-shaped, {self.long_fraction:.0%} long prompts uniform in "
            f"[{self.long_min_len}, {self.long_max_len}] with {self.long_output_len} output tokens"
        )
        return {"name": "mixed", "rule": rule, **asdict(self)}


WORKLOADS = {
    "random": RandomWorkload,
    "sharegpt-synth": ShareGPTShapedWorkload,
    "shared-prefix": SharedPrefixChatWorkload,
    "mixed": MixedLengthWorkload,
}
