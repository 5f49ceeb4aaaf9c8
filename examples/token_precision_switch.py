"""Watch the adaptive precision policy choose a weight format for every generated token.

    python examples/token_precision_switch.py                     # embedded SmolLM2 on the CPU
    python examples/token_precision_switch.py --device cuda --prompt "Name ten animals."

One request runs alone through the engine with `precision_policy="adaptive"`. After each engine step the
runner's precision policy (`engine.runner.precision`) tells which format served the step
(`last_precision`) and the confidence signals of that step's logits (`last_signals`: top-1 probability,
entropy, top-2 logit margin; `last_score`: the combined score the controller reads to pick the next
step's format). Each line shows the token, those signals and the format that computed the token.

At the end: the precision mix, the switches with their reasons, the shadowed top-1 agreement (a sample
of low-precision steps re-run at the top level), and the time per token against the same prompt at a
fixed precision. On a CPU, fp8 and int4 are emulated (the weights are converted on every step), so
they are slower than the native weights there; the speed-up is a GPU matter.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass

from adaptserve import LLM, SamplingParams
from adaptserve.model.loaders import load_checkpoint

DEFAULT_PROMPT = "List the numbers from 1 to 20, one per line."


@dataclass
class TokenStep:
    token_id: int
    precision: str  # the format that computed this token's logits
    seconds: float  # the engine step that produced it
    max_prob: float | None = None
    entropy: float | None = None
    margin: float | None = None
    score: float | None = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF folder or .gguf file; default: embedded SmolLM2")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--baseline", default="native", choices=["native", "bf16", "fp8", "int4"])
    parser.add_argument("--quality-budget", type=float, default=0.99)
    parser.add_argument("--shadow-rate", type=float, default=0.1)
    args = parser.parse_args()

    checkpoint = load_checkpoint(args.model, progress=False)
    tokenizer = checkpoint.tokenizer
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}], add_generation_prompt=True
    )
    prompt_ids = tokenizer.encode(chat, add_special_tokens=False)
    options = {"device": args.device, "max_model_len": 2048}
    adaptive = LLM.from_checkpoint(
        checkpoint,
        precision_policy="adaptive",
        quality_budget=args.quality_budget,
        shadow_rate=args.shadow_rate,
        **options,
    )
    print(f"prompt: {args.prompt!r} ({len(prompt_ids)} tokens with the chat template)\n")
    print(f"{'#':>3} {'token':<16} {'max p':>6} {'entropy':>7} {'margin':>6} {'score':>6}  precision")
    steps = generate_step_by_step(adaptive, prompt_ids, args.max_tokens, tokenizer, show=True)
    report_adaptive(adaptive, steps)
    del adaptive

    fixed = LLM.from_checkpoint(checkpoint, precision_policy=args.baseline, **options)
    baseline = generate_step_by_step(fixed, prompt_ids, args.max_tokens, tokenizer, show=False)
    same = sum(a.token_id == b.token_id for a, b in zip(steps, baseline, strict=False))
    print(f"\ntime per token (decode steps; the prompt step apart), {args.device}:")
    for name, run in (("adaptive", steps), (f"fixed {args.baseline}", baseline)):
        decode = [s.seconds for s in run[1:]]
        per_token = sum(decode) / max(1, len(decode))
        print(
            f"  {name:<14} {per_token * 1e3:7.1f} ms/token over {len(decode)} tokens, prompt step "
            f"{run[0].seconds * 1e3:.0f} ms"
        )
    print(f"  same tokens as the fixed {args.baseline} run at {same} of {len(baseline)} positions")


def generate_step_by_step(llm: LLM, prompt_ids, max_tokens, tokenizer, show: bool) -> list[TokenStep]:
    """One request alone; one engine step per token (the prompt fits one step). `show`: print each token."""
    engine = llm.engine
    precision = engine.runner.precision
    engine.add_request("watch", list(prompt_ids), SamplingParams(temperature=0.0, max_tokens=max_tokens))
    request = engine.scheduler.requests["watch"]
    steps: list[TokenStep] = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        step = TokenStep(request.output_token_ids[-1], precision.peek(), time.perf_counter() - start)
        if precision.controller is not None:  # adaptive: what the step's logits said
            signals = precision.last_signals
            step.precision = _label(engine, precision.last_precision)
            step.max_prob, step.entropy = float(signals.max_prob[0]), float(signals.entropy[0])
            step.margin, step.score = float(signals.margin[0]), precision.last_score
        if show:
            switched = " <- switch" if steps and steps[-1].precision != step.precision else ""
            text = repr(tokenizer.decode([step.token_id], skip_special_tokens=False))
            print(
                f"{len(steps):>3} {text:<16} {step.max_prob:6.3f} {step.entropy:7.3f} {step.margin:6.2f} "
                f"{step.score:6.3f}  {step.precision}{switched}"
            )
        steps.append(step)
    return steps


def report_adaptive(llm: LLM, steps: list[TokenStep]) -> None:
    precision = llm.engine.runner.precision
    controller = precision.controller
    mix = Counter(s.precision for s in steps[1:])
    shares = ", ".join(f"{name} {n} ({n / max(1, mix.total()):.0%})" for name, n in mix.most_common())
    print(f"\nprecision mix over {mix.total()} decode steps: {shares}")
    print(f"  (the first token comes from the prompt step, always at the top level: {steps[0].precision})")
    print(f"switches: {controller.num_switches}")
    for step, name, reason in controller.history:
        print(f"  after token {step}: -> {_label(llm.engine, name)} ({reason})")
    shadowed = precision.num_shadowed_tokens
    if shadowed:
        agreement, budget = precision.num_shadow_agreements / shadowed, precision.quality.budget
        print(f"shadow agreement: {agreement:.1%} of {shadowed} shadowed tokens (budget {budget:.0%})")
    else:
        print("shadow agreement: no step was shadowed (only low-precision steps are, at the shadow rate)")


def _label(engine, name: str) -> str:
    """The adaptive top level "bf16" runs the native weights when no bf16 copy is held."""
    return name if name in engine.runner.format_bytes else "native"


if __name__ == "__main__":
    main()
