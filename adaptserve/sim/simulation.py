"""The discrete-event simulator: N engine replicas behind a router, driven by a workload's arrivals.

Events sit in one heap ordered by (time, kind, sequence): an arrival is routed at its time and queued
on its replica's engine; a replica with work steps its real engine (its clock moves by the predicted
step time) and is ready again when the step ends; an idle replica wakes at its next arrival. At equal
times arrivals come first, so a step that starts at t sees every request that arrived by t, as the
real engine loop does. Nothing depends on wall time or unordered containers: fixed inputs give the
same run."""

from __future__ import annotations

import copy
import heapq
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from adaptserve.adapt.control_plane import Controller
from adaptserve.adapt.step_cost import StepCostModel
from adaptserve.bench.metrics import PERCENTILE_METRICS, RequestOutcome, calculate_metrics
from adaptserve.bench.workloads import BenchRequest, random_ids
from adaptserve.config import EngineConfig
from adaptserve.engine.engine import LLMEngine
from adaptserve.model.config import ModelArchConfig
from adaptserve.sim.replica import Replica, Sample
from adaptserve.sim.router import Router, make_router
from adaptserve.sim.tracking import RequestTrack

ARRIVAL, SAMPLE, READY = 0, 1, 2  # event kinds, in their order at equal times

ControllerFactory = Callable[[int, LLMEngine], list[Controller]]


@dataclass(slots=True)
class SimOutcome:
    """One request's end: what a client measured, and when (simulated seconds) it finished."""

    index: int  # position in the workload
    replica: int  # -1: never routed
    finish_time: float
    outcome: RequestOutcome


@dataclass
class SimResult:
    metrics: dict[str, Any]  # bench.metrics.calculate_metrics, the keys `bench serve` reports
    time_series: list[list[Sample]]  # per replica, one sample per sample interval
    num_steps: list[int]  # engine steps that computed tokens, per replica
    duration: float  # simulated seconds from the start to the last completion
    wall_time: float  # seconds the simulation took to run

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "time_series": [[asdict(s) for s in samples] for samples in self.time_series],
            "num_steps": self.num_steps,
            "duration": self.duration,
            "wall_time": self.wall_time,
        }


class Simulation:
    """Runs `requests`, arriving at `arrival_times` (seconds from 0), on `num_replicas` engines whose
    steps take what `cost_model` predicts. `controllers(replica_index, engine)` gives each replica's
    controllers (None: no control plane). Text prompts become `prompt_len` random token ids."""

    def __init__(
        self,
        requests: Sequence[BenchRequest],
        arrival_times: Sequence[float],
        cost_model: StepCostModel,
        engine_config: EngineConfig,
        arch: ModelArchConfig,
        num_replicas: int = 1,
        router: str | Router = "least_loaded",
        controllers: ControllerFactory | None = None,
        control_interval_s: float = 0.25,
        sample_interval_s: float = 1.0,
        noise: float = 0.0,
        seed: int = 0,
    ):
        if len(requests) != len(arrival_times):
            raise ValueError(f"got {len(arrival_times)} arrival times for {len(requests)} requests")
        if not all(math.isfinite(t) and t >= 0 for t in arrival_times):
            raise ValueError("arrival times must be finite and >= 0")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not sample_interval_s > 0:
            raise ValueError(f"sample_interval_s must be > 0, got {sample_interval_s}")
        self.requests = list(requests)
        self.arrival_times = [float(t) for t in arrival_times]
        self.sample_interval_s = sample_interval_s
        self.replicas = [
            Replica(i, _sim_config(engine_config), arch, cost_model, noise, seed) for i in range(num_replicas)
        ]
        if controllers is not None:
            for replica in self.replicas:
                replica.enable_control(controllers(replica.index, replica.engine), control_interval_s)
        self.router = make_router(router) if isinstance(router, str) else router
        rng = np.random.default_rng(seed)
        self._prompts = [
            r.prompt if not isinstance(r.prompt, str) else random_ids(rng, r.prompt_len, arch.vocab_size)
            for r in self.requests
        ]
        self._time_series: list[list[Sample]] = [[] for _ in self.replicas]
        self._ready_pending = [False] * num_replicas  # a READY event of that replica is in the heap
        self._events: list[tuple[float, int, int, int]] = []  # (time, kind, sequence, request/replica)
        self._sequence = itertools.count()
        self._num_pending = 0  # ARRIVAL and READY events in the heap
        self._num_arrived = 0
        self._now = 0.0
        self._wall_time = 0.0
        for index, t in enumerate(self.arrival_times):
            self._push(t, ARRIVAL, index)
        self._push(0.0, SAMPLE, 0)

    # ---- running -------------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """Simulated seconds: the time of the last event handled (or the last `run_until` bound)."""
        return self._now

    @property
    def done(self) -> bool:
        """Every request has arrived and every replica has finished its work."""
        return self._num_arrived == len(self.requests) and not any(r.has_work for r in self.replicas)

    def run_until(self, t: float) -> None:
        """Handle every event up to and including time `t`."""
        wall_start = time.perf_counter()
        while self._events and self._events[0][0] <= t:
            self._handle(*heapq.heappop(self._events))
        if math.isfinite(t):
            self._now = max(self._now, t)
        self._wall_time += time.perf_counter() - wall_start

    def run(
        self,
        goodput_slos_ms: dict[str, float] | None = None,
        percentile_metrics: tuple[str, ...] = PERCENTILE_METRICS,
        percentiles: tuple[float, ...] = (50.0, 90.0, 99.0),
    ) -> SimResult:
        """Run to the end and summarize as `bench serve` does."""
        self.run_until(math.inf)
        if not self.done:
            stuck = sum(len(r.tracks) for r in self.replicas)
            raise RuntimeError(f"the simulation stopped with {stuck} request(s) that no replica can schedule")
        return self.result(goodput_slos_ms, percentile_metrics, percentiles)

    def result(
        self,
        goodput_slos_ms: dict[str, float] | None = None,
        percentile_metrics: tuple[str, ...] = PERCENTILE_METRICS,
        percentiles: tuple[float, ...] = (50.0, 90.0, 99.0),
    ) -> SimResult:
        """The metrics of the requests that have ended so far."""
        outcomes = self.outcomes
        # bench serve: from the start to the last completion (before any: to now)
        duration = max((o.finish_time for o in outcomes), default=self._now) or 1e-9
        metrics = calculate_metrics(
            [o.outcome for o in outcomes], duration, percentile_metrics, percentiles, goodput_slos_ms
        )
        return SimResult(
            metrics,
            [list(samples) for samples in self._time_series],
            [r.num_steps for r in self.replicas],
            duration,
            self._wall_time,
        )

    # ---- knobs and results ---------------------------------------------------------------------------

    def set_knob(self, name: str, value: Any, reason: str = "set by the simulation") -> None:
        """Set a knob on every replica (through its control plane when it has one)."""
        for replica in self.replicas:
            replica.set_knob(name, value, reason)

    @property
    def outcomes(self) -> list[SimOutcome]:
        """Every request that has ended (finished or failed), in workload order."""
        ended = [
            SimOutcome(track.index, replica.index, track.finish_time, track.outcome())
            for replica in self.replicas
            for track in replica.finished
        ]
        return sorted(ended, key=lambda o: o.index)

    def outcomes_between(self, t0: float, t1: float) -> list[SimOutcome]:
        """The requests that ended in [t0, t1)."""
        return [o for o in self.outcomes if t0 <= o.finish_time < t1]

    # ---- events --------------------------------------------------------------------------------------

    def _push(self, t: float, kind: int, key: int) -> None:
        heapq.heappush(self._events, (t, kind, next(self._sequence), key))
        self._num_pending += kind != SAMPLE

    def _handle(self, t: float, kind: int, _: int, key: int) -> None:
        self._now = t
        self._num_pending -= kind != SAMPLE
        if kind == ARRIVAL:
            self._arrive(key, t)
        elif kind == READY:
            self._step(key, t)
        else:
            for replica, samples in zip(self.replicas, self._time_series, strict=True):
                samples.append(replica.sample(t, self.sample_interval_s))
            if self._num_pending:  # sampling goes on while something can still happen
                self._push(t + self.sample_interval_s, SAMPLE, 0)

    def _arrive(self, index: int, t: float) -> None:
        self._num_arrived += 1
        request, prompt = self.requests[index], self._prompts[index]
        track = RequestTrack(index, len(prompt), request.output_len, t)
        choice = self.router.choose([r.load(t) for r in self.replicas])
        replica = self.replicas[choice]
        if replica.add(track, prompt) and not self._ready_pending[choice]:
            self._ready_pending[choice] = True
            self._push(max(t, replica.clock()), READY, choice)

    def _step(self, index: int, t: float) -> None:
        replica = self.replicas[index]
        self._ready_pending[index] = False
        if not replica.has_work:
            return
        # a step that computed nothing (every waiting request held back) waits for the next arrival
        if replica.step(t) and replica.has_work:
            self._ready_pending[index] = True
            self._push(replica.clock(), READY, index)


def _sim_config(config: EngineConfig) -> EngineConfig:
    """A replica's own copy (knobs change its scheduler settings), scheduling synchronously: the
    simulated executor computes nothing, so there is nothing to overlap."""
    config = copy.deepcopy(config)
    config.scheduler.async_scheduling = False
    return config
