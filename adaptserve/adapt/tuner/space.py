"""The tuner's action space and context: a finite list of knob settings, and the telemetry it acts on.

An action is one `KnobSetting` (every knob the tuner may set, with its value), drawn from the product of
per-knob value grids. The batching knobs get real grids; the knobs later features add (precision, KV
format, speculation, prefetch, parallelism) are dimensions too, but their default grid is just the value
in force, so a build without those features never asks for them. The product is capped: redundant
combinations are dropped first, then an evenly spaced subset is kept, always with the starting setting.

The context is a small vector in [0, 1] from a TelemetrySnapshot: load (arrival rate, queued prompt
tokens, running requests, decode batch), memory (KV use) and latency against the SLO (TTFT and TPOT p90).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from adaptserve.adapt.knobs import KNOB_NAMES, Knobs, check_knob
from adaptserve.adapt.snapshot import TelemetrySnapshot
from adaptserve.adapt.tuner.reward import SLO

BATCHING_GRIDS: dict[str, tuple[Any, ...]] = {
    "max_num_seqs": (16, 32, 64, 128),
    "max_num_batched_tokens": (256, 512, 1024, 2048),
    "prefill_chunk": (0, 256, 512),
    "batch_wait_s": (0.0, 0.01),
}
# knobs that later features make switchable; by default the tuner keeps them where they are
LATER_KNOBS = ("precision_policy", "kv_format", "spec_mode", "draft_len", "kv_prefetch", "parallelism")


@dataclass(frozen=True, slots=True)
class KnobSetting:
    """One action: knob name -> value, read-only (a MappingProxy over a private dict), hashable."""

    values: Mapping[str, Any]

    def __post_init__(self) -> None:
        for name, value in self.values.items():
            check_knob(name, value)
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.values.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KnobSetting) and dict(self.values) == dict(other.values)

    def changes(self) -> dict[str, Any]:
        """A plain dict for a Decision."""
        return dict(self.values)

    def matches(self, knobs: Knobs) -> bool:
        return all(getattr(knobs, name) == value for name, value in self.values.items())

    def label(self) -> str:
        """Short, for tables and logs: the batching knobs only unless a later knob differs from default."""
        short = {
            "max_num_seqs": "seqs",
            "max_num_batched_tokens": "tokens",
            "prefill_chunk": "chunk",
            "batch_wait_s": "wait",
        }
        default = Knobs()
        parts = [
            f"{short.get(name, name)}={value:g}"
            if isinstance(value, float)
            else f"{short.get(name, name)}={value}"
            for name, value in self.values.items()
            if name in BATCHING_GRIDS or value != getattr(default, name)
        ]
        return " ".join(parts)


class ActionSpace:
    """A fixed, ordered list of settings; an action is an index into it."""

    def __init__(self, settings: Sequence[KnobSetting]):
        if not settings:
            raise ValueError("an action space needs at least one setting")
        if len(set(settings)) != len(settings):
            raise ValueError("an action space must not repeat a setting")
        names = set(settings[0].values)
        if any(set(s.values) != names for s in settings):
            raise ValueError("every setting of an action space must set the same knobs")
        self.settings = tuple(settings)
        self.knob_names = tuple(settings[0].values)

    def __len__(self) -> int:
        return len(self.settings)

    def __getitem__(self, index: int) -> KnobSetting:
        return self.settings[index]

    def __iter__(self) -> Iterator[KnobSetting]:
        return iter(self.settings)

    def index_of(self, knobs: Knobs) -> int | None:
        """The action whose values are all in force in `knobs`, or None."""
        return next((i for i, s in enumerate(self.settings) if s.matches(knobs)), None)

    def max_value(self, name: str) -> Any:
        """The largest value any setting gives `name` (the engine's ceilings must allow it)."""
        return max(s[name] for s in self.settings)

    @classmethod
    def from_grids(
        cls,
        grids: Mapping[str, Sequence[Any]] | None = None,
        base: Knobs | None = None,
        max_settings: int = 96,
    ) -> ActionSpace:
        """The product of `grids` (defaults: BATCHING_GRIDS, and each later knob at `base`'s value).

        Combinations where a nonzero prefill chunk is not below the token budget are dropped (the same
        as chunk 0). Past `max_settings`, an evenly spaced subset of the product is kept; `base`'s own
        setting is always in the space when the grids contain it (the tuner starts from a known state).
        """
        if max_settings < 1:
            raise ValueError(f"max_settings must be >= 1, got {max_settings}")
        base = base or Knobs()
        merged = default_grids(base)
        for name, values in (grids or {}).items():
            if name not in KNOB_NAMES:
                raise ValueError(f"unknown knob {name!r} in the action grids; known: {', '.join(KNOB_NAMES)}")
            if not values:
                raise ValueError(f"the grid of knob {name!r} is empty")
            merged[name] = tuple(values)
        names = list(merged)
        combos = [dict(zip(names, values, strict=True)) for values in itertools.product(*merged.values())]
        combos = [c for c in combos if not 0 < c["prefill_chunk"] >= c["max_num_batched_tokens"]]
        start = {name: getattr(base, name) for name in names}
        if len(combos) > max_settings:
            others = [i for i, c in enumerate(combos) if c != start]
            num_others = max_settings - (start in combos)
            picks = np.linspace(0, len(others) - 1, num_others).round().astype(int).tolist()
            keep = {others[i] for i in picks} | {i for i, c in enumerate(combos) if c == start}
            combos = [c for i, c in enumerate(combos) if i in keep]
        return cls([KnobSetting(c) for c in combos])


def default_grids(base: Knobs) -> dict[str, tuple[Any, ...]]:
    grids = dict(BATCHING_GRIDS)
    grids.update({name: (getattr(base, name),) for name in LATER_KNOBS})
    return grids


# ---- context --------------------------------------------------------------------------------------------

CONTEXT_NAMES = (
    "arrival_rate",
    "waiting_prompt_tokens",
    "num_running",
    "mean_decode_batch",
    "kv_usage",
    "ttft_p90_vs_slo",
    "tpot_p90_vs_slo",
)
LOAD_FEATURE = 0  # the index of arrival_rate: the one load signal the tuner's own choice does not move


@dataclass(frozen=True, slots=True)
class ContextScales:
    """The value of each unbounded signal that maps to 0.5: x -> x / (x + scale), so 0 -> 0 and large -> 1."""

    arrival_rate: float = 4.0  # requests per second: set near the rate the deployment calls normal
    waiting_prompt_tokens: float = 4096.0  # queued prompt tokens
    num_running: float = 32.0  # running requests
    mean_decode_batch: float = 32.0  # decode sequences per step

    def __post_init__(self) -> None:
        for name in ("arrival_rate", "waiting_prompt_tokens", "num_running", "mean_decode_batch"):
            if not getattr(self, name) > 0:
                raise ValueError(f"context scale {name} must be > 0, got {getattr(self, name)}")


def context_features(
    snapshot: TelemetrySnapshot, slo: SLO, scales: ContextScales = ContextScales()
) -> np.ndarray:
    """The snapshot as a float32 vector in [0, 1], in CONTEXT_NAMES order. Latencies are p90 / SLO,
    squashed the same way (0.5 = exactly at the SLO); a window without samples reads 0."""

    def squash(x: float, scale: float) -> float:
        x = max(0.0, float(x))
        return x / (x + scale)

    return np.array(
        [
            squash(snapshot.arrival_rate, scales.arrival_rate),
            squash(snapshot.waiting_prompt_tokens, scales.waiting_prompt_tokens),
            squash(snapshot.num_running, scales.num_running),
            squash(snapshot.mean_decode_batch, scales.mean_decode_batch),
            min(1.0, max(0.0, snapshot.kv_usage)),
            squash(snapshot.ttft.p90, slo.ttft_s),
            squash(snapshot.tpot.p90, slo.tpot_s),
        ],
        dtype=np.float32,
    )
