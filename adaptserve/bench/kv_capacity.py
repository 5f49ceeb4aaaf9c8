"""Capacity at one KV memory budget: how many sequences each KV format really runs at once (the
`capacity` part of `adaptserve bench kv`).

At one KV memory budget, many more requests than bf16 can hold run
through `LLM.generate` at once, in the model's bf16 (a real 2-byte cache); a stat logger records each
step's running sequences. "bf16" is measured twice: the plain cache, and the chunked compressed
layout (kv_policy "adaptive", its KV policy removed so it stays at bf16), which shows what the layout
itself costs; its row reports the chunks an adaptive pool keeps back for requantization.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from adaptserve.bench.precision_quality import _Timer
from adaptserve.bench.release import release_engine
from adaptserve.config import CacheConfig
from adaptserve.engine.kv_cache.formats import KV_FORMATS, WHOLE_BLOCK_FORMATS
from adaptserve.engine.request import SamplingParams
from adaptserve.engine.stats import StepStats
from adaptserve.model.loaders import LoadedCheckpoint
from adaptserve.runner.kv_compression import KVGeometry

BF16_SEQUENCES = 8  # the default capacity budget holds this many whole sequences in plain bf16
# a whole-block format (int4k) takes new blocks in another format: its capacity is not one number
TOKEN_FORMATS = tuple(f for f in KV_FORMATS if f not in WHOLE_BLOCK_FORMATS)


class _RunningRecorder:
    """A stat logger keeping each step's running and waiting sequences and preemptions."""

    def __init__(self):
        self.steps: list[tuple[int, int, int]] = []

    def record(self, stats: StepStats) -> None:
        if stats.num_scheduled_tokens:
            self.steps.append((stats.num_running, stats.num_waiting, stats.num_preemptions))


def measure_kv_capacity(
    checkpoint: LoadedCheckpoint,
    formats: tuple[str, ...] = TOKEN_FORMATS,
    kv_cache_memory_gib: float | None = None,
    prompt_tokens: int = 256,
    max_tokens: int = 64,
    device: str = "cpu",
    num_requests: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Sequences running at once per format at one KV budget (None: room for BF16_SEQUENCES whole
    sequences in plain bf16). `num_requests` greedy requests (None: 1.2 times as many prompts as the
    lowest format's blocks hold) of `prompt_tokens` fixed random ids and `max_tokens` new tokens each
    (EOS ignored) run at once through LLM.generate, in bfloat16."""
    whole_block = [f for f in formats if f in WHOLE_BLOCK_FORMATS]
    if whole_block:
        raise ValueError(
            f"formats={whole_block} take new blocks in another format until requantized: no capacity of "
            f"their own to measure here; measure some of {TOKEN_FORMATS}"
        )
    arch = checkpoint.arch
    cache = CacheConfig()
    seq_tokens = prompt_tokens + max_tokens
    block_bytes = arch.kv_bytes_per_token(2) * cache.block_size  # a bf16 block over every layer
    if kv_cache_memory_gib is None:
        whole = -(-seq_tokens // cache.block_size) * BF16_SEQUENCES
        num_native = -(-whole // cache.kv_chunk_blocks) * cache.kv_chunk_blocks  # whole chunks
        kv_cache_memory_gib = (num_native + 0.5) * block_bytes / 2**30
    geometry = KVGeometry.plan(cache, arch, torch.bfloat16, int(kv_cache_memory_gib * 2**30 // block_bytes))
    if num_requests is None:
        most_blocks = geometry.num_chunks * max(geometry.blocks_per_chunk[f] for f in formats)
        num_requests = int(1.2 * most_blocks / -(-prompt_tokens // cache.block_size)) + 1
    rng = random.Random(0)
    prompts = [
        [rng.randrange(100, arch.vocab_size) for _ in range(prompt_tokens)] for _ in range(num_requests)
    ]
    runs = [("bf16", "static"), ("bf16", "adaptive")] if "bf16" in formats else []
    runs += [(f, "static") for f in formats if f != "bf16"]
    timed = _Timer(log or (lambda _: None))
    rows = {}
    for kv_format, policy in runs:
        label = "bf16_chunked" if policy == "adaptive" else kv_format
        args = (kv_cache_memory_gib, prompts, max_tokens, device, geometry.layout)
        rows[label] = timed(label, partial(_capacity_row, checkpoint, kv_format, policy, *args))
    base = rows.get("bf16")
    if base is not None:
        for row in rows.values():
            row["peak_vs_bf16"] = row["peak_running"] / base["peak_running"]
            row["saturated_vs_bf16"] = row["saturated_mean_running"] / base["saturated_mean_running"]
    return {
        "settings": {
            "kv_cache_memory_gib": kv_cache_memory_gib,
            "prompt_tokens": prompt_tokens,
            "max_tokens": max_tokens,
            "num_requests": num_requests,
            "dtype": "bfloat16",
            "block_size": cache.block_size,
            "device": device,
        },
        "formats": rows,
        "seconds": timed.seconds,
    }


def _capacity_row(checkpoint, kv_format, policy, memory_gib, prompts, max_tokens, device, layout) -> dict:
    from adaptserve import LLM

    llm = LLM.from_checkpoint(
        checkpoint,
        device=device,
        dtype="bfloat16",
        kv_format=kv_format,
        kv_policy=policy,
        kv_cache_memory_gib=memory_gib,
        max_model_len=len(prompts[0]) + max_tokens + layout.block_size,
        max_num_seqs=len(prompts),
        enable_prefix_caching=False,
        autotune="off",
    )
    engine = llm.engine
    if engine.control is not None:  # hold the adaptive policy at bf16: the layout alone is measured
        engine.control.controllers = [c for c in engine.control.controllers if c.name != "kv_format"]
    recorder = _RunningRecorder()
    engine.stat_loggers.append(recorder)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    pool, compressed = engine.kv_cache.block_pool, engine.runner.compressed_kv
    if compressed is None:
        num_blocks = engine.runner.num_blocks
    else:
        num_blocks = compressed.geometry.num_chunks * compressed.geometry.blocks_per_chunk[kv_format]
    saturated = [running for running, waiting, _ in recorder.steps if waiting] or [0]
    row = {
        "layout": "plain" if compressed is None else "chunked",
        "write_format": getattr(pool, "write_format", kv_format),
        "kv_bytes_per_token_per_layer": layout.bytes_per_token(kv_format),
        "num_blocks": num_blocks,
        "reserve_chunks": getattr(pool, "reserve_chunks", 0),  # kept back for requantization (adaptive)
        "peak_running": max(running for running, _, _ in recorder.steps),
        "saturated_mean_running": sum(saturated) / len(saturated),
        "num_preemptions": sum(preempted for _, _, preempted in recorder.steps),
        "num_steps": len(recorder.steps),
        "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
    }
    release_engine(llm)
    return row
