"""`adaptserve bench decode`: the time of one decode step for batch sizes 1..256, beside the floor that
memory bandwidth sets, with transformers' `generate` (eager and static cache) in the same run.

A decode step reads every weight once and every sequence's KV cache once, so its floor is

    floor_s = (weight bytes + batch * embedding row bytes + KV bytes) / copy bandwidth

with weight bytes from the architecture and the dtype (the input embedding counts only the rows the
batch looks up, unless it is tied to lm_head, which reads it whole), KV bytes for the mean context of
the timed steps (context_len + steps / 2 tokens per sequence) and the bandwidth of a large on-device
copy measured in the same run. The floor is the same for every engine; roofline_fraction =
floor_s / step_s (1.0 = at the floor).

Each result row: engine, batch_size, step_ms (median), step_ms_samples (ours: every timed step;
transformers: each repeated measurement), kv_bytes, floor_ms, roofline_fraction, tokens_per_s, and for
transformers compiles_while_timing (torch.compile graphs made inside timed calls; 0 when all is well).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adaptserve.bench.offline import free_memory, random_prompts, sync
from adaptserve.bench.results import DEFAULT_MODEL_LABEL, RESULTS_DIR, write_results
from adaptserve.kernel_args import kernel_options, precision_options
from adaptserve.model.config import ModelArchConfig

OURS = "adaptserve"
WARMUP_STEPS = 2  # untimed decode steps at each batch size before the timed ones


def add_decode_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `bench decode`; the engine arguments (--model, --dtype, --device, ...) come from the
    CLI's shared engine arguments."""
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256", help="comma-separated")
    parser.add_argument(
        "--context-len",
        type=int,
        default=512,
        help="prompt tokens each sequence holds when decoding is timed",
    )
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size")
    parser.add_argument(
        "--baselines", default="eager,static", help="transformers variants: eager, static; '' or none: none"
    )
    parser.add_argument(
        "--hf-batch-sizes",
        default="1,16,64,256",
        help="batch sizes timed in transformers (those also in --batch-sizes); a subset keeps the run "
        "short, since transformers' static cache compiles anew for each batch size",
    )
    parser.add_argument(
        "--hf-repeats", type=int, default=3, help="measurements per transformers batch size; median reported"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-dir", default=None, help="default: docs/benchmarks")
    parser.add_argument(
        "--profile-batch-sizes", default="", help="also profile one decode step at these batch sizes (CUDA)"
    )


# ---- the floor ----------------------------------------------------------------------------------------


def weight_bytes_per_step(arch: ModelArchConfig, dtype_bytes: int) -> int:
    """Bytes of the weights every decode step reads whatever the batch: all layers, the final norm and
    lm_head (a tied input embedding is this same matrix). Untied input embeddings add
    `embedding_row_bytes` per sequence on top."""
    hidden, head_dim = arch.hidden_size, arch.head_dim
    q_size, kv_size = arch.num_heads * head_dim, arch.num_kv_heads * head_dim
    attention = hidden * (q_size + 2 * kv_size) + q_size * hidden
    attention += (q_size + 2 * kv_size) * arch.attention_bias + hidden * arch.o_proj_bias
    attention += 2 * head_dim * arch.qk_norm
    mlp = 3 * hidden * arch.intermediate_size
    per_layer = attention + mlp + 2 * hidden  # + input and post-attention norms
    return (arch.num_layers * per_layer + hidden + arch.vocab_size * hidden) * dtype_bytes


def embedding_row_bytes(arch: ModelArchConfig, dtype_bytes: int) -> int:
    """Input embedding bytes read per sequence and step: one row, or 0 when tied to lm_head (counted
    whole in `weight_bytes_per_step`)."""
    return 0 if arch.tie_word_embeddings else arch.hidden_size * dtype_bytes


def kv_bytes_per_step(
    arch: ModelArchConfig, kv_dtype_bytes: int, batch_size: int, context_len: int, steps: int
) -> int:
    """KV bytes one step reads at the mean context of the timed steps: context_len + steps / 2 tokens."""
    return batch_size * (2 * context_len + steps) * arch.kv_bytes_per_token(kv_dtype_bytes) // 2


# ---- the run ------------------------------------------------------------------------------------------


def run_decode_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Time our engine, then each transformers variant, write docs/benchmarks/decode-<device>.json (or
    args.result_dir) and return its payload."""
    from adaptserve.bench.bandwidth import measure_copy_bandwidth
    from adaptserve.model.loaders import load_checkpoint
    from adaptserve.runner.device import resolve_device, resolve_dtype

    device = resolve_device(getattr(args, "device", "auto"))
    dtype = resolve_dtype(getattr(args, "dtype", "auto"), device)
    if args.context_len < 1 or args.steps < 1:
        raise ValueError(f"--context-len and --steps must be >= 1, got {args.context_len} and {args.steps}")
    batch_sizes = parse_sizes(args.batch_sizes, "--batch-sizes")
    variants = parse_baselines(args.baselines)
    hf_sizes = [b for b in parse_sizes(args.hf_batch_sizes, "--hf-batch-sizes") if b in batch_sizes]
    checkpoint = load_checkpoint(getattr(args, "model", None))
    arch = checkpoint.arch
    prompts = {b: random_prompts(b, args.context_len, arch.vocab_size, args.seed + b) for b in batch_sizes}

    bandwidth = measure_copy_bandwidth(device)
    floor = _Floor(arch, dtype.itemsize, args.context_len, args.steps, bandwidth)
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(batch_sizes) + len(variants) * len(hf_sizes), desc=OURS, unit="batch") as bar:
        llm = _build_engine(checkpoint, args, device, dtype, batch_sizes)
        profile_sizes = (
            set(parse_sizes(args.profile_batch_sizes, "--profile-batch-sizes"))
            if getattr(args, "profile_batch_sizes", "")
            else set()
        )
        for batch_size in batch_sizes:
            profile = batch_size in profile_sizes and device.type == "cuda"
            samples, summary, mix = _engine_step_samples(
                llm, prompts[batch_size], args.steps, device, profile
            )
            extra = {"precision_steps": mix, **({"profile": summary} if summary else {})}
            rows.append(floor.row(OURS, batch_size, samples, **extra))
            if summary:
                from adaptserve.bench.step_profile import format_profile

                print(format_profile(batch_size, summary))
            bar.update(1)
        del llm
        free_memory(device)  # our weights and KV cache leave before transformers' arrive
        if variants and hf_sizes:
            rows += _transformers_rows(
                checkpoint, dtype, device, variants, hf_sizes, prompts, floor, args, bar
            )

    payload = {
        "model": getattr(args, "model", None) or DEFAULT_MODEL_LABEL,
        "dtype": _dtype_name(dtype),
        "precision_policy": getattr(args, "precision_policy", "native"),
        "context_len": args.context_len,
        "steps": args.steps,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "weight_bytes": floor.weight_bytes,
        "embedding_row_bytes": floor.embedding_row_bytes,
        "results": rows,
    }
    out_dir = Path(getattr(args, "result_dir", None) or RESULTS_DIR)
    path = write_results(
        "decode", device, payload, out_dir=out_dir, command=getattr(args, "command_line", None)
    )
    print(markdown_table(payload))
    print(f"wrote {path}")
    from adaptserve.bench.plot import plot_after_run

    plot_after_run(path)
    return payload


class _Floor:
    """The bandwidth floor of one decode step and the result row that sets a step time beside it."""

    def __init__(
        self, arch: ModelArchConfig, dtype_bytes: int, context_len: int, steps: int, bandwidth: float
    ):
        self.arch, self.dtype_bytes, self.bandwidth = arch, dtype_bytes, bandwidth
        self.context_len, self.steps = context_len, steps
        self.weight_bytes = weight_bytes_per_step(arch, dtype_bytes)
        self.embedding_row_bytes = embedding_row_bytes(arch, dtype_bytes)

    def row(self, engine: str, batch_size: int, samples: list[float], **extra: Any) -> dict[str, Any]:
        kv_bytes = kv_bytes_per_step(self.arch, self.dtype_bytes, batch_size, self.context_len, self.steps)
        floor_s = (self.weight_bytes + batch_size * self.embedding_row_bytes + kv_bytes) / self.bandwidth
        step_s = statistics.median(samples)
        return {
            "engine": engine,
            "batch_size": batch_size,
            "step_ms": round(step_s * 1e3, 4),
            "step_ms_samples": [round(s * 1e3, 4) for s in samples],
            "kv_bytes": kv_bytes,
            "floor_ms": round(floor_s * 1e3, 4),
            "roofline_fraction": round(floor_s / step_s, 4),
            "tokens_per_s": round(batch_size / step_s, 1),
            **extra,
        }


def _build_engine(checkpoint, args, device: torch.device, dtype: torch.dtype, batch_sizes: list[int]):
    """Our engine sized for the largest batch: max_num_seqs = that batch, a KV cache that holds every
    sequence whole (computed here, so --kv-cache-memory-gib and --max-model-len are not used), and
    prefix caching on whatever --no-prefix-caching says (`_engine_step_samples` relies on it)."""
    from adaptserve import LLM

    max_batch = max(batch_sizes)
    block_size = 16
    # decoding requests take one token of the budget each, the rest goes to prefill
    token_budget = max(getattr(args, "max_num_batched_tokens", 2048), 2 * max_batch)
    max_model_len = args.context_len + _max_tokens(args, max_batch, token_budget)
    if max_model_len > checkpoint.arch.max_context:
        raise ValueError(
            f"--context-len {args.context_len} and --steps {args.steps} need {max_model_len} tokens per "
            f"sequence; the model's context window is {checkpoint.arch.max_context}"
        )
    return LLM.from_checkpoint(
        checkpoint,
        dtype=_dtype_name(dtype),
        device=str(device),
        seed=args.seed,
        max_model_len=max_model_len,
        max_num_seqs=max_batch,
        max_num_batched_tokens=token_budget,
        block_size=block_size,
        num_blocks=max_batch * math.ceil(max_model_len / block_size) + 1,
        enable_prefix_caching=True,
        **kernel_options(args),
        **precision_options(args),
    )


def _max_tokens(args, batch_size: int, token_budget: int) -> int:
    """Tokens a request may generate: the warm-up and timed steps plus the steps before every request
    of the batch has its first token (bounded as if nothing came from the prefix cache), plus a few."""
    prefill_steps = math.ceil(batch_size * args.context_len / (token_budget - batch_size))
    return WARMUP_STEPS + args.steps + prefill_steps + 4


def _engine_step_samples(
    llm, prompts: list[list[int]], steps: int, device: torch.device, profile: bool = False
) -> tuple[list[float], dict | None, dict[str, int]]:
    """Seconds of each of `steps` engine steps in which every request of the batch decodes one token,
    run back to back (each sample is the time between two steps' returns; their sum is the wall time),
    the profile if asked, and how many timed steps ran in each weight precision.

    The prompts run once with max_tokens=1 first, which leaves their KV in the prefix cache; so when
    they run again, their prefill is one block each and all requests start decoding within a step or
    two of each other, with context_len tokens each, as the floor assumes.
    """
    from adaptserve import SamplingParams

    engine = llm.engine
    engine.kv_cache.reset_prefix_cache()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    # up to the context window, which _build_engine sized to outlast the timed steps
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    request_ids = [f"bench-decode-{len(prompts)}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(request_ids, prompts, strict=True):
        engine.add_request(request_id, prompt, params)
    try:
        requests = [engine.scheduler.requests[r] for r in request_ids]
        while not all(r.output_token_ids for r in requests):
            engine.step()
        for _ in range(WARMUP_STEPS):  # the first steps at a new batch shape pay for kernel choice
            engine.step()
        # back to back, as served: with async scheduling the host prepares step n+1 while the device
        # runs step n, so a sync around each step would time host and device in series
        served = engine.runner.precision.steps_by_precision.copy()  # Counter: steps per precision so far
        sync(device)
        stamps = [time.perf_counter()]
        for _ in range(steps):
            engine.step()
            stamps.append(time.perf_counter())
        sync(device)
        stamps[-1] = time.perf_counter()  # the last step's device work is done too
        samples = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
        mix = dict(engine.runner.precision.steps_by_precision - served)  # the timed steps' precisions
        summary = None
        if profile:
            from adaptserve.bench.step_profile import profile_steps

            summary = profile_steps(engine.step, device)
        if any(r.is_finished for r in requests):
            raise RuntimeError("a request finished while decode steps were being timed; raise the context")
    finally:
        for request_id in request_ids:
            engine.abort_request(request_id)
        engine.kv_cache.reset_prefix_cache()
    return samples, summary, mix


def _transformers_rows(checkpoint, dtype, device, variants, hf_sizes, prompts, floor: _Floor, args, bar):
    from adaptserve.bench.hf_baseline import TransformersGenerator, transformers_model

    model = transformers_model(checkpoint, dtype, device)
    rows = []
    for variant in variants:
        engine = f"transformers-{variant}"
        bar.set_description(engine)
        generator = TransformersGenerator(model, variant)
        for batch_size in hf_sizes:
            compiles_before = generator.num_compiles_while_timing
            samples = generator.decode_step_samples(prompts[batch_size], args.steps, args.hf_repeats)
            compiles = generator.num_compiles_while_timing - compiles_before
            rows.append(floor.row(engine, batch_size, samples, compiles_while_timing=compiles))
            bar.update(1)
    del model
    free_memory(device)
    return rows


# ---- parsing and reporting ----------------------------------------------------------------------------


def parse_sizes(text: str, flag: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (sorted, without repeats); each must be >= 1."""
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"{flag} must list batch sizes >= 1, got {text!r}")
    return sizes


def parse_baselines(text: str | None) -> list[str]:
    """'eager,static' -> ["eager", "static"]; '' or 'none' -> []."""
    from adaptserve.bench.hf_baseline import TransformersGenerator

    if not text or text.strip().lower() == "none":
        return []
    variants = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [v for v in variants if v not in TransformersGenerator.VARIANTS]
    if unknown:
        raise ValueError(
            f"--baselines: unknown variant(s) {unknown}; known: {', '.join(TransformersGenerator.VARIANTS)}"
        )
    return list(dict.fromkeys(variants))


def markdown_table(payload: dict[str, Any]) -> str:
    """One row per batch size: our step time, the floor, our fraction of it, and each transformers
    variant that ran (a dash where it did not run that batch size)."""
    by_key = {(r["engine"], r["batch_size"]): r for r in payload["results"]}
    baselines = [e for e in dict.fromkeys(r["engine"] for r in payload["results"]) if e != OURS]
    header = ["batch", f"{OURS} ms", "floor ms", "fraction"] + [f"{e} ms" for e in baselines]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for batch_size in sorted({b for _, b in by_key}):
        ours = by_key.get((OURS, batch_size))
        any_row = ours or next(r for (_, b), r in by_key.items() if b == batch_size)
        cells = [
            str(batch_size),
            _ms(ours),
            f"{any_row['floor_ms']:.3f}",
            f"{ours['roofline_fraction']:.2f}" if ours else "–",
        ] + [_ms(by_key.get((e, batch_size))) for e in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(row: dict[str, Any] | None) -> str:
    return "–" if row is None else f"{row['step_ms']:.3f}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
