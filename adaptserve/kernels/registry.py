"""Kernel variants register under an op; the registry answers which variant runs a shape bucket.

A variant is one implementation of an op (a family such as `triton` or `torch_ref`) with fixed launch
parameters. The answer for a bucket is, in order: the op's pin (set by a person), the choice the
autotuner made for that bucket, the op's default. Every change of answer is recorded as a `SwapEvent`
and announced to listeners (the CUDA-graph pool drops graphs that captured the old variant).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DECODE_ATTENTION = "decode_attention"
PREFILL_ATTENTION = "prefill_attention"
OPS = (DECODE_ATTENTION, PREFILL_ATTENTION)


@dataclass(frozen=True)
class ShapeBucket:
    """The shapes one choice covers: phase, batch (sequences or tokens), context and head layout,
    each rounded up to a power of two so that nearby shapes share a choice."""

    op: str
    batch: int  # sequences (decode) or query tokens (prefill), rounded up to a power of two
    context: int  # longest context in the batch, rounded up to a power of two
    layout: str  # "heads/kv_heads/head_dim"

    @classmethod
    def of(cls, op: str, batch: int, context: int, num_heads: int, num_kv_heads: int, head_dim: int):
        return cls(op, _pow2(batch), _pow2(context), f"{num_heads}/{num_kv_heads}/{head_dim}")

    def key(self) -> str:
        return f"{self.op}|b{self.batch}|c{self.context}|{self.layout}"

    @classmethod
    def parse(cls, key: str) -> ShapeBucket:
        op, batch, context, layout = key.split("|")
        return cls(op, int(batch[1:]), int(context[1:]), layout)


@dataclass(frozen=True)
class KernelVariant:
    """One runnable implementation of an op. `run(q, k, v, k_cache, v_cache, meta, scale, out,
    resources)` fills `out` (the decode op its first num_decode_tokens rows, the prefill op the rest);
    `warmup(q, k, v, k_cache, v_cache, meta, scale, out)`, where given, compiles what that run would
    launch and launches nothing (the autotuner calls it off the engine thread)."""

    op: str
    family: str  # torch_ref | triton | flex | ...
    run: Callable[..., None] = field(compare=False, repr=False)
    params: tuple[tuple[str, Any], ...] = ()
    version: int = 1  # bumps when the kernel's code changes: cached choices of older versions are void
    graph_safe: bool = False  # may be captured in a CUDA graph (no host syncs, static shapes)
    devices: tuple[str, ...] = ("cpu", "cuda")
    warmup: Callable[..., None] | None = field(default=None, compare=False, repr=False)  # None: no JIT

    @property
    def name(self) -> str:
        if not self.params:
            return self.family
        return self.family + "[" + ",".join(f"{k}={v}" for k, v in self.params) + "]"


class FixedKernelChoice:
    """The registry's choose/on_swap for an attention that runs its own kernels (the compressed KV
    cache): one variant for every bucket, never swapped, so the decode graph pool can ask it."""

    def __init__(self, variant: KernelVariant):
        self.variant = variant

    def choose(self, bucket: ShapeBucket) -> KernelVariant:
        return self.variant

    def on_swap(self, callback: Callable[[SwapEvent], None]) -> None:
        """Nothing to hear: the choice never changes."""


@dataclass
class SwapEvent:
    time: float  # time.time() of the change
    op: str
    bucket: str  # ShapeBucket.key(), or "*" for a pin
    old: str
    new: str
    reason: str  # tuned | offered | rollback: ... | pinned | unpinned | cache


class KernelRegistry:
    """Variants per op, and which one each shape bucket uses. Thread-safe: the admin endpoint reads
    it from another thread while the engine runs."""

    def __init__(self):
        self._variants: dict[str, dict[str, KernelVariant]] = {op: {} for op in OPS}
        self._defaults: dict[str, str] = {}
        self._choices: dict[tuple[str, ShapeBucket], str] = {}
        self._pins: dict[str, str] = {}
        self.history: list[SwapEvent] = []
        self._listeners: list[Callable[[SwapEvent], None]] = []
        self._lock = threading.Lock()

    # ---- variants ------------------------------------------------------------------------------------

    def register(self, variant: KernelVariant, default: bool = False) -> None:
        with self._lock:
            self._variants.setdefault(variant.op, {})[variant.name] = variant
            if default or variant.op not in self._defaults:
                self._defaults[variant.op] = variant.name

    def variants(self, op: str) -> list[KernelVariant]:
        return list(self._variants.get(op, {}).values())

    def get(self, op: str, name: str) -> KernelVariant:
        variants = self._variants.get(op)
        if variants is None:
            raise ValueError(f"unknown kernel op {op!r}; known: {sorted(self._variants)}")
        if name not in variants:
            raise ValueError(f"no {op} variant named {name!r}; registered: {sorted(variants)}")
        return variants[name]

    # ---- answers -------------------------------------------------------------------------------------

    def choose(self, bucket: ShapeBucket) -> KernelVariant:
        op = bucket.op
        name = self._pins.get(op) or self._choices.get((op, bucket)) or self._defaults[op]
        return self._variants[op][name]

    def is_tuned(self, bucket: ShapeBucket) -> bool:
        return bucket.op in self._pins or (bucket.op, bucket) in self._choices

    def tuned_buckets(self) -> list[ShapeBucket]:
        return [bucket for _, bucket in self._choices]

    def set_choice(self, bucket: ShapeBucket, name: str, reason: str) -> SwapEvent | None:
        """Make `name` the bucket's variant; returns the swap, or None when nothing changed."""
        self.get(bucket.op, name)
        with self._lock:
            old = self.choose(bucket).name
            self._choices[(bucket.op, bucket)] = name
        if old == name:
            return None
        return self._announce(SwapEvent(time.time(), bucket.op, bucket.key(), old, name, reason))

    def pin(self, op: str, name: str | None) -> SwapEvent:
        """Force every bucket of `op` to `name` (None lifts the pin)."""
        if name is not None:
            self.get(op, name)
        with self._lock:
            old = self._pins.get(op, "")
            if name is None:
                self._pins.pop(op, None)
            else:
                self._pins[op] = name
        reason = "unpinned" if name is None else "pinned"
        return self._announce(SwapEvent(time.time(), op, "*", old, name or "", reason))

    def on_swap(self, listener: Callable[[SwapEvent], None]) -> None:
        self._listeners.append(listener)

    def _announce(self, event: SwapEvent) -> SwapEvent:
        with self._lock:
            self.history.append(event)
        for listener in self._listeners:
            listener(event)
        return event

    def snapshot(self) -> dict[str, Any]:
        """Plain data for the admin endpoint and the CLI."""
        with self._lock:
            return {
                "variants": {op: sorted(v) for op, v in self._variants.items()},
                "defaults": dict(self._defaults),
                "pins": dict(self._pins),
                "choices": {
                    bucket.key(): name for (_, bucket), name in sorted(self._choices.items(), key=str)
                },
                "history": [vars(e) for e in self.history[-100:]],
            }


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
