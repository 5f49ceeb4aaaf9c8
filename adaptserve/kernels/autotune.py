"""Runtime autotuner: times kernel variants on live shapes, swaps in the fastest, rolls back regressions.

Signal: the shapes the engine actually runs. After each step the runner hands over that step's
attention metadata and layer-0 KV cache (`observe`); between steps `run_slot` does pieces of work
until its time budget (`slot_budget_ms`) is spent:

- **tuning** a bucket with no saved choice: a candidate with a JIT step (Triton) is first compiled on a
  background thread, one at a time, and slots pass it over until that is done (a compile takes about a
  second, which the engine thread must not wait for); then each tunable variant is launched once (for
  compiled ones a cache hit) and pruned if its compiled launch cannot reach a useful occupancy
  (registers and shared memory per block against the SM's limits) or spills; it is checked against the
  reference on the live shapes (random queries over the live cache), then timed; after the last
  candidate the fastest correct one is swapped in when it beats the current one by `min_gain`;
- **probation** after every swap (tuned or offered by a person): the new and the previous variant are
  re-timed, interleaved, on fresh live samples; a variant that is slower by more than
  `max_regression`, or whose error leaves the tolerance, is rolled back and barred from that bucket.

Choices persist to a JSON file keyed by GPU, shape bucket and kernel version, so the next start is warm.
Guardrail: a swap never happens without a reference check, and every swap can be undone by probation.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from adaptserve.kernels.attention.metadata import AttentionMetadata
from adaptserve.kernels.choice_cache import ChoiceCache
from adaptserve.kernels.live_sample import (
    Sample,
    compile_ahead,
    copy_meta,
    launch,
    run_args,
    runs_on,
    sample_inputs,
)
from adaptserve.kernels.registry import KernelRegistry, KernelVariant, ShapeBucket

log = logging.getLogger(__name__)


@dataclass
class AutotuneConfig:
    tunable_families: tuple[str, ...] = ("triton", "torch_ref", "flex")  # families tuning may pick
    repeats: int = 10  # timed launches per variant and sample (median kept)
    min_gain: float = 0.03  # a tuned variant must be this much faster than the current one to swap
    max_regression: float = 0.10  # probation: slower than the previous variant by more -> rollback
    probation_samples: int = 3  # live samples a swapped variant must pass
    hard_regression: float = 2.0  # probation: one sample this many times slower rolls back at once
    atol: float = 2e-2  # reference check: max |variant - reference| (bf16 attention outputs)
    slot_budget_ms: float = 5.0  # host time per slot: no new piece of work starts once it is spent


@dataclass
class _Tuning:
    candidates: list[KernelVariant]
    timings: dict[str, float] = field(default_factory=dict)  # variant name -> median seconds
    rejected: dict[str, str] = field(default_factory=dict)  # variant name -> why


@dataclass
class _Probation:
    old: str
    new: str
    reason: str
    ratios: list[float] = field(default_factory=list)  # new time / old time per sample


# compiler(variant, args): compiles what `variant.run(*args)` would launch, without launching it; runs
# on the tuner's worker thread. args = (q, k, v, k_cache, v_cache, meta, scale, out).
Compiler = Callable[[KernelVariant, tuple], None]


class Autotuner:
    """See the module docstring. `compiler` compiles candidates that have a `warmup` off the engine
    thread: "auto" is Triton's warmup where CUDA is available and none elsewhere (under Triton's CPU
    interpreter nothing compiles, and candidates are launched directly as they come); tests pass fakes.
    Call `close()` to stop its worker thread."""

    def __init__(
        self,
        registry: KernelRegistry,
        reference: dict[str, KernelVariant],
        config: AutotuneConfig | None = None,
        cache: ChoiceCache | None = None,
        online: bool = True,
        clock: Callable[[], float] = time.perf_counter,
        compiler: Compiler | Literal["auto"] | None = "auto",
    ):
        self.registry, self.reference = registry, reference
        self.config = config or AutotuneConfig()
        self.cache = cache
        self.online = online  # tune untuned buckets while serving (else only probation and the cache)
        self.clock = clock
        if compiler == "auto":
            compiler = compile_ahead if torch.cuda.is_available() else None
        self.compiler = compiler
        self._compile_pool: ThreadPoolExecutor | None = None  # one worker, started on first use
        self._compiling: tuple[ShapeBucket, str, Future] | None = None  # the one compile submitted
        self._samples: dict[ShapeBucket, Sample] = {}
        self._tuning: dict[ShapeBucket, _Tuning] = {}
        self._probation: dict[ShapeBucket, _Probation] = {}
        self._barred: dict[ShapeBucket, set[str]] = {}
        self._step = 0
        self._seen: set[ShapeBucket] = set()  # every bucket the engine has run
        self.device_limits = _device_limits()
        self.events: list[dict[str, Any]] = []  # tuned, rollback, pruned ... for /admin and tests

    # ---- inputs from the runner ----------------------------------------------------------------------

    def wants(self, bucket: ShapeBucket) -> bool:
        """Whether a live sample of this bucket would be used (the runner skips copying otherwise)."""
        if bucket in self._probation:
            return True
        return self.online and not self.registry.is_tuned(bucket) and bucket not in self._samples

    def saw(self, bucket: ShapeBucket) -> None:
        """The engine ran this bucket (offers go to every bucket seen)."""
        self._seen.add(bucket)

    def observe(self, bucket: ShapeBucket, meta: AttentionMetadata, k_cache, v_cache, num_heads: int) -> None:
        self._step += 1
        self._seen.add(bucket)
        if self.wants(bucket):
            self._samples[bucket] = Sample(copy_meta(meta), k_cache, v_cache, num_heads, self._step)

    def offer(self, op: str, name: str) -> list[str]:
        """A person offers a variant: it replaces the current one in every bucket of `op` seen so far,
        on probation. Returns the buckets it went into."""
        variant = self.registry.get(op, name)
        buckets = [b for b in self._known_buckets() if b.op == op]
        for bucket in buckets:
            self._swap(bucket, variant.name, "offered")
        return [b.key() for b in buckets]

    # ---- the slot between steps ----------------------------------------------------------------------

    def run_slot(self) -> None:
        """Do pieces of work (a probation measurement, a tuning candidate, a bucket's decision) until
        none is ready or the slot's budget is spent; the first ready piece always runs. A candidate
        whose kernels are still compiling in the background is passed over, never waited for."""
        start = self.clock()
        while self._work_once():
            if self.clock() - start >= self.config.slot_budget_ms / 1e3:
                return

    def close(self) -> None:
        """Stop the background compiler (waits for the compile in flight, at most one)."""
        if self._compile_pool is not None:
            self._compile_pool.shutdown(wait=True, cancel_futures=True)
            self._compile_pool = None
        self._compiling = None

    def _work_once(self) -> bool:
        """One piece of work; False when none is ready."""
        for bucket, probation in list(self._probation.items()):
            sample = self._samples.pop(bucket, None)
            if sample is not None:
                self._probe(bucket, probation, sample)
                return True
        if not self.online:
            return False
        for bucket, sample in list(self._samples.items()):
            if self.registry.is_tuned(bucket) and bucket not in self._tuning:
                del self._samples[bucket]
                continue
            if self._tune_one(bucket, sample):
                return True
        return False

    def _tune_one(self, bucket: ShapeBucket, sample: Sample) -> bool:
        """Evaluate the bucket's next candidate, or decide when none is left. False while the next
        candidate is not compiled yet."""
        tuning = self._tuning.get(bucket)
        if tuning is None:
            barred = self._barred.get(bucket, set())
            candidates = [
                v
                for v in self.registry.variants(bucket.op)
                if v.family in self.config.tunable_families and v.name not in barred and runs_on(v, sample)
            ]
            tuning = self._tuning[bucket] = _Tuning(candidates)
        if not tuning.candidates:
            del self._tuning[bucket]
            del self._samples[bucket]
            self._finish(bucket, tuning)
            return True
        variant = tuning.candidates[0]
        compile_error = None
        if self.compiler is not None and variant.warmup is not None:
            compiled = self._compiled(bucket, variant, sample)
            if compiled is None:
                return False
            compile_error = compiled.exception()
        tuning.candidates.pop(0)
        if compile_error is not None:
            tuning.rejected[variant.name] = f"compile failed: {compile_error}"
        else:
            self._evaluate(bucket, tuning, variant, sample)
        return True

    def _compiled(self, bucket: ShapeBucket, variant: KernelVariant, sample: Sample) -> Future | None:
        """The finished background compile of `variant` on this bucket's sample, or None while it is
        pending. One compile at a time: it is submitted once the worker has nothing else submitted."""
        if self._compiling is None:
            inputs = sample_inputs(sample)  # built here: the worker allocates and launches nothing
            args = run_args(inputs, torch.empty_like(inputs["q"]))
            if self._compile_pool is None:
                self._compile_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autotune-compile")
            self._compiling = (bucket, variant.name, self._compile_pool.submit(self.compiler, variant, args))
        pending_bucket, pending_name, future = self._compiling
        if (pending_bucket, pending_name) != (bucket, variant.name) or not future.done():
            return None
        self._compiling = None
        return future

    def _evaluate(self, bucket: ShapeBucket, tuning: _Tuning, variant: KernelVariant, sample: Sample) -> None:
        inputs = sample_inputs(sample)
        try:
            resources: dict[str, Any] = {}
            out = launch(variant, inputs, resources)
            why = self._occupancy_problem(resources)
            if why is None:
                why = self._error_problem(out, launch(self.reference[bucket.op], inputs))
            if why is not None:
                tuning.rejected[variant.name] = why
                return
            tuning.timings[variant.name] = self._time(variant, inputs)
        except Exception as error:  # a variant that cannot run this shape is simply not chosen
            tuning.rejected[variant.name] = f"failed: {error}"

    def _finish(self, bucket: ShapeBucket, tuning: _Tuning) -> None:
        if not tuning.timings:
            self._event("untuned", bucket, rejected=tuning.rejected)
            return
        best = min(tuning.timings, key=tuning.timings.get)
        current = self.registry.choose(bucket).name
        current_time = tuning.timings.get(current)
        self._event("tuned", bucket, best=best, timings=tuning.timings, rejected=tuning.rejected)
        if current_time is not None and tuning.timings[best] > current_time * (1 - self.config.min_gain):
            best = current  # not worth a swap; still record the choice so the bucket counts as tuned
        if self.cache is not None:
            self.cache.put(bucket, self.registry.get(bucket.op, best), tuning.timings.get(best))
        if best == current:
            self.registry.set_choice(bucket, best, "tuned")
        else:
            self._swap(bucket, best, "tuned")

    # ---- probation -----------------------------------------------------------------------------------

    def _swap(self, bucket: ShapeBucket, name: str, reason: str) -> None:
        old = self.registry.choose(bucket).name
        if self.registry.set_choice(bucket, name, reason) is not None:
            self._probation[bucket] = _Probation(old, name, reason)

    def _probe(self, bucket: ShapeBucket, probation: _Probation, sample: Sample) -> None:
        new = self.registry.get(bucket.op, probation.new)
        old = self.registry.get(bucket.op, probation.old)
        inputs = sample_inputs(sample)
        why = self._error_problem(launch(new, inputs), launch(self.reference[bucket.op], inputs))
        if why is None:
            times = self._time_pair(new, old, inputs)
            probation.ratios.append(times[0] / times[1])
            median = statistics.median(probation.ratios)
            # a bucket may see no more live steps: a gross regression does not wait for more samples
            enough = len(probation.ratios) >= min(2, self.config.probation_samples)
            if probation.ratios[-1] > self.config.hard_regression or (
                enough and median > 1 + self.config.max_regression
            ):
                why = f"{max(median, probation.ratios[-1]):.2f}x slower than {old.name}"
        if why is not None:
            self._rollback(bucket, probation, why)
        elif len(probation.ratios) >= self.config.probation_samples:
            del self._probation[bucket]
            self._event("kept", bucket, variant=new.name, ratios=probation.ratios)

    def _rollback(self, bucket: ShapeBucket, probation: _Probation, why: str) -> None:
        del self._probation[bucket]
        self._barred.setdefault(bucket, set()).add(probation.new)
        self.registry.set_choice(bucket, probation.old, f"rollback: {why}")
        if self.cache is not None:
            self.cache.put(bucket, self.registry.get(bucket.op, probation.old), None)
        self._event("rollback", bucket, variant=probation.new, back_to=probation.old, why=why)
        log.warning("kernel %s rolled back in %s: %s", probation.new, bucket.key(), why)

    # ---- measurements --------------------------------------------------------------------------------

    def _time(self, variant: KernelVariant, inputs: dict) -> float:
        return statistics.median(self._timed_runs(variant, inputs, self.config.repeats))

    def _time_pair(self, a: KernelVariant, b: KernelVariant, inputs: dict) -> tuple[float, float]:
        """Interleaved timings of two variants (so drift in clocks or load hits both alike)."""
        times_a, times_b = [], []
        for _ in range(self.config.repeats):
            times_a += self._timed_runs(a, inputs, 1)
            times_b += self._timed_runs(b, inputs, 1)
        return statistics.median(times_a), statistics.median(times_b)

    def _timed_runs(self, variant: KernelVariant, inputs: dict, repeats: int) -> list[float]:
        q = inputs["q"]
        if q.is_cuda:
            launch(variant, inputs)  # warm
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                launch(variant, inputs)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return times
        times = []
        for _ in range(repeats):
            begin = self.clock()
            launch(variant, inputs)
            times.append(self.clock() - begin)
        return times

    def _occupancy_problem(self, resources: dict[str, Any]) -> str | None:
        """Why a compiled launch is not worth timing, from its registers and shared memory per block."""
        if not resources or self.device_limits is None:
            return None
        limits = self.device_limits
        if resources.get("spills", 0) > 0:
            return f"spills {resources['spills']} registers"
        threads = 32 * resources["num_warps"]
        if resources["shared"] > limits["shared_per_block"]:
            limit = limits["shared_per_block"]
            return f"needs {resources['shared']} B of shared memory per block (limit {limit})"
        by_regs = limits["regs_per_sm"] // max(1, resources["regs"] * threads)
        by_shared = limits["shared_per_sm"] // max(1, resources["shared"]) if resources["shared"] else 1 << 30
        by_threads = limits["threads_per_sm"] // threads
        blocks = min(by_regs, by_shared, by_threads)
        if blocks < 1:
            return f"no block fits an SM ({resources['regs']} registers x {threads} threads)"
        return None

    def _error_problem(self, out: torch.Tensor, reference: torch.Tensor) -> str | None:
        error = (out.float() - reference.float()).abs().max().item()
        if not error <= self.config.atol:  # also catches NaN
            return f"error {error:.3g} > {self.config.atol}"
        return None

    # ---- bookkeeping ---------------------------------------------------------------------------------

    def _known_buckets(self) -> list[ShapeBucket]:
        seen = self._seen | set(self.registry.tuned_buckets())
        return sorted(seen, key=lambda b: b.key())

    def _event(self, kind: str, bucket: ShapeBucket, **details: Any) -> None:
        self.events.append({"time": time.time(), "event": kind, "bucket": bucket.key(), **details})
        self.events = self.events[-200:]

    def snapshot(self) -> dict[str, Any]:
        compiling = None if self._compiling is None else f"{self._compiling[0].key()} {self._compiling[1]}"
        return {
            "online": self.online,
            "compiling": compiling,
            "tuning": {b.key(): len(t.candidates) for b, t in self._tuning.items()},
            "probation": {b.key(): vars(p) for b, p in self._probation.items()},
            "barred": {b.key(): sorted(v) for b, v in self._barred.items()},
            "events": self.events[-50:],
        }


def _device_limits() -> dict[str, int] | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "regs_per_sm": getattr(props, "regs_per_multiprocessor", 65536),
        "shared_per_sm": getattr(props, "shared_memory_per_multiprocessor", 228 * 1024),
        "shared_per_block": getattr(props, "shared_memory_per_block_optin", 227 * 1024),
        "threads_per_sm": getattr(props, "max_threads_per_multi_processor", 2048),
    }
