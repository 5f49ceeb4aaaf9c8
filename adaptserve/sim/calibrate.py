"""Calibration: run a real engine over requests of varied shapes, time every step, fit a StepCostModel.

The simulator's clock moves by one prediction per engine step and nothing else, so the time to fit is
the engine loop's whole period: one `engine.step()` call, wall clock (on a CPU the engine's own
`execute_time` is only the wait for tokens already computed, near 0). Steps run synchronously here so
each time pairs with its own step's shape. Profiles live in `adaptserve/sim/profiles/<device>-<model>.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from adaptserve.adapt.step_cost import StepCostModel, StepShape
from adaptserve.bench.workloads import BenchRequest, random_ids
from adaptserve.engine.engine import LLMEngine
from adaptserve.engine.request import SamplingParams
from adaptserve.engine.stats import StepStats
from adaptserve.sim.tracking import RequestTrack

PROFILES_DIR = Path(__file__).parent / "profiles"
TIMINGS = ("wall", "execute", "step")


class StepRecorder:
    """A StatLogger that keeps one StepShape per step that computed tokens. `timing` says which time:
    "wall", one `timed_step()` call (the loop's period; the other steps get 0 and are not fitted);
    "execute", StepStats.execute_time (device time, meaningful where launches are asynchronous);
    "step", StepStats.step_time (schedule to tokens read). `timer` reads the time for "wall" (e.g.
    `time.process_time`, CPU seconds, where other processes share the machine)."""

    def __init__(self, timing: str = "wall", timer: Callable[[], float] = time.perf_counter):
        if timing not in TIMINGS:
            raise ValueError(f"unknown timing {timing!r}; known: {', '.join(TIMINGS)}")
        self.timing = timing
        self.timer = timer
        self.points: list[StepShape] = []

    def record(self, stats: StepStats) -> None:
        if stats.num_scheduled_tokens == 0:
            return  # an abort's stats: no step ran
        seconds = {"wall": 0.0, "execute": stats.execute_time, "step": stats.step_time}[self.timing]
        self.points.append(
            StepShape(stats.num_scheduled_tokens, stats.num_sequences, stats.num_context_tokens, seconds)
        )

    def timed_step(self, engine: LLMEngine) -> list:
        """`engine.step()`, its wall time given to the step it recorded (timing "wall")."""
        num_points = len(self.points)
        start = self.timer()
        outputs = engine.step()
        seconds = self.timer() - start
        if self.timing == "wall" and len(self.points) == num_points + 1:
            self.points[-1] = dataclasses.replace(self.points[-1], seconds=seconds)
        return outputs


def replay(
    engine: LLMEngine,
    requests: Sequence[BenchRequest],
    arrival_times: Sequence[float],
    recorder: StepRecorder | None = None,
    request_prefix: str = "",
) -> list[RequestTrack]:
    """Feed `requests` to a real engine at their arrival times (seconds from now) and step it in
    between, as a server's loop does; returns what a streaming client saw of each (engine clock).
    Requests due by the start of a step join it; an idle engine sleeps until the next arrival."""
    order = sorted(range(len(requests)), key=lambda i: (arrival_times[i], i))
    start = engine.clock()
    tracks: dict[str, RequestTrack] = {}
    next_arrival = 0
    while next_arrival < len(order) or engine.has_unfinished_requests():
        while next_arrival < len(order) and start + arrival_times[order[next_arrival]] <= engine.clock():
            index = order[next_arrival]
            request, arrival = requests[index], start + arrival_times[index]
            track = RequestTrack(index, request.prompt_len, request.output_len, arrival)
            tracks[f"{request_prefix}{index}"] = track
            params = SamplingParams(max_tokens=request.output_len, ignore_eos=True)
            engine.add_request(
                f"{request_prefix}{index}", request.prompt, params, arrival_time=arrival, stream=True
            )
            next_arrival += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, start + arrival_times[order[next_arrival]] - engine.clock()))
            continue
        outputs = recorder.timed_step(engine) if recorder is not None else engine.step()
        now = engine.clock()
        for output in outputs:
            tracks[output.request_id].on_output(output, now)
    return sorted(tracks.values(), key=lambda t: t.index)


def calibration_waves(
    vocab_size: int,
    max_num_seqs: int = 64,
    max_prompt_len: int = 512,
    batches: Sequence[int] = (1, 4, 8, 16, 32),
    contexts: Sequence[int] = (24, 128),
    seed: int = 0,
) -> list[list[BenchRequest]]:
    """Groups of requests that arrive together, chosen so the steps span the shapes a run meets:
    single prompts of growing length (prefill chunks), then for each batch size a wave of short and a
    wave of long prompts with 2-16 output tokens each, so the decode batch shrinks through every size
    below it (step time is not linear in the batch on every device: the fit must see them all).
    Decodes of the same batch size at two context lengths keep the per-sequence and per-context terms
    apart (with one length they move together)."""
    rng = np.random.default_rng(seed)

    def request(prompt_len: int, output_len: int) -> BenchRequest:
        return BenchRequest(random_ids(rng, prompt_len, vocab_size), prompt_len, output_len)

    singles = sorted({min(n, max_prompt_len) for n in (16, 64, 256, max_prompt_len)})
    waves = [[request(n, 2)] for n in singles]
    for batch in batches:
        for context in contexts:
            if batch <= max_num_seqs:
                prompt_len = min(context, max_prompt_len)
                waves.append([request(prompt_len, int(n)) for n in rng.integers(2, 17, batch)])
    return waves


def calibrate(
    engine: LLMEngine,
    waves: Sequence[Sequence[BenchRequest]] | None = None,
    *,
    device: str = "unknown",
    max_prompt_len: int = 512,
    warm_up: bool = True,
    timer: Callable[[], float] = time.perf_counter,
) -> StepCostModel:
    """Run each wave (its requests all at once) on `engine`, time every step, and fit. `waves`
    defaults to `calibration_waves` for the engine's vocabulary and batch limit. A short warm-up wave
    runs first, unrecorded: first steps pay for allocations and lazy initialization. `timer`: see
    StepRecorder."""
    scheduler = engine.scheduler.config
    if waves is None:
        max_prompt_len = min(max_prompt_len, scheduler.max_num_batched_tokens, engine.max_model_len - 32)
        waves = calibration_waves(engine.arch.vocab_size, scheduler.max_num_seqs, max_prompt_len)
    recorder = StepRecorder("wall", timer)
    # pair each step's time with its own shape: with overlap, step n's call would also finish step n-1
    async_scheduling, engine.async_scheduling = engine.async_scheduling, False
    try:
        if warm_up:
            rng = np.random.default_rng(1)
            warm = [BenchRequest(random_ids(rng, 32, engine.arch.vocab_size), 32, 4) for _ in range(2)]
            replay(engine, warm, [0.0] * len(warm), request_prefix="warm-")
        engine.stat_loggers.append(recorder)
        for number, wave in enumerate(waves):
            replay(engine, wave, [0.0] * len(wave), recorder, request_prefix=f"cal{number}-")
    finally:
        engine.async_scheduling = async_scheduling
        if recorder in engine.stat_loggers:
            engine.stat_loggers.remove(recorder)
    return fit_without_stalls(recorder.points, device)


def fit_without_stalls(points: Sequence[StepShape], device: str = "unknown") -> StepCostModel:
    """Fit, drop the steps that took over twice the prediction, fit again. Another process or the
    garbage collector only ever slows a step down, and a few such stalls would pull every coefficient."""
    model = StepCostModel.fit(points, device)
    kept = [p for p in points if p.seconds <= 2 * model.predict_shape(p)]
    return StepCostModel.fit(kept, device) if len(kept) >= 4 else model


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def profile_path(device: str, model: str) -> Path:
    """Where the profile of `model` on `device` (a short tag: cpu, h100, ...) is kept."""
    return PROFILES_DIR / f"{slug(device)}-{slug(model)}.json"


def model_label(spec: str | None) -> str:
    """A short model name for file names: the preset name, the file or folder stem, or the default's."""
    if spec is None:
        return "smollm2-135m"
    name = Path(spec).name
    return slug(name.removesuffix(".gguf"))


def run_calibration(args: argparse.Namespace) -> StepCostModel:
    """`adaptserve sim calibrate`: load the model, calibrate, write the profile JSON."""
    from adaptserve.bench.results import device_name, device_tag
    from adaptserve.config import EngineConfig

    config = EngineConfig.from_flat(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        async_scheduling=False,
    )
    engine = LLMEngine(config, progress=False)
    device = engine.runner.device
    start = time.perf_counter()
    model = calibrate(engine, device=device_name(device), max_prompt_len=args.max_prompt_len)
    path = Path(args.output) if args.output else profile_path(device_tag(device), model_label(args.model))
    model.save(path)
    seconds = time.perf_counter() - start
    print(
        f"fitted {model.num_points} steps in {seconds:.1f} s: fixed {model.fixed_s * 1e3:.3f} ms, "
        f"per token {model.per_token_s * 1e6:.2f} us, per sequence {model.per_sequence_s * 1e6:.2f} us, "
        f"per context token {model.per_context_s * 1e9:.2f} ns; mean relative error "
        f"{model.relative_error:.1%}\nwrote {path}"
    )
    return model
