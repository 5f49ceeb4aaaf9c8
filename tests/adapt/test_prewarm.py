"""PrewarmController on synthetic snapshots and a bookkeeping graph pool: a rising load gets its graphs
before it reaches them, idle graphs go after release_after_s (the floor stays), a load around a bucket
boundary does not thrash, and the budget, memory and guard limits hold."""

import collections
import dataclasses

import pytest

from adaptserve.adapt.knobs import Knobs
from adaptserve.adapt.prewarm import PrewarmConfig, PrewarmController, RunnerGraphPool, SimulatedGraphPool
from adaptserve.adapt.snapshot import TelemetrySnapshot
from adaptserve.adapt.switch_guard import SwitchGuard

BUCKETS = [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]  # a pool's sizes (a subset of batch_buckets(64))
ROUND_S = 1.0  # the control plane asks every 0.25 s; one round a second keeps the tests short


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def snapshot(t, batch, gpu_memory_used=None):
    """A window whose decode steps ran `batch` sequences (0: idle)."""
    histogram = {int(batch): 10} if batch >= 1 else {}
    return TelemetrySnapshot(
        time=t,
        window_s=10.0,
        knobs=Knobs(),
        num_running=int(batch),
        mean_decode_batch=float(batch),
        decode_batch_histogram=histogram,
        gpu_memory_used=gpu_memory_used,
    )


def build(captured=(1, 2, 4, 8), **config):
    clock = Clock()
    pool = SimulatedGraphPool(BUCKETS, captured, clock)
    return PrewarmController(pool, PrewarmConfig(**config)), pool, clock


def drive(controller, clock, load, start, end, **snapshot_options):
    """Run one round per ROUND_S over [start, end) with `load(t)` decode sequences; returns when each
    bucket was first and last in use: ({size: time}, {size: time})."""
    first_seen, last_seen = {}, {}
    t = start
    while t < end:
        clock.now = t
        batch = int(load(t))
        size = controller.bucket(batch)
        if size is not None:
            first_seen.setdefault(size, t)
            last_seen[size] = t
        assert controller.decide(snapshot(t, batch, **snapshot_options)) is None  # it owns no knob
        t += ROUND_S
    return first_seen, last_seen


def first_capture(pool, size):
    return next((t for t, kind, s in pool.events if kind == "capture" and s == size), None)


def test_rising_load_captures_larger_sizes_before_they_are_seen():
    controller, pool, clock = build()

    # 4 sequences for ten minutes, then a ramp to 60 over twenty minutes
    def load(t):
        return 4 if t < 600 else min(60, 4 + (t - 600) * 56 / 1200)

    first_seen, last_seen = drive(controller, clock, load, 0.0, 2400.0)
    for size in (16, 24, 32, 40, 48, 56, 64):
        captured_at = first_capture(pool, size)
        assert captured_at is not None, f"size {size} never captured"
        assert captured_at < first_seen[size], f"size {size}: captured {captured_at}, seen {first_seen[size]}"
    for t, kind, size in pool.events:  # sizes the ramp left behind go, once idle for release_after_s
        assert kind == "capture" or t >= last_seen[size] + 600.0, (t, size, last_seen[size])
    assert pool.captured_sizes()[-1] == 64


def test_steady_small_load_captures_nothing_beyond_the_floor():
    controller, pool, clock = build()
    drive(controller, clock, lambda t: 3, 0.0, 1800.0)
    assert pool.captured_sizes() == [1, 2, 4, 8]
    assert pool.events == []


def test_idle_sizes_released_after_release_after_s_but_not_the_floor():
    controller, pool, clock = build(captured=BUCKETS)  # the warm-up captured every bucket
    drive(controller, clock, lambda t: 40, 0.0, 1200.0)  # 40 in use, 48 within the headroom
    released = {s: t for t, kind, s in pool.events if kind == "release"}
    assert set(released) == {16, 24, 32, 56, 64}
    assert all(t >= 600.0 for t in released.values()), released
    assert pool.captured_sizes() == [1, 2, 4, 8, 40, 48]
    idle_from = 1200.0
    drive(controller, clock, lambda t: 0, idle_from, idle_from + 3600.0)
    released = {s: t for t, kind, s in pool.events if kind == "release"}
    assert pool.captured_sizes() == [1, 2, 4, 8]  # the floor stays
    assert released[40] >= idle_from + 600.0 and released[48] >= idle_from + 600.0
    assert pool.count("capture") == 0


def test_size_in_use_in_the_window_is_never_released():
    guard = SwitchGuard(cooldown_s=0.0, confirm=1, max_switches=100, window_s=60.0)
    controller, pool, clock = build(captured=BUCKETS, release_after_s=0.0, headroom=0.0)
    controller.release_guard = guard
    drive(controller, clock, lambda t: 20, 0.0, 600.0)
    assert 24 in pool.captured_sizes()  # used every round: kept although release_after_s is 0
    assert {s for _, kind, s in pool.events if kind == "release"} == {16, 32, 40, 48, 56, 64}


def test_load_around_a_bucket_boundary_does_not_thrash():
    controller, pool, clock = build()
    # 14 and 18 sequences (buckets 16 and 24) in turn, a minute each, for two hours
    drive(controller, clock, lambda t: 14 if int(t // 60) % 2 == 0 else 18, 0.0, 7200.0)
    assert pool.count("capture", 16) == 1
    assert pool.count("capture", 24) == 1
    assert pool.count("release") == 0
    # and with the long way round: busy for a minute in every nine, below release_after_s
    controller, pool, clock = build()
    drive(controller, clock, lambda t: 30 if t % 540 < 60 else 2, 0.0, 7200.0)
    assert pool.count("release") == 0
    assert max(pool.count("capture", s) for s in BUCKETS) == 1


class FlippingForecaster:
    """A forecast that jumps between a small and a large batch every round."""

    def __init__(self):
        self.rounds = 0

    def observe(self, snapshot):
        self.rounds += 1
        return True

    def batch_change(self, t0, horizon_s):
        return (0.0, 60.0) if self.rounds % 2 else (0.0, 0.0)


def test_flipping_forecast_is_held_back_by_the_guard():
    clock = Clock()
    pool = SimulatedGraphPool(BUCKETS, (1, 2, 4, 8), clock)
    controller = PrewarmController(pool, PrewarmConfig(release_after_s=0.0), FlippingForecaster())
    drive(controller, clock, lambda t: 0, 0.0, 600.0)
    assert pool.events == []  # the proposal never holds two rounds in a row
    assert controller.capture_guard.num_blocked > 0


class SlowFlippingForecaster(FlippingForecaster):
    """Jumps between a small and a large batch every 20 rounds: each proposal holds long enough."""

    def batch_change(self, t0, horizon_s):
        return (0.0, 60.0) if (self.rounds // 20) % 2 else (0.0, 0.0)


def test_guard_caps_captures_and_releases_per_window():
    clock = Clock()
    pool = SimulatedGraphPool(BUCKETS, (1, 2, 4, 8), clock)
    config = PrewarmConfig(release_after_s=0.0, max_captures_per_round=7)
    controller = PrewarmController(pool, config, SlowFlippingForecaster())
    drive(controller, clock, lambda t: 0, 0.0, 1800.0)
    for kind, cap, window_s in (("capture", 6, 60.0), ("release", 2, 600.0)):
        times = sorted({t for t, k, _ in pool.events if k == kind})
        assert times, kind
        assert all(sum(1 for u in times if t <= u < t + window_s) <= cap for t in times), (kind, times)
    assert pool.count("capture") > 7  # it did act, more than once


def test_capture_budget_per_round():
    controller, pool, clock = build(max_captures_per_round=2)
    controller.capture_guard = SwitchGuard(cooldown_s=0.0, confirm=1, max_switches=100, window_s=60.0)
    clock.now = 0.0
    controller.step(snapshot(0.0, 2))
    for t in range(1, 10):  # a burst: the window's decode steps ran from 2 to 64 sequences
        clock.now = float(t)
        burst = snapshot(float(t), 64)
        controller.step(dataclasses.replace(burst, decode_batch_histogram={2: 1, 30: 4, 64: 5}))
    rounds = collections.Counter(t for t, _, _ in pool.events)
    assert max(rounds.values()) == 2
    assert pool.captured_sizes() == BUCKETS  # all of them, two per round
    assert all(len(plan.capture) <= 2 for plan in controller.history)


def test_no_capture_above_the_memory_limit():
    controller, pool, clock = build()
    drive(controller, clock, lambda t: 30, 0.0, 120.0, gpu_memory_used=0.97)
    assert pool.count("capture") == 0
    drive(controller, clock, lambda t: 30, 120.0, 240.0, gpu_memory_used=0.5)
    assert 32 in pool.captured_sizes()


def test_failed_capture_stops_prewarming():
    class FailingPool(SimulatedGraphPool):
        def capture(self, sizes):
            raise RuntimeError("CUDA out of memory")

    clock = Clock()
    controller = PrewarmController(FailingPool(BUCKETS, (1, 2, 4, 8), clock))
    drive(controller, clock, lambda t: 30, 0.0, 60.0)
    assert controller.stopped is not None and "out of memory" in controller.stopped
    assert controller.num_captured == 0


def test_runner_adapter_passes_precision_and_context():
    class FakeDecodeGraphPool:
        sizes = BUCKETS

        def __init__(self):
            self.calls = []

        def captured_sizes(self):
            return [1]

        def capture(self, sizes, precision, context_len):
            self.calls.append(("capture", tuple(sizes), precision, context_len))

        def release(self, sizes):
            self.calls.append(("release", tuple(sizes)))

    graphs = FakeDecodeGraphPool()
    adapter = RunnerGraphPool(graphs, lambda: "fp8", context_len=512)
    adapter.capture([16])
    adapter.release([16])
    assert adapter.sizes == BUCKETS and adapter.captured_sizes() == [1]
    assert graphs.calls == [("capture", (16,), "fp8", 512), ("release", (16,))]
    assert RunnerGraphPool.from_runner(object()) is None  # a runner without graphs (CPU)


def test_config_is_checked():
    with pytest.raises(ValueError, match="max_captures_per_round"):
        PrewarmConfig(max_captures_per_round=0)
