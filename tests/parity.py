"""Greedy parity against a reference, accepting a divergence only at a near-tie (as vLLM's
check_logprobs_close does): the two candidates' reference logprobs within `tie_tolerance`."""

from __future__ import annotations

import torch


def generate_reference(hf_model, prompts: list[list[int]], max_new_tokens: int):
    """transformers' greedy generate, one prompt at a time; returns (token ids, per-step logprobs)."""
    results = []
    for prompt in prompts:
        input_ids = torch.tensor([prompt], device=hf_model.device)
        out = hf_model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
        tokens = out.sequences[0, len(prompt) :].tolist()
        logprobs = [torch.log_softmax(s[0].float(), dim=-1) for s in out.scores]
        results.append((tokens, logprobs))
    return results


def check_greedy_close(ours: list[list[int]], reference, tie_tolerance: float = 1e-4, label: str = "") -> int:
    """Fail on any difference that is not a near-tie; return how many near-tie divergences were accepted."""
    accepted = 0
    for i, (our_tokens, (ref_tokens, ref_logprobs)) in enumerate(zip(ours, reference, strict=True)):
        assert len(our_tokens) == len(ref_tokens), (
            f"{label} prompt {i}: {len(our_tokens)} vs {len(ref_tokens)} tokens"
        )
        for pos, (a, b) in enumerate(zip(our_tokens, ref_tokens, strict=True)):
            if a == b:
                continue
            gap = abs(float(ref_logprobs[pos][a] - ref_logprobs[pos][b]))
            assert gap < tie_tolerance, (
                f"{label} prompt {i} diverges at token {pos}: ours {a}, reference {b}, reference logprob gap "
                f"{gap:.2e} >= {tie_tolerance}\n ours: {our_tokens}\n  ref: {ref_tokens}"
            )
            print(f"{label} prompt {i}: near-tie at token {pos} (gap {gap:.1e}); accepting the rest")
            accepted += 1
            break
    return accepted
