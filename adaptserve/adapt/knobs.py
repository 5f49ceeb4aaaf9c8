"""Every setting that may change while the engine runs, as one plain record, and a controller's
request to change some of them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from adaptserve.config import EngineConfig

# the values a knob may take that later issues build; a controller may only choose among them
KV_FORMATS = ("bf16", "int8", "int4", "fp8", "int4k")  # KV write format (added last: gauge values stay)
SPEC_MODES = ("off", "ngram", "layers", "auto", "draft")  # speculative decoding drafter (spec_method)
PARALLELISM_MODES = ("single", "tp", "pp", "dp")  # how a request's work is spread over GPUs


@dataclass
class Knobs:
    """The run-time settings. The engine owns one; controllers read it in each snapshot and ask for
    changes with a Decision. Numbers only where a gauge can show them (strings are exported as an
    index into their tuple of choices)."""

    max_num_seqs: int = 64  # most requests running at once
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    prefill_chunk: int = 0  # most prompt tokens of one request per step; 0 = the token budget
    batch_wait_s: float = 0.0  # while requests run, hold new prompts until the oldest waited this long
    precision_policy: str = "native"  # native | bf16 | fp8 | int4 | adaptive
    kv_format: str = "bf16"  # KV-cache format (bf16 until KV compression lands)
    spec_mode: str = "off"  # speculative drafter (off until speculation lands)
    draft_len: int = 0  # tokens drafted per step when speculating
    kv_prefetch: bool = False  # prefetch offloaded KV blocks ahead of their step
    parallelism: str = "single"  # how work is spread over GPUs

    @classmethod
    def from_config(cls, config: EngineConfig) -> Knobs:
        s = config.scheduler
        return cls(
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            prefill_chunk=s.long_prefill_token_threshold,
            batch_wait_s=s.batch_wait_s,
            precision_policy=config.precision.precision_policy,
            kv_format=config.cache.kv_format,
        )

    def replace(self, **changes: Any) -> Knobs:
        return dataclasses.replace(self, **changes)

    def as_gauges(self) -> dict[str, float]:
        """Each knob as a number for a Prometheus gauge; a choice is its index in its tuple."""
        choices = _CHOICES
        gauges: dict[str, float] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            gauges[f.name] = float(choices[f.name].index(value) if f.name in choices else value)
        return gauges

    def effective_prefill_chunk(self) -> int:
        return self.prefill_chunk or self.max_num_batched_tokens


_CHOICES = {
    "precision_policy": ("native", "bf16", "fp8", "int4", "adaptive"),
    "kv_format": KV_FORMATS,
    "spec_mode": SPEC_MODES,
    "parallelism": PARALLELISM_MODES,
}
KNOB_NAMES = tuple(f.name for f in dataclasses.fields(Knobs))


def check_knob(name: str, value: Any) -> None:
    """A ValueError naming the knob and its allowed values unless `value` may be set."""
    if name not in KNOB_NAMES:
        raise ValueError(f"unknown knob {name!r}; known: {', '.join(KNOB_NAMES)}")
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ValueError(f"knob {name}={value!r} is not one of {_CHOICES[name]}")
    if name in ("max_num_seqs", "max_num_batched_tokens") and not (isinstance(value, int) and value >= 1):
        raise ValueError(f"knob {name}={value!r} must be an integer >= 1")
    if name in ("prefill_chunk", "draft_len") and not (isinstance(value, int) and value >= 0):
        raise ValueError(f"knob {name}={value!r} must be an integer >= 0")
    if name == "batch_wait_s" and not (isinstance(value, (int, float)) and 0 <= value <= 10):
        raise ValueError(f"knob batch_wait_s={value!r} must be in [0, 10] seconds")


@dataclass(frozen=True)
class Decision:
    """A controller's request: set these knobs, for this reason (logged and counted with each switch)."""

    changes: dict[str, Any]  # knob name -> new value
    reason: str  # one line for people: the signal, its value and the threshold crossed
    controller: str = ""  # filled in by the control plane when empty

    def __post_init__(self) -> None:
        for name, value in self.changes.items():
            check_knob(name, value)


@dataclass(frozen=True)
class Switch:
    """One knob change the engine applied."""

    time: float  # engine clock, seconds
    knob: str
    old: Any
    new: Any
    controller: str
    reason: str


@dataclass
class SwitchLog:
    """Every applied switch, counted by (knob, controller); the last `keep` kept for /metrics and plots."""

    keep: int = 1024
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    recent: list[Switch] = field(default_factory=list)

    def add(self, switch: Switch) -> None:
        key = (switch.knob, switch.controller)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.recent.append(switch)
        if len(self.recent) > self.keep:
            del self.recent[: len(self.recent) - self.keep]
