"""What each KV-cache format costs in quality, on the embedded SmolLM2 (CPU by default).

Quality (`measure_kv_quality`). The reference is the plain cache in the model's dtype (float32 on a CPU,
kv_format "bf16"). Each format runs in its own engine (kv_policy "static") built from the same
checkpoint, and is measured on the chat prompts and the fixed text of the weight-precision bench
(precision_quality.py):

- free-running agreement: its greedy replies against the reference's (`compare_free_running`);
- teacher-forced top-1 agreement with the reference's greedy replies (prompt + reply[:-1] scored, the
  positions that predict the reply), and the perplexity of the text in windows of `window` tokens.

A fresh prompt attends to its own exact K/V and never reads the cache, so scoring a sequence in one
forward pass would measure nothing. Both are scored in steps of `chunk` tokens instead: step j
computes tokens [j * chunk, (j + 1) * chunk) of every sequence in a pack, which attend to the earlier
steps' tokens (and their own) through the cache, in the measured format. The reference is scored the
same way over its plain cache, so every row differs from it only in the cache's format.

A whole-block format (int4k: keys per channel over a block's tokens) is never written a token at a
time, so it is measured as the engine holds it once cold blocks are requantized: generation runs the
engine as served (new tokens in int8, full blocks moved into int4k between steps, the newest block
kept); scoring writes each step's tokens into int8 blocks, and moves every block that step filled
into int4k before the next step reads it, so all full blocks are int4k and only each sequence's
partial last block stays int8.
Capacity is measured in kv_capacity.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from adaptserve.bench.precision_quality import (
    _generate,
    _perplexity,
    _Timer,
    chat_prompts,
    compare_free_running,
    text_tokens,
)
from adaptserve.bench.release import release_engine
from adaptserve.bench.runner_scoring import LOGIT_ROWS, scheduled_sequence
from adaptserve.config import CacheConfig
from adaptserve.engine.kv_cache.formats import FORMAT_CODES, KV_FORMATS, token_format
from adaptserve.model.loaders import LoadedCheckpoint
from adaptserve.runner.inputs import HostBatch, build_host_batch, to_device


@dataclass(frozen=True)
class KVQualitySpec:
    """What to measure; the defaults are the committed CPU run."""

    num_prompts: int = 50  # chat prompts: the first ones of data/chat_prompts.txt
    max_tokens: int = 48  # greedy reply length (shorter where the reference stops at EOS)
    num_text_tokens: int = 20480  # tokens of data/pydoc_topics.txt scored for perplexity
    window: int = 1024  # perplexity window
    chunk: int = 16  # tokens per scoring step: each step reads the earlier ones through the cache
    formats: tuple[str, ...] = ("fp8", "int8", "int4")  # measured beside the bf16 reference
    int4_group_size: int = 64  # channels per int4 KV scale/minimum
    device: str = "cpu"  # cpu | cuda | cuda:N
    forward_tokens: int = 2048  # most tokens per scoring step (sequences are packed up to it)


def measure_kv_quality(
    checkpoint: LoadedCheckpoint,
    spec: KVQualitySpec | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every quality measure of the module docstring; returns plain data. `log` gets a line per
    finished phase with its seconds."""
    spec = spec or KVQualitySpec()
    unknown = [f for f in spec.formats if f not in KV_FORMATS or f == "bf16"]
    if unknown:
        raise ValueError(f"KVQualitySpec.formats has {unknown}; measure some of {KV_FORMATS[1:]}")
    timed = _Timer(log or (lambda _: None))
    prompts = chat_prompts(checkpoint.tokenizer, spec.num_prompts)
    text_ids = text_tokens(checkpoint.tokenizer, spec.num_text_tokens)
    windows = [text_ids[i : i + spec.window] for i in range(0, len(text_ids), spec.window)]
    windows = [w for w in windows if len(w) > 1]  # a last window of one token predicts nothing
    sizes = _quality_sizes(prompts, windows, spec)

    llm = _quality_engine(checkpoint, spec, "bf16", sizes)
    reference = timed("bf16_generation", lambda: _generate(llm, prompts, spec.max_tokens))
    rows = {"bf16": _quality_row(llm, "bf16", prompts, reference, reference, windows, spec, timed)}
    for name in spec.formats:
        llm = _quality_engine(checkpoint, spec, name, sizes)
        replies = timed(f"{name}_generation", lambda llm=llm: _generate(llm, prompts, spec.max_tokens))
        rows[name] = _quality_row(llm, name, prompts, reference, replies, windows, spec, timed)
    base = rows["bf16"]
    for row in rows.values():
        row["delta_vs_bf16"] = {
            "teacher_forced_agreement": row["teacher_forced"]["agreement"]
            - base["teacher_forced"]["agreement"],
            "perplexity": row["perplexity"] - base["perplexity"],
            "perplexity_ratio": row["perplexity"] / base["perplexity"],
        }
    return {
        "reference": "the plain KV cache in the model's dtype (float32 on CPU), greedy",
        "settings": {
            **asdict(spec),
            "formats": list(spec.formats),
            "num_text_windows": len(windows),
            "num_reference_tokens": sum(len(r) for r in reference),
        },
        "formats": rows,
        "seconds": timed.seconds,
    }


def _quality_row(llm, name, prompts, reference, replies, windows, spec, timed) -> dict[str, Any]:
    """One format's numbers from its engine (which is released after)."""
    forced = [p + r[:-1] for p, r in zip(prompts, reference, strict=True)]
    runner = llm.engine.runner
    scored = timed(
        f"{name}_scoring",
        lambda: score_in_steps(runner, forced + windows, name, spec.chunk, spec.forward_tokens),
    )
    release_engine(llm)
    agree = total = 0
    for prompt, reply, (argmax, _) in zip(prompts, reference, scored[: len(prompts)], strict=True):
        predicted = argmax[len(prompt) - 1 :].tolist()  # row len(prompt) - 1 + i predicts reply[i]
        agree += sum(a == b for a, b in zip(predicted, reply, strict=True))
        total += len(reply)
    text = scored[len(prompts) :]
    nll = (sum(float(n.double().sum()) for _, n in text), sum(len(n) for _, n in text))
    return {
        "teacher_forced": {"agreement": agree / total, "tokens": total},
        "free_running": compare_free_running(reference, replies),
        **_perplexity(nll),
    }


@dataclass(frozen=True)
class _Sizes:
    max_model_len: int
    num_blocks: int
    max_num_batched_tokens: int


def _quality_sizes(prompts, windows, spec: KVQualitySpec, block_size: int = 16) -> _Sizes:
    """Room for every reply at once, or for one pack of the longest scored sequences."""
    longest = max(len(p) for p in prompts) + spec.max_tokens
    generation = -(-longest // block_size) * len(prompts)
    lengths = sorted([len(p) + spec.max_tokens for p in prompts] + [len(w) for w in windows], reverse=True)
    scoring = sum(-(-n // block_size) for n in lengths[: max(1, spec.forward_tokens // spec.chunk)])
    chunk_blocks = CacheConfig.kv_chunk_blocks  # whole chunks, so every engine has the same room
    num_blocks = -(-max(generation, scoring) // chunk_blocks) * chunk_blocks
    # every prompt in one step: a prompt split over steps would read the cache for its second part
    batched = max(spec.forward_tokens, sum(len(p) for p in prompts), longest)
    return _Sizes(max(longest, spec.window) + block_size, num_blocks, batched)


def _quality_engine(checkpoint, spec: KVQualitySpec, kv_format: str, sizes: _Sizes):
    from adaptserve import LLM

    return LLM.from_checkpoint(
        checkpoint,
        device=spec.device,
        dtype="float32",
        kv_format=kv_format,
        kv_policy="static",
        kv_int4_group_size=spec.int4_group_size,
        max_model_len=sizes.max_model_len,
        max_num_batched_tokens=sizes.max_num_batched_tokens,
        max_num_seqs=spec.num_prompts,
        num_blocks=sizes.num_blocks,
        # off: the scoring steps write KV blocks the engine's bookkeeping does not know of
        enable_prefix_caching=False,
        autotune="off",
    )


# ---- scoring in steps of `chunk` tokens, through the cache ------------------------------------------


@torch.inference_mode()
def score_in_steps(
    runner, sequences: list[list[int]], kv_format: str, chunk: int, forward_tokens: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence: (argmax [T], NLL of each next token [T - 1]), computed `chunk` tokens a step so
    every step reads the earlier ones from the cache, in `kv_format`. Up to forward_tokens // chunk
    sequences share a step. The runner's engine must be idle: every block is taken."""
    if min(len(s) for s in sequences) < 2:
        raise ValueError("each scored sequence needs >= 2 tokens")
    block_size, max_seqs = runner.block_size, max(1, forward_tokens // chunk)
    # a whole-block format: each sequence's unfilled blocks live in its token format until full
    per_pack = min(max_seqs, len(sequences)) * (-(-chunk // block_size) + 1)  # filling + a partial last
    num_staging = per_pack if token_format(kv_format) != kv_format else 0
    block_ids, staging = _claim_blocks(runner, kv_format, num_staging)
    results, pack, tables, next_block = [], [], [], 0
    for ids in sequences:
        num_blocks = -(-len(ids) // block_size)
        if num_blocks > len(block_ids):
            raise ValueError(
                f"a {len(ids)}-token sequence needs {num_blocks} KV blocks; the runner has {len(block_ids)}"
            )
        if pack and (len(pack) == max_seqs or next_block + num_blocks > len(block_ids)):
            results += _score_pack(runner, pack, tables, chunk, staging)
            pack, tables, next_block = [], [], 0
        pack.append(ids)
        tables.append(block_ids[next_block : next_block + num_blocks])
        next_block += num_blocks
    return results + _score_pack(runner, pack, tables, chunk, staging)


def _claim_blocks(runner, kv_format: str, num_staging: int = 0) -> tuple[list[int], list[int]]:
    """Hand the chunks of a compressed cache to `kv_format`, the first ones, enough for `num_staging`
    blocks, to its token format; the block ids usable in each."""
    compressed = runner.compressed_kv
    if compressed is None:
        if kv_format != "bf16":
            raise ValueError(f"kv_format={kv_format!r} needs a compressed cache; this runner's is plain")
        return list(range(runner.num_blocks)), []
    g = compressed.geometry
    staging_format = token_format(kv_format)
    num_staging_chunks = -(-num_staging // g.blocks_per_chunk[staging_format])
    if num_staging_chunks >= g.num_chunks:
        raise ValueError(
            f"{num_staging} {staging_format} blocks leave no chunk of {g.num_chunks} for {kv_format}"
        )
    formats = [staging_format] * num_staging_chunks + [kv_format] * (g.num_chunks - num_staging_chunks)
    compressed.chunk_formats[: g.num_chunks] = torch.tensor(
        [FORMAT_CODES[f] for f in formats]
    )  # padding: bf16
    ids = {name: [] for name in formats}
    for chunk, name in enumerate(formats):
        ids[name] += [chunk * g.max_blocks_per_chunk + index for index in range(g.blocks_per_chunk[name])]
    return ids[kv_format], ids.get(staging_format, []) if num_staging_chunks else []


def _score_pack(
    runner, sequences, tables, chunk: int, staging: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Score one pack. With `staging` blocks (a whole-block format), a block takes its tokens in a
    staging block and is moved to its own id (`tables`) once the step that fills it has run."""
    argmax = [torch.empty(len(ids), dtype=torch.long) for ids in sequences]
    nll = [torch.empty(len(ids) - 1) for ids in sequences]
    final_tables, tables = tables, [list(t) for t in tables]  # what each step reads: staged ids until moved
    free_staging, staged = list(staging), {}  # (sequence, block index) -> its staging block id
    block_size = runner.block_size
    for start in range(0, max(len(ids) for ids in sequences), chunk):
        if staging:
            for i, ids in enumerate(sequences):
                for b in range(start // block_size, -(-min(len(ids), start + chunk) // block_size)):
                    if (i, b) not in staged and start < len(ids):
                        staged[i, b] = tables[i][b] = free_staging.pop()
        scheduled = [
            scheduled_sequence(str(i), ids[start : start + chunk], start, tables[i], ids, [])
            for i, ids in enumerate(sequences)
            if len(ids) > start
        ]
        batch = build_host_batch(scheduled, runner.block_size)  # one-token rows move first
        targets = []  # the next token of each row, in batch order
        for seq in batch.sequences:
            num_rows = len(seq.token_ids)
            next_ids = sequences[int(seq.request_id)][start + 1 : start + num_rows + 1]
            targets += next_ids + [0] * (num_rows - len(next_ids))  # a sequence's last row: none (0)
        step_argmax, step_nll = _forward(runner, batch, targets)
        bounds = batch.query_start_loc.tolist()
        for seq, lo, hi in zip(batch.sequences, bounds[:-1], bounds[1:], strict=True):
            i = int(seq.request_id)
            argmax[i][start : start + hi - lo] = step_argmax[lo:hi]
            num_predicted = min(hi - lo, len(sequences[i]) - 1 - start)
            nll[i][start : start + num_predicted] = step_nll[lo : lo + num_predicted]
        if staging:
            _move_full_blocks(runner, sequences, start + chunk, staged, tables, final_tables, free_staging)
    return list(zip(argmax, nll, strict=True))


def _move_full_blocks(runner, sequences, num_written, staged, tables, final_tables, free_staging) -> None:
    """Requantize every staged block that `num_written` tokens of its sequence fill into its own
    (whole-block format) id, as the engine's cold-block moves do, and free its staging block."""
    block_size, moves = runner.block_size, []
    for (i, b), src in list(staged.items()):
        if (b + 1) * block_size <= min(len(sequences[i]), num_written):
            moves.append((src, final_tables[i][b]))
            tables[i][b] = final_tables[i][b]
            free_staging.append(src)
            del staged[i, b]
    if moves:
        runner.compressed_kv.apply([], moves)


def _forward(runner, batch: HostBatch, targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One step through the model: each row's argmax [T] and NLL of its target [T], on the host."""
    inputs = to_device(batch, runner.device)
    runner.attention.begin_step(inputs.attn)
    hidden = runner.model(
        inputs.input_ids,
        inputs.positions,
        runner.kv_caches,
        inputs.attn,
        runner.attention,
        runner.precision.fixed,
    )  # [T, H]
    targets = torch.tensor(targets, device=hidden.device)  # [T]
    argmax = torch.empty_like(targets)  # [T]
    nll = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)  # [T]
    for lo in range(0, len(targets), LOGIT_ROWS):
        logits = runner.model.compute_logits(hidden[lo : lo + LOGIT_ROWS], runner.precision.fixed)  # [R, V]
        rows = slice(lo, lo + len(logits))
        argmax[rows] = logits.argmax(dim=-1)
        nll[rows] = -torch.log_softmax(logits, dim=-1).gather(1, targets[rows, None])[:, 0]
    return argmax.cpu(), nll.cpu()


def summary_table(quality: dict[str, Any] | None = None, capacity: dict[str, Any] | None = None) -> str:
    """The results as compact markdown tables."""
    tables = []
    if quality:
        header = [
            "KV format",
            "teacher-forced agr.",
            "free-run agr. to div.",
            "identical",
            "perplexity",
            "Δ ppl",
        ]
        rows = [
            [
                name,
                f"{row['teacher_forced']['agreement']:.4f}",
                f"{row['free_running']['agreement_to_divergence']:.4f}",
                f"{row['free_running']['identical']:.2f}",
                f"{row['perplexity']:.4f}",
                f"{row['delta_vs_bf16']['perplexity']:+.4f}",
            ]
            for name, row in quality["formats"].items()
        ]
        tables.append(_markdown(header, rows))
    if capacity:
        header = ["KV format", "layout", "bytes/token/layer", "blocks", "peak running", "saturated mean"]
        header += ["preemptions", "reserve chunks", "peak vs bf16", "saturated vs bf16"]
        rows = [
            [
                name,
                row["layout"],
                f"{row['kv_bytes_per_token_per_layer']:.0f}",
                str(row["num_blocks"]),
                str(row["peak_running"]),
                f"{row['saturated_mean_running']:.1f}",
                str(row["num_preemptions"]),
                str(row["reserve_chunks"]),
                f"{row['peak_vs_bf16']:.2f}x" if "peak_vs_bf16" in row else "",
                f"{row['saturated_vs_bf16']:.2f}x" if "saturated_vs_bf16" in row else "",
            ]
            for name, row in capacity["formats"].items()
        ]
        tables.append(_markdown(header, rows))
    return "\n\n".join(tables)


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
