"""`adaptserve bench precision`: how much each weight format and the adaptive precision policy change
what the model says, against its full-precision run, on the embedded SmolLM2 (CPU by default).

The reference is the native weights in float32. Each policy runs in its own engine built from the same
checkpoint and is compared with the reference on:

- teacher-forced top-1 agreement: the reference's greedy reply to each chat prompt is fed to the model,
  and each position's argmax is compared with the reference token. Feeding the reference tokens keeps
  one early divergence from making every later token disagree. A fixed format scores prompt + reply
  in one forward pass in that format.
- free-running agreement: the policy generates greedily on its own and its reply is compared with the
  reference's token by token up to and including the first divergence (`agreement_to_divergence`),
  position by position over the whole reply (`positional_match`), and as a whole (`identical`).
- perplexity of a fixed text (data/pydoc_topics.txt) cut into windows of `window` tokens: exp of the
  mean NLL over every predicted token; each window sees only its own tokens.

The adaptive policy picks a precision per decode step, so it is measured as the engine runs it, one
request at a time (each step's precision is that reply's own): free-running through the engine, and
teacher-forced by driving the runner with hand-made scheduler outputs (the prompt, then one reference
token per step; the runner's own controller picks and shadows every step). Both runs start from a
fresh engine and report the precision of each token's step, the switches and the shadowed agreement.
They shadow every low-precision step (`shadow_rate` 1.0, where the engine's default of 0.1 would sample
only a few of them): a shadow runs before the served pass, which rewrites the KV cache, so shadowing
changes what is served only through the quality guardrail, which acts once it has enough samples.
The adaptive top level runs the native weights (no bf16 copy is held), so "native" in its mix is that
level. It has no perplexity: the precision of a token depends on the decode steps before it.

The embedded SmolLM2 is GGUF Q4_1 dequantized: its weights already lie on a 4-bit grid with a scale and
a minimum per 32 weights. int4 with `int4_group_size` 32 falls on that grid and gives the native
numbers back, so the engine's default group of 128 is what the int4 row measures.

The native row's free-running and perplexity numbers are the reference's own (1.0 and equal by
construction); its teacher-forced agreement is measured, and falls short of 1.0 only at float32
near-ties between the prefill pass and the decode steps that made the reference.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adaptserve.bench.release import release_engine
from adaptserve.bench.runner_scoring import scheduled_sequence, score_sequences
from adaptserve.config import WEIGHT_FORMATS, PrecisionConfig
from adaptserve.engine.outputs import SchedulerOutput
from adaptserve.engine.request import SamplingParams
from adaptserve.model.loaders import LoadedCheckpoint
from adaptserve.model.projection import NATIVE

DATA_DIR = Path(__file__).parent / "data"
TEXT_FILE = DATA_DIR / "pydoc_topics.txt"
PROMPTS_FILE = DATA_DIR / "chat_prompts.txt"


@dataclass(frozen=True)
class QualitySpec:
    """What to measure; the defaults are the committed CPU run."""

    num_prompts: int = 50  # chat prompts: the first ones of data/chat_prompts.txt (60 there)
    max_tokens: int = 48  # greedy reply length (shorter where the reference stops at EOS)
    num_text_tokens: int = 20480  # tokens of data/pydoc_topics.txt scored for perplexity
    window: int = 1024  # perplexity window
    formats: tuple[str, ...] = WEIGHT_FORMATS  # fixed formats measured beside the native row
    adaptive: bool = True  # measure the adaptive policy
    adaptive_teacher_forced: bool = True  # also teacher-force it (as long again as its free run)
    int4_group_size: int = 128  # weights per int4 scale/zero group
    quantize_lm_head: bool = False  # the LM head in each format too (--quantize-lm-head)
    quality_budget: float = PrecisionConfig.quality_budget  # the adaptive policy's agreement budget
    shadow_rate: float = 1.0  # share of its low-precision steps shadowed: all, to measure every one
    device: str = "cpu"  # cpu | cuda | cuda:N
    forward_tokens: int = 2048  # tokens per scoring forward pass (sequences are packed up to it)


def measure_precision_quality(
    checkpoint: LoadedCheckpoint, spec: QualitySpec | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Every measure of the module docstring; returns plain data (the JSON payload). `log` gets a line
    per finished phase with its seconds."""
    spec = spec or QualitySpec()
    timed = _Timer(log or (lambda _: None))
    prompts = chat_prompts(checkpoint.tokenizer, spec.num_prompts)
    text_ids = text_tokens(checkpoint.tokenizer, spec.num_text_tokens)
    windows = [text_ids[i : i + spec.window] for i in range(0, len(text_ids), spec.window)]
    windows = [w for w in windows if len(w) > 1]  # a last window of one token predicts nothing
    sizes = _sizes(prompts, spec)

    llm = _engine(checkpoint, spec, "native", sizes)
    reference = timed("reference_generation", lambda: _generate(llm, prompts, spec.max_tokens))
    reference_nll = timed("reference_perplexity", lambda: _text_nll(llm, windows, spec))
    rows = {
        "native": _format_row(
            llm, "native", prompts, reference, windows, spec, timed, (reference, reference_nll)
        )
    }
    for name in spec.formats:
        rows[name] = _format_row(
            _engine(checkpoint, spec, name, sizes), name, prompts, reference, windows, spec, timed
        )
    result: dict[str, Any] = {
        "reference": "the model's native weights, float32, greedy",
        "settings": {
            **asdict(spec),
            "prompts_file": PROMPTS_FILE.name,
            "text_file": TEXT_FILE.name,
            "text_sha256": hashlib.sha256(TEXT_FILE.read_bytes()).hexdigest(),
            "num_text_windows": len(windows),
            "num_reference_tokens": sum(len(r) for r in reference),
        },
        "formats": rows,
    }
    if spec.adaptive:
        result["adaptive"] = _measure_adaptive(checkpoint, spec, sizes, prompts, reference, timed)
    result["seconds"] = timed.seconds
    return result


class _Timer:
    """`timed(name, fn)` runs fn and keeps its seconds under name."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = fn()
        self.seconds[name] = round(time.perf_counter() - start, 1)
        self.log(f"{name}: {self.seconds[name]:.1f} s")
        return value


def _format_row(llm, name, prompts, reference, windows, spec, timed, measured=None) -> dict[str, Any]:
    """One fixed format's numbers, then its engine is released. `measured`: (replies, text NLL) already
    taken with these weights (the reference's own, for the native row)."""
    replies, nll = measured or (
        timed(f"{name}_generation", lambda: _generate(llm, prompts, spec.max_tokens)),
        timed(f"{name}_perplexity", lambda: _text_nll(llm, windows, spec)),
    )
    forced = timed(f"{name}_teacher_forced", lambda: _teacher_forced(llm, prompts, reference, spec))
    release_engine(llm)
    return {
        "teacher_forced": forced,
        "free_running": compare_free_running(reference, replies),
        **_perplexity(nll),
    }


def chat_prompts(tokenizer, num_prompts: int) -> list[list[int]]:
    """The first `num_prompts` messages of data/chat_prompts.txt in the chat template, as token ids."""
    messages = [
        line.strip() for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    if not 1 <= num_prompts <= len(messages):
        raise ValueError(
            f"num_prompts={num_prompts} must be in [1, {len(messages)}] (lines of {PROMPTS_FILE})"
        )
    return [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True),
            add_special_tokens=False,  # the template writes its own special tokens
        )
        for m in messages[:num_prompts]
    ]


def text_tokens(tokenizer, num_tokens: int) -> list[int]:
    """The first `num_tokens` tokens of data/pydoc_topics.txt."""
    ids = tokenizer.encode(TEXT_FILE.read_text(encoding="utf-8"), add_special_tokens=False)
    if not 2 <= num_tokens <= len(ids):
        raise ValueError(f"num_text_tokens={num_tokens} must be in [2, {len(ids)}] (tokens of {TEXT_FILE})")
    return ids[:num_tokens]


def compare_free_running(reference: list[list[int]], replies: list[list[int]]) -> dict[str, float | int]:
    """Free-running replies against the reference's, prompt by prompt.

    agreement_to_divergence: matching tokens / tokens compared, comparing each reply up to and including
    its first divergence (later tokens follow a different context); positional_match: matching tokens /
    reference tokens, position by position over the whole reply; identical: share of identical replies.
    """
    matched = compared = positional = total = num_identical = 0
    first_divergences = []
    for ref, reply in zip(reference, replies, strict=True):
        common = _first_divergence(ref, reply)
        if reply == ref:
            num_identical += 1
            matched, compared = matched + len(ref), compared + len(ref)
        else:
            first_divergences.append(common)
            matched, compared = matched + common, compared + min(common + 1, len(ref))
        positional += sum(a == b for a, b in zip(ref, reply, strict=False))
        total += len(ref)
    return {
        "agreement_to_divergence": matched / compared,
        "positional_match": positional / total,
        "identical": num_identical / len(reference),
        "mean_first_divergence": sum(first_divergences) / len(first_divergences)
        if first_divergences
        else None,
        "tokens_compared": compared,
    }


# ---- engines ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sizes:
    max_model_len: int
    num_blocks: int
    max_num_seqs: int


def _sizes(prompts: list[list[int]], spec: QualitySpec, block_size: int = 16) -> _Sizes:
    """Context window and KV blocks for every run: all replies at once, or one packed scoring pass."""
    longest = max(len(p) for p in prompts) + spec.max_tokens
    max_model_len = max(longest, spec.window, spec.forward_tokens) + block_size
    per_reply = -(-longest // block_size)
    scoring = -(-max(spec.forward_tokens, spec.window) // block_size) + len(prompts)  # a partial block each
    return _Sizes(max_model_len, max(per_reply * len(prompts), scoring) + 1, len(prompts))


def _engine(checkpoint: LoadedCheckpoint, spec: QualitySpec, policy: str, sizes: _Sizes):
    from adaptserve import LLM

    return LLM.from_checkpoint(
        checkpoint,
        device=spec.device,
        dtype="float32",
        precision_policy=policy,
        int4_group_size=spec.int4_group_size,
        quantize_lm_head=spec.quantize_lm_head,
        quality_budget=spec.quality_budget,
        shadow_rate=spec.shadow_rate,
        max_model_len=sizes.max_model_len,
        max_num_batched_tokens=max(2048, sizes.max_model_len),
        max_num_seqs=sizes.max_num_seqs,
        num_blocks=sizes.num_blocks,
        # off: the scoring passes below write KV blocks the engine's bookkeeping does not know of
        enable_prefix_caching=False,
        autotune="off",
    )


def _generate(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


# ---- scoring passes: prompt + reply or a text window in one forward pass ----------------------------


def _teacher_forced(llm, prompts, reference, spec: QualitySpec) -> dict[str, float | int]:
    """Share of reply positions where the served format's argmax is the reference token."""
    sequences = [p + r[:-1] for p, r in zip(prompts, reference, strict=True)]
    scored = score_sequences(llm.engine.runner, sequences, spec.forward_tokens)
    agree = total = 0
    for prompt, reply, (argmax, _) in zip(prompts, reference, scored, strict=True):
        predicted = argmax[len(prompt) - 1 :].tolist()  # row len(prompt) - 1 + i predicts reply[i]
        agree += sum(a == b for a, b in zip(predicted, reply, strict=True))
        total += len(reply)
    return {"agreement": agree / total, "tokens": total}


def _text_nll(llm, windows: list[list[int]], spec: QualitySpec) -> tuple[float, int]:
    """(sum of NLL in nats, tokens predicted) over the text windows, in the served format."""
    scored = score_sequences(llm.engine.runner, windows, spec.forward_tokens)
    return sum(float(nll.double().sum()) for _, nll in scored), sum(len(nll) for _, nll in scored)


def _perplexity(nll: tuple[float, int]) -> dict[str, float | int]:
    total, count = nll
    return {"mean_nll": total / count, "perplexity": math.exp(total / count), "text_tokens_predicted": count}


# ---- the adaptive policy, step by step ------------------------------------------------------------


def _measure_adaptive(checkpoint, spec, sizes, prompts, reference, timed) -> dict[str, Any]:
    """Free-running, then teacher-forced, each in a fresh adaptive engine, one request at a time."""
    llm = _engine(checkpoint, spec, "adaptive", sizes)
    levels = [_label(llm, p) for p in llm.engine.runner.precision.controller.config.available]
    replies, steps = timed("adaptive_generation", lambda: _generate_one_by_one(llm, prompts, spec.max_tokens))
    diverged = [  # the precision of the step that made each reply's first other token
        run[_first_divergence(ref, reply)]
        for ref, reply, run in zip(reference, replies, steps, strict=True)
        if reply != ref and _first_divergence(ref, reply) < len(run)
    ]
    free_running = {
        **compare_free_running(reference, replies),
        "divergences_by_precision": _labelled(llm, Counter(diverged)),
        **_run_report(llm, steps),
    }
    release_engine(llm)
    result = {"levels": levels, "free_running": free_running}
    if spec.adaptive_teacher_forced:
        llm = _engine(checkpoint, spec, "adaptive", sizes)
        predicted, steps = timed(
            "adaptive_teacher_forced", lambda: _teacher_forced_steps(llm, prompts, reference)
        )
        result["teacher_forced"] = {
            **_forced_agreement(llm, predicted, reference, steps),
            **_run_report(llm, steps),
        }
        release_engine(llm)
    return result


def _forced_agreement(llm, predicted, reference, steps) -> dict[str, Any]:
    """Teacher-forced agreement, overall and by the precision of the step."""
    hits = [
        (precision, token == ref_token)
        for tokens, ref, run in zip(predicted, reference, steps, strict=True)
        for token, ref_token, precision in zip(tokens, ref, run, strict=True)
    ]
    by_precision = {}
    for precision, count in Counter(p for p, _ in hits).items():
        agreed = sum(ok for p, ok in hits if p == precision)
        by_precision[_label(llm, precision)] = {"tokens": count, "agreement": agreed / count}
    agreed = sum(ok for _, ok in hits)
    return {"agreement": agreed / len(hits), "tokens": len(hits), "agreement_by_precision": by_precision}


def _generate_one_by_one(llm, prompts, max_tokens) -> tuple[list[list[int]], list[list[str]]]:
    """Each prompt alone through the engine; the reply and the precision of each token's step."""
    engine, params = llm.engine, SamplingParams(temperature=0.0, max_tokens=max_tokens)
    replies, steps = [], []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"adaptive-{i}", prompt, params)
        request = engine.scheduler.requests[f"adaptive-{i}"]
        precisions = []
        while engine.has_unfinished_requests():
            engine.step()  # one sequence, a prompt shorter than the token budget: one token a step
            precisions.append(engine.runner.precision.last_precision)
        if len(precisions) != len(request.output_token_ids):
            raise RuntimeError(f"{len(precisions)} steps made {len(request.output_token_ids)} tokens")
        replies.append(list(request.output_token_ids))
        steps.append(precisions)
    return replies, steps


def _teacher_forced_steps(llm, prompts, reference) -> tuple[list[list[int]], list[list[str]]]:
    """Each prompt alone through the runner: the prompt step, then one reference token per decode step;
    the greedy token of each step and the precision it was served in."""
    runner = llm.engine.runner
    predicted, steps = [], []
    for prompt, reply in zip(prompts, reference, strict=True):
        block_ids = list(range(-(-(len(prompt) + len(reply)) // runner.block_size)))
        tokens, precisions = [], []
        for i in range(len(reply)):
            new = prompt if i == 0 else reply[i - 1 : i]
            num_computed = 0 if i == 0 else len(prompt) + i - 1
            seq = scheduled_sequence("forced", new, num_computed, block_ids, prompt, reply[:i])
            output = runner.execute(SchedulerOutput([seq], len(new)))
            tokens.append(output.sampled_token_ids[0])
            precisions.append(runner.precision.last_precision)
        predicted.append(tokens)
        steps.append(precisions)
    return predicted, steps


def _run_report(llm, steps: list[list[str]]) -> dict[str, Any]:
    """Precision mix (all tokens, and decode steps only: each reply's first token comes from its prompt
    step, always the top level), switches and the shadowed agreement of one adaptive run."""
    precision = llm.engine.runner.precision
    tokens = Counter(s for run in steps for s in run)
    decode = Counter(s for run in steps for s in run[1:])
    shadowed = precision.num_shadowed_tokens
    return {
        "tokens_by_precision": _labelled(llm, tokens),
        "decode_steps_by_precision": _labelled(llm, decode),
        "decode_share_low_precision": 1
        - decode[precision.controller.config.available[0]] / max(1, decode.total()),
        "switches": precision.controller.num_switches,
        "shadowed_tokens": shadowed,
        "shadow_agreement": precision.num_shadow_agreements / shadowed if shadowed else None,
        "quality_breaches": precision.quality.num_breaches,
    }


def _first_divergence(ref: list[int], reply: list[int]) -> int:
    return next(
        (i for i, (a, b) in enumerate(zip(ref, reply, strict=False)) if a != b), min(len(ref), len(reply))
    )


def _label(llm, precision: str) -> str:
    """The adaptive top level "bf16" runs the native weights when no bf16 copy is held."""
    return NATIVE if precision not in llm.engine.runner.format_bytes else precision


def _labelled(llm, counts: Counter) -> dict[str, int]:
    return {_label(llm, p): n for p, n in counts.items()}
