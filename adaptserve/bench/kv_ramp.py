"""A load ramp to twice what a bf16 KV cache holds: static bf16 against the adaptive KV policy.

One fixed KV memory budget (`num_blocks` bf16 blocks' worth). Chat requests arrive on a ramp over
engine steps: a new request every `gap` steps, the gap shrinking linearly, so the KV the running
requests want grows to `overload` times the cache. Each setting runs the same arrivals through the
real engine, one step at a time (the steps are the clock: the ramp is the same on any machine).
The engine's own clock is virtual too (SECONDS_PER_STEP a step), so the KV policy's time
constants (trend window, forecast horizon, cooldown) span the same steps on any machine and a setting
run twice makes the same decisions: rows differ by what the settings do, not by the machine's pace.
Per setting: preemptions and the prompt tokens recomputed after them, requests finished (all must
be: none lost while formats switch), tokens per second, time to first token and per output token
(steps and seconds), the write format step by step, and top-1 agreement of every reply with the
reply the same prompt gets with unlimited bf16 memory (token by token up to the first divergence,
and position by position).
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from tqdm import tqdm

from adaptserve.bench.precision_quality import chat_prompts, compare_free_running
from adaptserve.bench.release import release_engine
from adaptserve.engine.request import SamplingParams
from adaptserve.runner.cuda_graphs import graph_captures

SECONDS_PER_STEP = 0.1  # the ramp's virtual time per engine step (the CPU ramp's pace, 0.13 s)


def arrival_steps(num_requests: int, first_gap: float, last_gap: float) -> list[int]:
    """The step each request arrives at: gaps shrink linearly from first_gap to last_gap."""
    steps, at = [], 0.0
    for i in range(num_requests):
        steps.append(int(at))
        at += first_gap + (last_gap - first_gap) * i / max(1, num_requests - 1)
    return steps


def run_ramp(
    checkpoint,
    settings: dict[str, dict],
    num_requests: int = 48,
    max_tokens: int = 96,
    num_blocks: int = 96,
    first_gap: float = 8.0,
    last_gap: float = 0.5,
    device: str = "cpu",
) -> dict[str, Any]:
    """Every setting (name -> engine options) over the same ramp; returns plain data."""
    prompts = _prompts(checkpoint, num_requests)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    arrivals = arrival_steps(num_requests, first_gap, last_gap)
    reference = _reference(checkpoint, prompts, params, device)
    demand = sum(len(p) + max_tokens for p in prompts)
    rows = {}
    for name, options in tqdm(settings.items(), desc="kv ramp"):
        options = {"device": device, **options}
        rows[name] = _run_setting(checkpoint, options, num_blocks, prompts, params, arrivals, reference)
    return {
        "num_requests": num_requests,
        "max_tokens": max_tokens,
        "seconds_per_step": SECONDS_PER_STEP,
        "num_blocks": num_blocks,
        "cache_tokens_bf16": num_blocks * 16,
        "demand_tokens": demand,
        "arrival_steps": arrivals,
        "device": device,
        "settings": {
            name: {k: list(v) if isinstance(v, tuple) else v for k, v in o.items()}
            for name, o in settings.items()
        },
        "rows": rows,
    }


def _prompts(checkpoint, count: int) -> list[list[int]]:
    """The chat prompts, or for a preset with random weights (no tokenizer) token ids of the same
    lengths drawn with a fixed seed."""
    if checkpoint.tokenizer is not None:
        return chat_prompts(checkpoint.tokenizer, count)
    rng = random.Random(0)
    vocab = checkpoint.arch.vocab_size
    return [[rng.randrange(10, vocab) for _ in range(rng.randrange(40, 120))] for _ in range(count)]


def _reference(checkpoint, prompts, params, device: str) -> list[list[int]]:
    from adaptserve import LLM

    # every prompt at once with room to its end: a cache sized to the run, not to the device, so
    # the settings' engines that follow find the GPU memory free
    llm = LLM.from_checkpoint(
        checkpoint, max_num_seqs=len(prompts), max_model_len=1024, device=device, num_blocks=len(prompts) * 64
    )
    token_ids = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    release_engine(llm)
    return token_ids


def _run_setting(checkpoint, options, num_blocks, prompts, params, arrivals, reference) -> dict[str, Any]:
    from adaptserve import LLM

    step = 0  # engine steps so far: the ramp's clock

    def clock() -> float:  # the engine's virtual time, read at the current step
        return step * SECONDS_PER_STEP

    llm = LLM.from_checkpoint(
        checkpoint,
        clock=clock,
        num_blocks=num_blocks,
        max_num_seqs=len(prompts),
        max_model_len=256,
        enable_prefix_caching=False,
        **options,
    )
    engine = llm.engine
    steps: list = []
    engine.stat_loggers.append(_Recorder(steps))
    first_step: dict[str, int] = {}
    tokens: dict[str, list[int]] = {}
    token_steps: dict[str, list[int]] = {}  # the step each reply token came out of
    done: dict[str, int] = {}
    formats: list[str] = []  # the write format after each step
    # each engine.step()'s wall time (with async scheduling: its launch and the previous step's
    # read), to find where a setting's seconds go
    step_ms: list[float] = []
    in_force = [engine.knobs.kv_format]  # ... and during each step (the one before it, then formats)
    next_request, start = 0, time.perf_counter()
    while next_request < len(prompts) or engine.has_unfinished_requests():
        while next_request < len(prompts) and arrivals[next_request] <= step:
            engine.add_request(str(next_request), prompts[next_request], params, stream=True)
            next_request += 1
        step_start = time.perf_counter()
        outputs = engine.step()
        step_ms.append(round(1e3 * (time.perf_counter() - step_start), 3))
        for output in outputs:
            completion = output.outputs[0]
            tokens.setdefault(output.request_id, []).extend(completion.token_ids)
            token_steps.setdefault(output.request_id, []).extend([step] * len(completion.token_ids))
            first_step.setdefault(output.request_id, step)
            if output.finished:
                done[output.request_id] = step
        formats.append(engine.knobs.kv_format)
        step += 1
    seconds = time.perf_counter() - start
    # KV the arrived, unfinished requests want at each step (prompt + max_tokens), as a share of bf16
    want = [len(p) + params.max_tokens for p in prompts]
    demand = [
        sum(want[i] for i in range(len(prompts)) if arrivals[i] <= t < done.get(str(i), step) + 1)
        for t in range(step)
    ]
    replies = [tokens.get(str(i), []) for i in range(len(prompts))]
    generated = sum(len(t) for t in replies)
    token_steps = [token_steps.get(str(i), []) for i in range(len(prompts))]
    ttft = [first_step[str(i)] - arrivals[i] for i in range(len(prompts)) if str(i) in first_step]
    tpot = [(done[r] - first_step[r]) / max(1, len(tokens[r]) - 1) for r in done]
    return {
        "seconds": round(seconds, 2),
        "steps": step,
        "finished": len(done),
        "lost": len(prompts) - len(done),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / seconds, 2),
        **_steady_speed(generated, step_ms),
        "preemptions": sum(s.num_preemptions for s in steps),
        "recomputed_prompt_tokens": max(0, sum(s.num_prefill_tokens for s in steps) - sum(map(len, prompts))),
        "peak_running": max(s.num_running for s in steps),
        "peak_demand_vs_bf16_cache": round(max(demand) / (num_blocks * 16), 2),
        "mean_ttft_steps": round(sum(ttft) / len(ttft), 2),
        "max_ttft_steps": max(ttft),
        "mean_tpot_steps": round(sum(tpot) / len(tpot), 3),
        "agreement": compare_free_running(reference, replies),
        "divergences": _divergences(reference, replies, token_steps, in_force + formats, arrivals),
        "timeline": {
            "kv_usage": [round(s.kv_cache_usage, 4) for s in steps],
            "num_running": [s.num_running for s in steps],
            "num_waiting": [s.num_waiting for s in steps],
            "kv_format": formats,
        },
        "step_ms": step_ms,  # wall time, so apart from the timeline (which a rerun reproduces exactly)
        "graph_captures": graph_captures(engine.runner),
        "requantized_blocks": getattr(engine.runner.compressed_kv, "num_requantized_blocks", 0)
        if engine.runner.compressed_kv is not None
        else 0,
        "switches": [
            {"step": _step_at(steps, s.time), "new": s.new, "reason": s.reason}
            for s in (engine.control.switches.recent if engine.control else [])
            if s.knob == "kv_format"
        ],
    }


OUTLIER_STEP = 50.0  # a step this many times the median is a one-off (a kernel compiling, a graph capture)


def _steady_speed(generated: int, step_ms: list[float]) -> dict[str, float]:
    """Tokens/s over the steps that are not one-off outliers, and what the outliers cost. On the H100
    the first steps in a new shape compile Triton kernels or capture graphs (1-3.3 s a step): in the
    8B ramp three of them were 6.7 of adaptive-hot0's 14.2 s. A served engine pays them once; a ramp
    of a few hundred steps pays them in its tokens/s. 50x the median, because prompt steps are real
    and reach 30x it (SmolLM2 on the H100: 1.75 ms decode steps, 30-60 ms prompt steps)."""
    if not step_ms:
        return {"steady_tokens_per_s": 0.0, "outlier_steps": 0, "outlier_seconds": 0.0}
    limit = OUTLIER_STEP * statistics.median(step_ms)
    outliers = [ms for ms in step_ms if ms > limit]
    steady_seconds = (sum(step_ms) - sum(outliers)) / 1e3
    return {
        "steady_tokens_per_s": round(generated / max(steady_seconds, 1e-9), 2),
        "outlier_steps": len(outliers),
        "outlier_seconds": round(sum(outliers) / 1e3, 2),
    }


def _divergences(reference, replies, token_steps, formats, arrivals) -> list[dict[str, Any]]:
    """Each reply that left the reference's: where (token position, engine step), the write format in
    force during that step (`formats[step]`), and every write format from its arrival to that step."""
    rows = []
    for i, (ref, reply) in enumerate(zip(reference, replies, strict=True)):
        position = next((p for p, (a, b) in enumerate(zip(ref, reply, strict=False)) if a != b), None)
        if position is None:
            continue
        step = token_steps[i][position]
        rows.append(
            {
                "request": i,
                "position": position,
                "step": step,
                "kv_format": formats[step],
                "formats_before": sorted(set(formats[arrivals[i] : step + 1])),
            }
        )
    return rows


class _Recorder:
    def __init__(self, steps: list):
        self.steps = steps

    def record(self, stats) -> None:
        self.steps.append(stats)


def _step_at(steps, when: float) -> int:
    return next((i for i, s in enumerate(steps) if s.start_time + s.step_time >= when), len(steps))
