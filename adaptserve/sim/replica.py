"""One engine replica in the simulator: the real LLMEngine (scheduler, KV bookkeeping, controllers) on
a SimulatedExecutor, with its own virtual clock, and what a client would see of its requests."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from adaptserve.adapt.control_plane import Controller
from adaptserve.adapt.knobs import check_knob
from adaptserve.adapt.step_cost import StepCostModel
from adaptserve.adapt.telemetry import Telemetry
from adaptserve.config import EngineConfig
from adaptserve.engine.engine import LLMEngine
from adaptserve.engine.request import InvalidRequestError, SamplingParams
from adaptserve.model.config import ModelArchConfig
from adaptserve.sim.clock import VirtualClock
from adaptserve.sim.executor import SimulatedExecutor
from adaptserve.sim.router import Load
from adaptserve.sim.tracking import RequestTrack

DEFAULT_CONTEXT_PER_SEQ = 4096  # without a KV size in the config: room for max_num_seqs of these


def num_blocks_for(config: EngineConfig, arch: ModelArchConfig) -> int:
    """KV blocks of a simulated replica: `cache.num_blocks` if set, else `cache.kv_cache_memory_gib` of
    bf16 KV, else enough for `max_num_seqs` sequences of min(context, 4096) tokens."""
    cache = config.cache
    if cache.num_blocks is not None:
        return cache.num_blocks
    if cache.kv_cache_memory_gib is not None:
        return int(cache.kv_cache_memory_gib * 2**30 // (arch.kv_bytes_per_token(2) * cache.block_size))
    context = config.model.max_model_len or arch.max_context
    per_seq = min(context, DEFAULT_CONTEXT_PER_SEQ)
    tokens = max(context, config.scheduler.max_num_seqs * per_seq)
    return math.ceil(tokens / cache.block_size)


@dataclass(slots=True)
class Sample:
    """One point of a replica's time series (for plots)."""

    time: float
    knobs: dict[str, float]  # Knobs.as_gauges()
    num_running: int
    num_waiting: int
    kv_usage: float
    arrival_rate: float  # requests routed here per second over the last sample interval


class Replica:
    """An LLMEngine with `async_scheduling` off on a SimulatedExecutor. `step(t)` runs one engine step
    starting at `t` (or when its previous step ended, if later); the clock then reads the step's end."""

    def __init__(
        self,
        index: int,
        engine_config: EngineConfig,
        arch: ModelArchConfig,
        cost_model: StepCostModel,
        noise: float = 0.0,
        seed: int = 0,
    ):
        self.index = index
        self.clock = VirtualClock()
        self.executor = SimulatedExecutor(
            cost_model,
            arch,
            num_blocks_for(engine_config, arch),
            self.clock,
            precision=engine_config.precision.precision_policy,
            noise=noise,
            seed=seed + index,
        )
        self.engine = LLMEngine(engine_config, runner=self.executor, clock=self.clock)
        # the engine's setter refuses knobs a model runner cannot switch yet; the simulated executor can
        # switch precision and KV format, so this replica's setter goes first (controllers use it too)
        self._engine_apply = self.engine.apply_knob
        self.engine.apply_knob = self.apply_knob
        self.tracks: dict[str, RequestTrack] = {}  # unfinished requests, by request id
        self.finished: list[RequestTrack] = []
        self._just_finished: list[RequestTrack] = []  # in the last step: their finish may lie ahead
        self._arrival_times: list[float] = []

    # ---- requests ------------------------------------------------------------------------------------

    def add(self, track: RequestTrack, prompt_ids: list[int]) -> bool:
        """Queue a request that arrives at `track.arrival_time`; False (and the track failed) when the
        engine refuses it, e.g. a prompt longer than the context."""
        self._arrival_times.append(track.arrival_time)
        params = SamplingParams(max_tokens=track.output_len, ignore_eos=True)
        request_id = str(track.index)
        try:
            self.engine.add_request(
                request_id, prompt_ids, params, arrival_time=track.arrival_time, stream=True
            )
        except InvalidRequestError as error:
            track.fail(str(error))
            self.finished.append(track)
            return False
        self.tracks[request_id] = track
        return True

    @property
    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self, t: float) -> bool:
        """One engine step from `t`; True when it computed tokens (False: nothing could be scheduled)."""
        self.clock.advance_to(max(t, self.clock()))
        num_steps = self.executor.num_steps
        outputs = self.engine.step()
        now = self.clock()
        self._just_finished = []
        for output in outputs:
            track = self.tracks[output.request_id]
            track.on_output(output, now)
            if track.finish_time is not None:
                del self.tracks[output.request_id]
                self.finished.append(track)
                self._just_finished.append(track)
        return self.executor.num_steps > num_steps

    # ---- what routers and plots read -----------------------------------------------------------------

    def load(self, t: float) -> Load:
        """Load as of time `t`, which may fall inside the last step: what it finished or produced after
        `t` does not count as done yet."""
        open_tracks = [*self.tracks.values(), *(r for r in self._just_finished if r.finish_time > t)]
        outstanding = 0
        for track in open_tracks:
            num_chunks = track.chunks_by(t)
            outstanding += (0 if num_chunks else track.prompt_len) + max(0, track.output_len - num_chunks)
        return Load(len(open_tracks), outstanding)

    def sample(self, t: float, interval_s: float) -> Sample:
        arrivals = bisect.bisect_right(self._arrival_times, t) - bisect.bisect_right(
            self._arrival_times, t - interval_s
        )
        scheduler = self.engine.scheduler
        return Sample(
            t,
            self.engine.knobs.as_gauges(),
            len(scheduler.running),
            len(scheduler.waiting),
            self.engine.kv_cache.usage,
            arrivals / interval_s,
        )

    @property
    def num_steps(self) -> int:
        return self.executor.num_steps

    # ---- knobs and control ---------------------------------------------------------------------------

    def enable_control(self, controllers: Sequence[Controller], interval_s: float = 0.25) -> None:
        telemetry = Telemetry(scheduler=self.engine.scheduler)
        self.engine.enable_control(list(controllers), telemetry, interval_s)

    def apply_knob(self, name: str, value: object) -> None:
        """Put a knob in force: precision and KV format on the executor (they scale the step time), the
        rest through the engine."""
        if name in ("precision_policy", "kv_format"):
            check_knob(name, value)
            if name == "precision_policy":
                self.executor.precision.policy = value
            else:
                self.executor.kv_format = value
            setattr(self.engine.knobs, name, value)
        else:
            self._engine_apply(name, value)

    def set_knob(self, name: str, value: object, reason: str) -> None:
        """Set a knob now: through the control plane if there is one (logged as a switch), else directly."""
        if self.engine.control is not None:
            self.engine.control.set(name, value, "sim", reason, self.clock())
        else:
            self.apply_knob(name, value)
