"""Where a batch-1 request's time goes outside its decode steps (issue 9's end-to-end tokens/s).

On the H200 `bench spec` at batch 1 spent ~31 ms per request beyond its decode steps (0.094 s of a
0.30 s pass of three prompts), in every setting alike, and one timed pass in three ran without it.
This runs the same three chats one at a time, several passes, and prints per request: wall time,
the time before the first step, each non-decode step (prompt chunks) and the first decode steps,
the gaps between steps, and the time after the last; then Python's garbage collections in the pass.
No JSON: a tool for finding overhead.

    python scripts/request_overhead.py --model smollm2-135m --dtype float32
"""

from __future__ import annotations

import argparse
import gc
import time

from adaptserve import LLM, SamplingParams
from adaptserve.bench.spec import grounded_conversations
from adaptserve.model.loaders import load_checkpoint


class Recorder:
    def __init__(self):
        self.steps = []

    def record(self, stats) -> None:
        self.steps.append((time.monotonic(), stats))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--freeze", action="store_true", help="gc.freeze() after building the engine")
    parser.add_argument("--spec", default="", help="e.g. ngram:4 for fixed n-gram speculation")
    parser.add_argument(
        "--graph-prompt-tokens",
        type=int,
        default=64,
        help="kernels.cuda_graph_prompt_tokens (0: eager prompts)",
    )
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.model, progress=False)
    options = {"cuda_graph_prompt_tokens": args.graph_prompt_tokens}
    if args.spec:
        method, k = args.spec.split(":")
        options |= {"spec_method": method, "num_speculative_tokens": int(k), "spec_adaptive": False}
    llm = LLM.from_checkpoint(
        checkpoint, max_num_seqs=64, dtype=args.dtype, kv_cache_memory_gib=4.0, **options
    )
    conversations = grounded_conversations(3)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    if checkpoint.tokenizer is None:  # a preset: prompts of the chats' lengths, as token ids
        lengths = (260, 250, 230)
        prompts = [[100 + (7 * i + j) % 5000 for j in range(n)] for i, n in enumerate(lengths)]

        def one(i: int):
            return llm.generate([prompts[i]], params, use_tqdm=False)
    else:

        def one(i: int):
            return llm.chat([conversations[i]], params, use_tqdm=False)

    recorder = Recorder()
    llm.engine.stat_loggers.append(recorder)
    collections = []
    gc.callbacks.append(lambda phase, info: collections.append((time.monotonic(), phase, info["generation"])))
    if args.freeze:  # the startup heap out of the collector's sight (adaptserve/engine/heap.py)
        gc.collect()
        gc.freeze()
    for p in range(args.passes):
        collections.clear()
        pass_start = time.perf_counter()
        for i in range(3):
            recorder.steps.clear()
            t0 = time.monotonic()
            one(i)
            t1 = time.monotonic()
            steps = recorder.steps
            # drafts count as prefill tokens: a verify step is a decode step
            prompt = [s for _, s in steps if s.num_prefill_tokens > s.num_draft_tokens]
            decode = [s for _, s in steps if s.num_scheduled_tokens and s not in prompt]
            first = steps[0][1].start_time if steps else t1
            last_end = steps[-1][0] if steps else t1
            step_sum = sum(s.step_time for _, s in steps)
            print(
                f"pass {p} request {i}: wall {1e3 * (t1 - t0):7.2f} ms, before first step "
                f"{1e3 * (first - t0):6.2f}, after last step {1e3 * (t1 - last_end):6.2f}, "
                f"{len(steps)} steps (prompt {len(prompt)}, decode {len(decode)}), "
                f"step_time sum {1e3 * step_sum:7.2f} ms"
            )
            for j, (_, s) in enumerate(steps[:4]):
                print(
                    f"    step {j}: {s.num_scheduled_tokens:4d} tokens (prompt {s.num_prefill_tokens:4d}, "
                    f"cache hits {s.prefix_cache_hits:4d}) step_time {1e3 * s.step_time:7.3f} "
                    f"execute {1e3 * s.execute_time:7.3f}"
                )
            gaps = [steps[j + 1][1].start_time - steps[j][1].start_time for j in range(len(steps) - 1)]
            if gaps:
                worst = sorted(range(len(gaps)), key=gaps.__getitem__)[-3:]
                print("    longest start-to-start gaps:", [(j, round(1e3 * gaps[j], 3)) for j in worst])
        starts = [t for t, ph, _ in collections if ph == "start"]
        stops = [(t, g) for t, ph, g in collections if ph == "stop"]
        pauses = [(g, 1e3 * (t - t0)) for t0, (t, g) in zip(starts, stops, strict=False)]
        print(
            f"pass {p}: {1e3 * (time.perf_counter() - pass_start):.1f} ms; gc: {len(pauses)} collections, "
            f"{sum(ms for _, ms in pauses):.2f} ms in all; by generation (count, ms):",
            {
                g: (sum(1 for h, _ in pauses if h == g), round(sum(ms for h, ms in pauses if h == g), 2))
                for g in (0, 1, 2)
            },
        )


if __name__ == "__main__":
    main()
