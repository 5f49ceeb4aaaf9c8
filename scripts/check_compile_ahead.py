"""On the H100: does a background warmup make the tuner's first launch a cache hit, and what does the
compile thread cost a busy engine thread? Run from the repo root: python scripts/check_compile_ahead.py"""

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from adaptserve.kernels.attention.metadata import AttentionMetadata, PrefillSequence
from adaptserve.kernels.attention.variants import triton_variants
from adaptserve.kernels.live_sample import Sample, compile_ahead, launch, run_args, sample_inputs

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
H, KVH, D, BS, NB = 32, 8, 128, 16, 8192
dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
k_cache = torch.randn(NB, BS, KVH, D, device=dev, dtype=dtype)  # [blocks, page, KVH, D]
v_cache = torch.randn_like(k_cache)


def decode_meta(n=64, ctx=1000):
    blocks = -(-ctx // BS)
    table = torch.randperm(NB - 1, device=dev)[: n * blocks].view(n, blocks).int()  # [N, MB]
    last = ctx - 1
    return AttentionMetadata(
        slot_mapping=table[:, last // BS].long() * BS + last % BS,
        num_decode_tokens=n,
        block_table=table,
        context_lens=torch.full((n,), ctx, dtype=torch.int32, device=dev),
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=dev),
        max_context_len=ctx,
    )


def prefill_meta(t=512):
    table = torch.arange(-(-t // BS), device=dev, dtype=torch.int32).view(1, -1)  # [1, MB]
    return AttentionMetadata(
        slot_mapping=torch.arange(t, device=dev),
        num_decode_tokens=0,
        prefills=[PrefillSequence(0, t, t)],
        block_table=table,
        context_lens=torch.tensor([t], dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor([0, t], dtype=torch.int32, device=dev),
        max_query_len=t,
        max_context_len=t,
    )


def cache_size(variant):
    from adaptserve.kernels.attention import triton_decode, triton_prefill

    fn = (
        triton_decode._decode_kernel
        if variant.op == "decode_attention"
        else triton_prefill._paged_prefill_kernel
    )
    caches = getattr(fn, "device_caches", None)  # none under the interpreter
    return None if caches is None else len(caches[torch.cuda.current_device()][0])


def engine_steps(seconds):
    """A stand-in engine thread: small GPU work + a sync per 'step'; returns step times in ms."""
    x = torch.randn(2048, 2048, device=dev, dtype=dtype)
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        begin = time.perf_counter()
        for _ in range(20):
            x = (x @ x).tanh()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - begin) * 1e3)
    return times


pool = ThreadPoolExecutor(max_workers=1)
base = engine_steps(1.0)
print(f"engine step alone: p50 {statistics.median(base):.2f} ms, max {max(base):.2f} ms")
variants = triton_variants(slowed=False)
cases = [  # 2 decode configs (one split, then split-KV with its merge kernel), 2 prefill configs
    (variants[1], decode_meta()),
    (variants[9], decode_meta(2, 8000)),
    (variants[10], prefill_meta()),
    (variants[14], prefill_meta()),
]
for variant, meta in cases:
    sample = Sample(meta, k_cache, v_cache, H, step=1)
    inputs = sample_inputs(sample)
    args = run_args(inputs, torch.empty_like(inputs["q"]))
    before = cache_size(variant)
    begin = time.perf_counter()
    future = pool.submit(compile_ahead, variant, args)
    during = engine_steps(0.05)
    while not future.done():  # the engine keeps stepping while the worker compiles
        during += engine_steps(0.05)
    future.result()
    compile_s = time.perf_counter() - begin
    after_warmup = cache_size(variant)
    resources = {}
    begin = time.perf_counter()
    launch(variant, sample_inputs(sample), resources)  # the tuner's first launch, on the engine thread
    if dev.type == "cuda":
        torch.cuda.synchronize()
    launch_ms = (time.perf_counter() - begin) * 1e3
    print(
        f"{variant.name}: compile {compile_s:.2f} s in the worker; first launch {launch_ms:.1f} ms; "
        f"kernel cache {before} -> {after_warmup} after warmup -> {cache_size(variant)} after launch "
        f"(must not grow at the launch); resources {resources}; engine steps meanwhile: "
        f"p50 {statistics.median(during):.2f} ms, max {max(during):.2f} ms"
    )
pool.shutdown()
