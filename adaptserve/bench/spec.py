"""`adaptserve bench spec`: speculative decoding on input-grounded prompts, over a load sweep.

Prompts ask the model to reproduce or edit a given text or code (copy a passage of the Python
reference, fix a typo in it, rename a variable in a function), the tasks prompt lookup serves. For
each batch size and each setting (no speculation, n-gram with every fixed k, the adaptive policy) the
same prompts run greedily to `max_tokens`; a row records tokens/s, target forward passes per
generated token, drafted and accepted tokens, and whether the output equals the run without
speculation token for token. JSON and a plot go to docs/benchmarks/spec-<device>.json.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from importlib import resources

from tqdm import tqdm

from adaptserve.bench.results import DEFAULT_MODEL_LABEL, write_results
from adaptserve.engine.request import SamplingParams
from adaptserve.engine.stats import StepStats
from adaptserve.kernel_args import kernel_options, precision_options
from adaptserve.runner.cuda_graphs import graph_captures

_CODE = """def mean_and_spread(values):
    total = 0.0
    for value in values:
        total += value
    average = total / len(values)
    squares = 0.0
    for value in values:
        squares += (value - average) ** 2
    return average, (squares / len(values)) ** 0.5
"""


def add_spec_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", default="1,4,16", help="comma-separated concurrent requests")
    parser.add_argument(
        "--batch1-prompts",
        type=int,
        default=3,
        help="at batch size 1, this many prompts (one per task) run one after another",
    )
    parser.add_argument("--draft-lens", default="1,2,4,8", help="fixed k settings to compare")
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens generated per request")
    parser.add_argument(
        "--layer-drafts", default="", help="self-speculative settings as depth:k, comma-separated (e.g. 24:4)"
    )
    parser.add_argument(
        "--adaptive-method",
        default="auto",
        choices=["auto", "ngram"],
        help="drafters the adaptive setting has",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed passes per setting, interleaved across settings (median kept)",
    )
    parser.add_argument(
        "--warm-passes",
        type=int,
        default=1,
        help="untimed passes per engine before timing: kernels compile, the adaptive policy learns "
        "(a served engine has seen many; every setting gets the same number)",
    )
    parser.add_argument("--result-dir", default="docs/benchmarks")


def grounded_conversations(count: int) -> list[list[dict]]:
    """`count` input-grounded chats: copy, correct or edit a given passage or function."""
    text = resources.files("adaptserve.bench").joinpath("data/pydoc_topics.txt").read_text(encoding="utf-8")
    passages = [p.strip() for p in text.split("\n\n") if 300 <= len(p.strip()) <= 900]
    tasks = (
        "Copy the following text exactly, word for word:\n\n{p}",
        "Correct any spelling mistakes in this text and return the whole text:\n\n{p}",
        "Rename the variable `total` to `running_sum` in this code and print the whole code:\n\n{c}",
    )
    chats = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        passage = passages[(i * 7) % len(passages)].replace(" the ", " teh ", 1)
        chats.append([{"role": "user", "content": task.format(p=passage, c=_CODE)}])
    return chats


class _StepRecorder:
    def __init__(self):
        self.steps: list[StepStats] = []

    def record(self, stats: StepStats) -> None:
        self.steps.append(stats)


def build_engine(checkpoint, waves: list[list], max_tokens: int, options: dict, warm_passes: int = 1):
    """An engine for one setting, warmed up on the same workload (`warm_passes` untimed passes):
    kernels compile, and the adaptive policy measures its options, as it would while serving."""
    from adaptserve import LLM

    llm = LLM.from_checkpoint(checkpoint, max_num_seqs=max(64, *map(len, waves)), **options)
    for _ in range(warm_passes):
        for wave in waves:
            llm.chat(wave, _greedy(max_tokens), use_tqdm=False)
    return llm


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)  # stops at EOS: the answer, no filler


def waves_of(conversations: list, batch: int) -> list[list]:
    """The chats a pass runs, as waves run one after another: at batch 1, each of
    `conversations` alone (several prompts, one at a time: one answer of ~70 tokens was too
    thin a sample for the batch-1 claim); else all of them at once."""
    return [[c] for c in conversations] if batch == 1 else [conversations]


def run_setting(llm, waves: list[list], max_tokens: int) -> tuple[dict, list[list[int]]]:
    """One timed pass: each wave of chats at once, the waves one after another; returns the row and
    the generated ids."""
    params = _greedy(max_tokens)
    recorder = _StepRecorder()
    llm.engine.stat_loggers.append(recorder)
    captures = graph_captures(llm.engine.runner)
    seconds, token_ids, steps, pure, pure_seconds, prompt_seconds = 0.0, [], [], [], 0.0, 0.0
    for wave in waves:
        recorder.steps.clear()
        start = time.perf_counter()
        outputs = llm.chat(wave, params, use_tqdm=False)
        seconds += time.perf_counter() - start
        token_ids += [c.token_ids for o in outputs for c in o.outputs]
        wave_steps = [s for s in recorder.steps if s.num_scheduled_tokens]
        # decoding alone, without the prefill every setting shares: from the end of the last step that
        # computed prompt tokens to the end of the wave (wall clock, so async scheduling counts right)
        last_prompt = max(i for i, s in enumerate(wave_steps) if s.num_prefill_tokens > s.num_draft_tokens)
        prompt_end, wave_end = (s.start_time + s.step_time for s in (wave_steps[last_prompt], wave_steps[-1]))
        steps += wave_steps
        prompt_seconds += sum(s.step_time for s in wave_steps[: last_prompt + 1])
        pure += wave_steps[last_prompt + 1 :]
        pure_seconds += wave_end - prompt_end
    llm.engine.stat_loggers.remove(recorder)
    generated = sum(len(t) for t in token_ids)
    drafted = sum(s.num_draft_tokens for s in steps)
    accepted = sum(s.num_accepted_tokens for s in steps)
    row = {
        "seconds": round(seconds, 4),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / seconds, 2),
        "decode_tokens_per_s": round(sum(s.num_generation_tokens for s in pure) / pure_seconds, 2),
        # where a pass's time goes besides decoding, to tell a slow pass from a slow setting: the
        # prompt steps, the longest step, and CUDA graphs captured on demand during the pass
        "prompt_steps_ms": round(1e3 * prompt_seconds, 3),
        "longest_step_ms": round(1e3 * max(s.step_time for s in steps), 3),
        "graph_captures": graph_captures(llm.engine.runner) - captures,
        "forward_passes": len(steps),
        # each decoding sequence in a step is one target pass over its next token(s)
        "passes_per_token_per_seq": round(
            sum(s.num_decode_sequences for s in pure) / max(1, sum(s.num_generation_tokens for s in pure)), 4
        ),
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
        "verify_steps": sum(1 for s in steps if s.num_drafts),
        # the policy's choice per decode step, "drafter k" (the adaptive setting's mix)
        "arms": dict(Counter(_arm_of(s) for s in pure)),
    }
    speculator = llm.engine.speculator
    if speculator is not None and speculator.policy.adaptive:
        row["trace"] = _arm_runs(pure)
        row["policy"] = speculator.policy.describe()
    return row, token_ids


def _arm_of(step: StepStats) -> str:
    """The policy's choice for a step: "drafter k", or "off"."""
    return f"{step.drafter} {step.draft_len}" if step.draft_len else "off"


def _arm_runs(steps: list[StepStats]) -> list[list]:
    """The policy's choices, run-length coded: [decoding sequences, arm, steps] per run."""
    runs: list[list] = []
    for s in steps:
        arm = _arm_of(s)
        if runs and runs[-1][:2] == [s.num_decode_sequences, arm]:
            runs[-1][2] += 1
        else:
            runs.append([s.num_decode_sequences, arm, 1])
    return runs


def base_engine_options(args: argparse.Namespace, on_gpu: bool) -> dict:
    """What every setting's engine shares: device, dtype, the kernel flags (--no-cuda-graphs,
    --cuda-graph-pieces, --async-scheduling, ...) and the weight-precision flags; each setting adds its
    speculation options. Every setting of a batch size holds an engine at once, so each gets a fixed
    KV budget rather than a share of the device: 1 GiB on the CPU (23k tokens of SmolLM2 in float32;
    five engines at the 2 GiB default filled half this VM's memory, and the last one built ran its
    same steps 18 % slower), 4 GiB on a GPU."""
    return {
        "device": args.device,
        "dtype": args.dtype,
        **kernel_options(args),
        **precision_options(args),
        "kv_cache_memory_gib": 4.0 if on_gpu else 1.0,
    }


def run_spec_benchmark(args: argparse.Namespace) -> None:
    import torch

    from adaptserve.model.loaders import load_checkpoint

    if args.warm_passes < 1:
        raise ValueError(f"--warm-passes must be at least 1 (kernels compile in it), got {args.warm_passes}")
    checkpoint = load_checkpoint(args.model, progress=False)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    draft_lens = [int(k) for k in args.draft_lens.split(",")]
    settings = [("off", {})]
    fixed = {"spec_method": "ngram", "spec_adaptive": False}
    settings += [(f"ngram k={k}", {**fixed, "num_speculative_tokens": k}) for k in draft_lens]
    for entry in filter(None, args.layer_drafts.split(",")):
        depth, k = (int(v) for v in entry.split(":"))
        layers = {"spec_method": "layers", "draft_layers": depth, "num_speculative_tokens": k}
        settings.append((f"layers{depth} k={k}", {**layers, "spec_adaptive": False}))
    adaptive = {"spec_method": args.adaptive_method, "num_speculative_tokens": max(draft_lens)}
    settings.append(("adaptive", {**adaptive, "spec_adaptive": True}))
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    base = base_engine_options(args, on_gpu)
    device = torch.device("cuda" if on_gpu else "cpu")
    rows, path = [], None
    with tqdm(total=len(batch_sizes) * len(settings) * args.repeats, desc="bench spec") as bar:
        for batch in batch_sizes:
            conversations = grounded_conversations(args.batch1_prompts if batch == 1 else batch)
            waves = waves_of(conversations, batch)
            engines = {
                name: build_engine(checkpoint, waves, args.max_tokens, {**base, **options}, args.warm_passes)
                for name, options in settings
            }
            passes = {name: [] for name, _ in settings}
            # interleaved, so drift in the machine's speed hits every setting, and rotated, so no
            # setting always runs first or last in a round
            for repeat in range(args.repeats):
                shift = repeat % len(settings)
                for name, _ in settings[shift:] + settings[:shift]:
                    passes[name].append(run_setting(engines[name], waves, args.max_tokens))
                    bar.set_postfix_str(f"batch {batch} {name}: {passes[name][-1][0]['tokens_per_s']} tok/s")
                    bar.update()
            del engines
            reference = passes["off"][0][1]
            for name, _ in settings:
                row = _median_pass(passes[name])
                row.update(setting=name, batch_size=batch, repeats=args.repeats)
                row["identical_to_off"] = all(ids == reference for _, ids in passes[name])
                rows.append(row)
            _add_speedups(rows)
            payload = {
                "model": args.model or DEFAULT_MODEL_LABEL,
                "max_tokens": args.max_tokens,
                "warm_passes": args.warm_passes,
                "batch_sizes": batch_sizes,
                "rows": rows,
            }
            # written after each batch size, so a run cut short keeps the rows it has
            path = write_results("spec", device, payload, args.result_dir)
    print(f"wrote {path}")
    for r in rows:
        print(
            f"batch {r['batch_size']:>3} {r['setting']:>12}: {r['tokens_per_s']:>8} tok/s "
            f"x{r['speedup_vs_off']:<6} decode {r['decode_tokens_per_s']:>8} tok/s "
            f"x{r['decode_speedup_vs_off']:<6} "
            f"passes/token {r['passes_per_token_per_seq']:<7} "
            f"accept {r['acceptance_rate']} identical {r['identical_to_off']} | passes "
            f"{r['tokens_per_s_passes']} tok/s, longest step {r['longest_step_ms_passes']} ms, "
            f"captures {r['graph_captures_passes']}"
        )
    from adaptserve.bench.plot import plot_after_run

    plot_after_run(path)


def _median_pass(passes: list[tuple[dict, list[list[int]]]]) -> dict:
    """The timed pass with the median tokens/s, with every pass's tokens/s, longest step and graph
    captures beside it (in the order the passes ran)."""
    ordered = sorted((row for row, _ in passes), key=lambda r: r["tokens_per_s"])
    row = dict(ordered[len(ordered) // 2])
    for key in ("tokens_per_s", "longest_step_ms", "graph_captures"):
        row[f"{key}_passes"] = [r[key] for r, _ in passes]
    return row


def _add_speedups(rows: list[dict]) -> None:
    for batch in {r["batch_size"] for r in rows}:
        at_batch = [r for r in rows if r["batch_size"] == batch]
        off = next(r for r in at_batch if r["setting"] == "off")
        for r in at_batch:
            r["speedup_vs_off"] = round(r["tokens_per_s"] / off["tokens_per_s"], 3)
            r["decode_speedup_vs_off"] = round(r["decode_tokens_per_s"] / off["decode_tokens_per_s"], 3)
