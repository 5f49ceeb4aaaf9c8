"""LLMEngine: add requests, then step() until they finish. One step = schedule → execute → update."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from adaptserve.adapt.control_plane import Controller, ControlPlane
from adaptserve.adapt.factory import enable_configured_control
from adaptserve.adapt.knobs import Knobs, check_knob
from adaptserve.adapt.telemetry import Telemetry
from adaptserve.config import EngineConfig
from adaptserve.engine.detokenizer import IncrementalDetokenizer
from adaptserve.engine.kv_cache import KVCacheManager
from adaptserve.engine.kv_cache.chunk_pool import ChunkedBlockPool
from adaptserve.engine.kv_cache.compression import attach_kv_changes, build_block_pool, requantize_cold_blocks
from adaptserve.engine.output_processor import ParentRequest, finalize_text, find_stop_string
from adaptserve.engine.outputs import Executor, SchedulerOutput
from adaptserve.engine.prompt_ids import encode_prompt
from adaptserve.engine.request import (
    InvalidRequestError,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
)
from adaptserve.engine.scheduler import Scheduler
from adaptserve.engine.stats import StatLogger, StepStats, stamp_token_time, step_stats_of
from adaptserve.model.config import ModelArchConfig
from adaptserve.model.loaders import LoadedCheckpoint, load_checkpoint
from adaptserve.runner.cuda_graphs import graph_captures
from adaptserve.runner.launched_step import LaunchedStep
from adaptserve.runner.model_runner import ModelRunner
from adaptserve.spec.speculator import Speculator


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        checkpoint: LoadedCheckpoint | None = None,
        progress: bool = True,
        *,
        runner: Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`runner`: an executor to use instead of building a ModelRunner from the checkpoint (the
        simulator's); `clock`: the engine's time source (the simulator's virtual clock)."""
        self.config = config
        self.clock = clock
        if runner is None:
            checkpoint = checkpoint or load_checkpoint(config.model.model, progress=progress)
        arch = checkpoint.arch if checkpoint is not None else runner.arch
        self.arch = arch
        self.tokenizer = checkpoint.tokenizer if checkpoint is not None else None
        self.max_model_len = _max_model_len(config, arch)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids if self.tokenizer else arch.eos_token_ids)
        if runner is None:
            runner = ModelRunner(config, checkpoint, self.max_model_len, self.eos_token_ids)
        self.runner = runner
        self.runner.warm_up()
        pool = build_block_pool(config.cache, self.runner)
        capacity = pool.num_free_blocks * config.cache.block_size
        if capacity < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({pool.num_free_blocks} blocks), fewer than "
                f"max_model_len={self.max_model_len}; lower model.max_model_len or raise the KV budget"
            )
        self.kv_cache = KVCacheManager(
            pool.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching, block_pool=pool
        )
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        self._parents: dict[str, ParentRequest] = {}
        self._child_to_parent: dict[str, str] = {}
        self.source = checkpoint.source if checkpoint is not None else getattr(runner, "source", "simulated")
        self.stat_loggers: list[StatLogger] = []  # each gets every step's StepStats
        self._prefix_cache_counts = (0, 0)  # (queries, hits) at the last stats
        async_scheduling = config.scheduler.async_scheduling
        on_cuda = self.runner.device.type == "cuda"  # a CPU computes as it is called: nothing to overlap
        self.async_scheduling = on_cuda if async_scheduling is None else async_scheduling
        self._in_flight: _InFlight | None = None  # the launched step whose tokens are not read yet
        self._last_finish = float("-inf")  # clock when the last step's tokens were read
        self._arrivals: list[tuple[float, int]] = []  # (arrival time, prompt tokens) since the last stats
        self.knobs = Knobs.from_config(config)
        self.speculator: Speculator | None = None  # drafts and verifies when speculative.method is set
        if config.speculative.spec_method != "off":
            graphs = getattr(self.runner, "graphs", None)  # verify steps past its rows run eagerly
            max_rows = graphs.max_batch if graphs is not None else None
            self.speculator = Speculator(config.speculative, arch.num_layers, max_rows=max_rows)
            self.knobs.spec_mode = config.speculative.spec_method
        self.knob_ceilings = (config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens)
        self.control: ControlPlane | None = None  # set by enable_control(); asked between steps
        # the controllers the config names; an executor that models its own cost (the simulator) seeds theirs
        enable_configured_control(self, prior=getattr(runner, "cost_model", None))

    # ---- run-time knobs ------------------------------------------------------------------------------

    def enable_control(
        self, controllers: list[Controller], telemetry: Telemetry | None = None, interval_s: float = 0.25
    ) -> ControlPlane:
        """Let `controllers` change knobs between steps, from a Telemetry fed by every step's stats."""
        if telemetry is None:
            telemetry = Telemetry(scheduler=self.scheduler)
        if telemetry not in self.stat_loggers:
            self.stat_loggers.append(telemetry)
        self.control = ControlPlane(self.knobs, controllers, telemetry, self.apply_knob, interval_s)
        return self.control

    def apply_knob(self, name: str, value: object) -> None:
        """Put one knob's new value into force; the next schedule() uses it. The configured
        max_num_seqs and max_num_batched_tokens are ceilings: memory and CUDA graphs were sized for them."""
        check_knob(name, value)
        s = self.scheduler.config
        max_seqs, max_tokens = self.knob_ceilings
        if name == "max_num_seqs":
            if value > max_seqs:
                raise ValueError(f"knob max_num_seqs={value} exceeds the configured ceiling {max_seqs}")
            s.max_num_seqs = value
        elif name == "max_num_batched_tokens":
            if value > max_tokens:
                raise ValueError(
                    f"knob max_num_batched_tokens={value} exceeds the configured ceiling {max_tokens}"
                )
            s.max_num_batched_tokens = value
        elif name == "prefill_chunk":
            s.long_prefill_token_threshold = value
        elif name == "batch_wait_s":
            s.batch_wait_s = float(value)
        elif name == "kv_format" and isinstance(self.kv_cache.block_pool, ChunkedBlockPool):
            self.kv_cache.block_pool.write_format = value
        elif getattr(self.knobs, name) != value:
            raise ValueError(f"knob {name} cannot change at run time in this build")
        setattr(self.knobs, name, value)

    # ---- requests ------------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
        stream: bool = False,
    ) -> None:
        """Validate and queue; raises InvalidRequestError naming the field and the limit.
        `stream`: step() returns a delta output for this request whenever it has new tokens."""
        if request_id in self._parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        prompt_ids = self.encode_prompt(prompt)
        params.validate()
        arrival_time = self.clock() if arrival_time is None else arrival_time
        child_ids = [request_id] if params.n == 1 else [f"{request_id}-{i}" for i in range(params.n)]
        parent = ParentRequest(
            request_id, prompt if isinstance(prompt, str) else None, child_ids, stream=stream
        )
        for index, child_id in enumerate(child_ids):
            if self.tokenizer is not None and (stream or params.stop):
                parent.detokenizers[child_id] = IncrementalDetokenizer(self.tokenizer)
            child_params = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + index
                child_params = dataclasses.replace(params, n=1, seed=seed)
            request = Request(
                child_id,
                prompt_ids,
                child_params,
                self.eos_token_ids,
                arrival_time,
                priority,
                self.max_model_len,
            )
            parent.children[child_id] = request
            self._child_to_parent[child_id] = request_id
            self.scheduler.add_request(request)
        self._parents[request_id] = parent
        self._arrivals.append((arrival_time, len(prompt_ids)))

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt, checked against the vocabulary and the context window."""
        return encode_prompt(prompt, self.tokenizer, self.arch.vocab_size, self.max_model_len)

    def abort_request(self, request_id: str) -> None:
        parent = self._parents.get(request_id)
        if parent is None:
            return
        for child_id in parent.child_ids:
            self.scheduler.finish_request(child_id, RequestStatus.FINISHED_ABORTED)
        self._release(parent)
        if self.stat_loggers:
            now = self.clock()
            stats = self._step_stats(now, now, now, SchedulerOutput([], 0), 0)
            stats.finished.append(parent.finished_stats(now))
            self._record(stats)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    # ---- one step ------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; return the outputs of user requests that finished in it, and for streamed
        requests a delta output whenever they have something new.

        With async scheduling the step is launched on the device, then the previous step's tokens
        are read and processed while it runs: outputs come one step later, the device never waits
        for the host's bookkeeping."""
        start = self.clock()
        outputs = self._propose_drafts(start) if self.speculator is not None else []
        # before the schedule: steps see the moves
        migrations = requantize_cold_blocks(self.kv_cache, self.config.cache, self.scheduler.requests)
        scheduler_output = self.scheduler.schedule(start)
        attach_kv_changes(scheduler_output, self.kv_cache, migrations)
        if self.speculator is not None:
            self.speculator.label(scheduler_output)
        for seq in scheduler_output.sequences:
            request = self.scheduler.requests[seq.request_id]
            if request.first_scheduled_time is None:
                request.first_scheduled_time = start
        try:
            outputs += self._launch_and_finish(scheduler_output, start)
        except BaseException:
            self._in_flight = None  # its requests are aborted by the caller (LLM, AsyncEngine)
            raise
        if self.control is not None:
            self.control.after_step(self.clock())  # decisions apply from the next schedule()
        return outputs

    def _propose_drafts(self, now: float) -> list[RequestOutput]:
        """Drafts for the coming step. They extend each request's latest tokens, so a step still on
        the device is read first (its outputs are returned)."""
        outputs: list[RequestOutput] = []
        budget = self.speculator.choose(now, self.scheduler.running)
        self.knobs.draft_len = budget
        if budget == 0:
            return outputs
        outputs += self._drain()
        self.speculator.propose(self.scheduler.running)
        return outputs

    def _drain(self) -> list[RequestOutput]:
        """Read the step still on the device now (the next one needs every earlier token on the host)."""
        step, self._in_flight = self._in_flight, None
        return [] if step is None else self._finish(step)

    def _launch_and_finish(self, scheduler_output: SchedulerOutput, start: float) -> list[RequestOutput]:
        # penalties read every earlier token on the host
        outputs = self._drain() if _needs_token_history(scheduler_output) else []
        # memory pressure for the precision policy: the share of KV blocks in use after scheduling
        self.runner.precision.memory_pressure = self.kv_cache.usage
        launch_time = self.clock()  # a CPU computes inside launch(): its time counts as the step's
        captures = graph_captures(self.runner)
        launched = self.runner.launch(scheduler_output)
        step = _InFlight(
            scheduler_output, self.scheduler.advance(scheduler_output), launched, start, launch_time
        )
        previous, self._in_flight = self._in_flight, step
        # a CUDA graph captured on demand costs this launch (and the cycle of the step read after it)
        # tens of milliseconds once: the speculation policy must not take it for a step's cost
        step.captured = graph_captures(self.runner) != captures
        if previous is not None:
            previous.captured |= step.captured
            outputs += self._finish(previous)
        if not self.async_scheduling or scheduler_output.num_draft_tokens:  # verified: tokens are known
            self._in_flight = None
            outputs += self._finish(step)
        return outputs

    def _finish(self, step: _InFlight) -> list[RequestOutput]:
        """Read a launched step's tokens, append them, and build the outputs they complete."""
        runner_output = step.launched.result()
        num_before = {id(r): r.num_output_tokens for r in step.sampled.values()}
        updated = self.scheduler.resolve(step.sampled, runner_output)
        now = self.clock()
        # the device ran this step from its launch or the previous step's end, whichever was later
        execute_start = max(step.launch_time, self._last_finish)
        # the whole cycle this step cost, host work included (drafting, scheduling, verifying): a
        # verify step is finished at once while a plain one overlaps the next step's host work, so
        # device time alone would make speculation look cheaper than it is
        cycle_start = max(step.start, self._last_finish)
        self._last_finish = now
        num_generated = sum(r.num_output_tokens - num_before[id(r)] for r in updated)
        stats = self._step_stats(step.start, execute_start, now, step.scheduled, num_generated)
        if self.speculator is not None:
            seconds = None if step.captured else now - cycle_start
            counts = self.speculator.observe(step.scheduled, runner_output, seconds)
            stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens = counts
            stats.drafter, stats.draft_len = step.scheduled.drafter or "off", step.scheduled.draft_len
        touched: dict[str, ParentRequest] = {}  # parents with a child that got a token this step
        for request in updated:
            parent_id = self._child_to_parent[request.request_id]
            stamp_token_time(request, parent_id, now, stats)
            parent = self._parents[parent_id]
            self._update_text(request, parent)
            if request.is_finished:
                finalize_text(request, self.tokenizer)
            touched[parent_id] = parent
        # only now: n siblings can finish in the same step, and each needs its text before the output
        outputs: list[RequestOutput] = []
        for parent in touched.values():
            finished = parent.is_finished()
            if parent.stream:
                delta = parent.delta_output()
                if delta is not None:
                    outputs.append(delta)
            elif finished:
                outputs.append(parent.output())
            if finished:
                stats.finished.append(parent.finished_stats(now))
                self._release(parent)
        self._record(stats)
        return outputs

    def _update_text(self, request: Request, parent: ParentRequest) -> None:
        """Bring the request's incremental text up to date (once per step, for stop strings and
        streaming alike) and finish the request if a stop string appeared."""
        detokenizer = parent.detokenizers.get(request.request_id)
        if detokenizer is None:
            return
        num_checked_chars = len(detokenizer.text)
        detokenizer.update(request.output_token_ids)
        if not find_stop_string(request, detokenizer.text, num_checked_chars):
            return
        if request.is_finished:  # it also hit max_tokens in this step: the stop string wins
            request.status = RequestStatus.FINISHED_STOPPED
        else:
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)

    def _step_stats(
        self,
        start: float,
        execute_start: float,
        now: float,
        scheduled: SchedulerOutput,
        num_generation_tokens: int,
    ) -> StepStats:
        counts = (self.kv_cache.prefix_cache_queries, self.kv_cache.prefix_cache_hits)
        prefix_delta = (counts[0] - self._prefix_cache_counts[0], counts[1] - self._prefix_cache_counts[1])
        self._prefix_cache_counts = counts
        arrivals, self._arrivals = self._arrivals, []
        return step_stats_of(
            scheduled, start, execute_start, now, num_generation_tokens, prefix_delta, arrivals
        )

    def _record(self, stats: StepStats) -> None:
        """Read the gauges last (stop strings and aborts finish requests after the step), then publish."""
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting)
        stats.kv_cache_usage = self.kv_cache.usage
        for logger in self.stat_loggers:
            logger.record(stats)

    def _release(self, parent: ParentRequest) -> None:
        self._parents.pop(parent.request_id, None)
        for child_id in parent.child_ids:
            self._child_to_parent.pop(child_id, None)
            if self.speculator is not None:
                self.speculator.forget(child_id)


@dataclass
class _InFlight:
    """A launched step whose sampled tokens the host has not read yet."""

    scheduled: SchedulerOutput
    sampled: dict[str, Request]  # the requests it samples for, by id (from Scheduler.advance)
    launched: LaunchedStep
    start: float  # engine clock when it was scheduled
    launch_time: float  # engine clock when it was handed to the executor
    captured: bool = False  # a CUDA graph was captured while it ran: its time is not a step's


def _needs_token_history(scheduled: SchedulerOutput) -> bool:
    """A sequence with a penalty needs every earlier token on the host, the pending one included."""
    return any(seq.sampling_params.has_penalties for seq in scheduled.sequences)


def _max_model_len(config: EngineConfig, arch: ModelArchConfig) -> int:
    limit = arch.max_context
    wanted = config.model.max_model_len
    if wanted is None:
        return limit
    if wanted > limit:
        raise ValueError(f"model.max_model_len={wanted} exceeds the model's context window ({limit} tokens)")
    return wanted
