"""Warm-up before serving: run a few steps of each kind so the first users do not pay for cold
kernels, and so admission control starts from a measured step-time model instead of a guess."""

from __future__ import annotations

import random

from adaptserve.engine.engine import LLMEngine
from adaptserve.engine.request import SamplingParams
from adaptserve.engine.stats import StatLogger


def warm_up(engine: LLMEngine, step_model: StatLogger, seed: int = 0) -> None:
    """Prefills of several lengths, then a batch of decodes; the steps' stats go to `step_model`.
    On a GPU everything runs twice and only the second pass is measured: first launches pay for
    library handles, kernel selection and allocator growth, which would skew the model."""
    rng = random.Random(seed)
    scheduler = engine.config.scheduler
    on_cpu = engine.runner.device.type == "cpu"
    # a CPU prefill costs milliseconds per token: the fit extrapolates past 512 tokens instead
    longest = max(
        1, min(scheduler.max_num_batched_tokens, engine.max_model_len - 8, 512 if on_cpu else 1 << 30)
    )
    lengths = sorted({min(n, longest) for n in (16, 64, 256, 512, longest)})
    batch = min(8 if on_cpu else 32, scheduler.max_num_seqs)
    vocab = range(256, max(257, engine.arch.vocab_size))  # away from the special tokens of most vocabularies

    def run_all() -> None:
        for length in lengths:
            prompt = [rng.choice(vocab) for _ in range(length)]
            _run(engine, [prompt], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        prompts = [[rng.choice(vocab) for _ in range(16)] for _ in range(batch)]
        _run(engine, prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))

    if not on_cpu:
        run_all()
    engine.stat_loggers.append(step_model)
    try:
        run_all()
    finally:
        engine.stat_loggers.remove(step_model)
    engine.kv_cache.reset_prefix_cache()  # random prompts are no use to anyone


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> None:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"warmup-{i}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
