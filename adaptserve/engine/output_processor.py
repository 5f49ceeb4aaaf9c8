"""Text side of generation: stop strings, detokenization, and folding n siblings into one output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from adaptserve.engine.request import CompletionOutput, Request, RequestOutput

if TYPE_CHECKING:
    from adaptserve.model.tokenizer import Tokenizer


def find_stop_string(request: Request, tokenizer: Tokenizer | None) -> bool:
    """If the output text now contains a stop string, cut the text there and return True."""
    stops = request.sampling_params.stop
    if not stops or tokenizer is None:
        return False
    # a new match ends in the last token, and a stop of L characters spans at most L tokens: decode
    # only that tail each step (decoding the whole output every step would be quadratic)
    longest = max(len(s) for s in stops)
    tail = tokenizer.decode(request.output_token_ids[-(longest + 4) :])
    if not any(stop in tail for stop in stops):
        return False
    text = tokenizer.decode(request.output_token_ids)
    window = len(tail) + longest
    for stop in stops:
        at = text.find(stop, max(0, len(text) - window))
        if at >= 0:
            keep = at + len(stop) if request.sampling_params.include_stop_str_in_output else at
            request.output_text = text[:keep]
            request.stop_reason = stop
            return True
    return False


def finalize_text(request: Request, tokenizer: Tokenizer | None) -> None:
    if request.stop_reason is None or isinstance(request.stop_reason, int):
        request.output_text = tokenizer.decode(request.output_token_ids) if tokenizer else ""


def completion_output(index: int, request: Request) -> CompletionOutput:
    logprobs = request.output_logprobs if request.sampling_params.logprobs is not None else None
    cumulative = None
    if logprobs:
        cumulative = sum(lp[tok] for lp, tok in zip(logprobs, request.output_token_ids, strict=False))
    return CompletionOutput(
        index,
        request.output_text,
        list(request.output_token_ids),
        request.status.finish_reason,
        request.stop_reason,
        logprobs,
        cumulative,
    )


@dataclass
class ParentRequest:
    """A user request whose n completions run as n sibling requests sharing the prompt's blocks."""

    request_id: str
    prompt: str | None
    child_ids: list[str]
    children: dict[str, Request] = field(default_factory=dict)

    def is_finished(self) -> bool:
        return all(c.status.is_finished for c in self.children.values())

    def output(self) -> RequestOutput:
        children = [self.children[cid] for cid in self.child_ids]
        first = children[0]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=[completion_output(i, c) for i, c in enumerate(children)],
            finished=self.is_finished(),
            num_cached_tokens=max(first.num_cached_tokens, 0),
        )
