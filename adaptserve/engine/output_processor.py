"""Text side of generation: stop strings, detokenization, and folding n siblings into one output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from adaptserve.engine.detokenizer import IncrementalDetokenizer
from adaptserve.engine.request import CompletionOutput, Request, RequestOutput
from adaptserve.engine.stats import FinishedRequestStats

if TYPE_CHECKING:
    from adaptserve.model.tokenizer import Tokenizer


def find_stop_string(request: Request, text: str, num_checked_chars: int) -> bool:
    """If `text` (the output so far, from the request's incremental detokenizer) now holds a stop
    string, cut the output text there and return True. Text before `num_checked_chars` held none, so
    only its tail is searched."""
    stops = request.sampling_params.stop
    if not stops:
        return False
    start = max(0, num_checked_chars - max(len(s) for s in stops) + 1)
    for stop in stops:
        at = text.find(stop, start)
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
class StreamCursor:
    """How much of one streamed completion has been handed out."""

    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    finish_sent: bool = False


@dataclass
class ParentRequest:
    """A user request whose n completions run as n sibling requests sharing the prompt's blocks.

    Not streamed: one cumulative output when every completion has finished. Streamed: after each step,
    a delta output with what each completion added (text, token ids, logprobs) since the last one."""

    request_id: str
    prompt: str | None
    child_ids: list[str]
    children: dict[str, Request] = field(default_factory=dict)
    stream: bool = False
    cursors: dict[str, StreamCursor] = field(default_factory=dict)  # streamed: per child
    # per child that streams or has stop strings: its text as it grows, shared by both
    detokenizers: dict[str, IncrementalDetokenizer] = field(default_factory=dict)

    def is_finished(self) -> bool:
        return all(c.status.is_finished for c in self.children.values())

    def output(self) -> RequestOutput:
        children = [self.children[cid] for cid in self.child_ids]
        return self._output([completion_output(i, c) for i, c in enumerate(children)])

    def delta_output(self) -> RequestOutput | None:
        """What the completions added since the last call; None when nothing new can be sent yet."""
        deltas = []
        for index, child_id in enumerate(self.child_ids):
            cursor = self.cursors.setdefault(child_id, StreamCursor())
            delta = _completion_delta(index, self.children[child_id], cursor, self.detokenizers.get(child_id))
            if delta is not None:
                deltas.append(delta)
        return self._output(deltas) if deltas else None

    def _output(self, completions: list[CompletionOutput]) -> RequestOutput:
        first = self.children[self.child_ids[0]]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=completions,
            finished=self.is_finished(),
            num_cached_tokens=max(first.num_cached_tokens, 0),
        )

    def finished_stats(self, now: float) -> FinishedRequestStats:
        children = list(self.children.values())
        first = children[0]
        statuses = {c.status.finish_reason for c in children}
        scheduled = [c.first_scheduled_time for c in children if c.first_scheduled_time is not None]
        decode_times = [
            (c.last_token_time - c.first_token_time) / (c.num_output_tokens - 1)
            for c in children
            if c.num_output_tokens > 1 and c.first_token_time is not None
        ]
        return FinishedRequestStats(
            finish_reason="abort" if "abort" in statuses else first.status.finish_reason or "abort",
            num_prompt_tokens=first.num_prompt_tokens,
            num_generation_tokens=sum(c.num_output_tokens for c in children),
            e2e_latency=now - first.arrival_time,
            queue_time=(min(scheduled) if scheduled else now) - first.arrival_time,
            time_per_output_token=sum(decode_times) / len(decode_times) if decode_times else None,
        )


def _completion_delta(
    index: int, request: Request, cursor: StreamCursor, detokenizer: IncrementalDetokenizer | None
) -> CompletionOutput | None:
    if cursor.finish_sent:
        return None
    finished = request.status.is_finished
    if finished:
        text = request.output_text  # final: cut at a stop string if one matched
    elif detokenizer is not None:
        text = detokenizer.text  # brought up to date by the engine this step
        stops = request.sampling_params.stop
        if stops:  # hold back what could still grow into a stop string, which must never be sent
            text = text[: max(0, len(text) - (max(len(s) for s in stops) - 1))]
    else:
        text = ""
    new_tokens = request.output_token_ids[cursor.num_sent_tokens :]
    new_text = text[cursor.num_sent_chars :]
    if not new_tokens and not new_text and not finished:
        return None
    logprobs = None
    if request.sampling_params.logprobs is not None:
        logprobs = request.output_logprobs[cursor.num_sent_tokens :]
    cursor.num_sent_tokens = request.num_output_tokens
    cursor.num_sent_chars = max(cursor.num_sent_chars, len(text))
    cursor.finish_sent = finished
    return CompletionOutput(
        index, new_text, new_tokens, request.status.finish_reason, request.stop_reason, logprobs
    )
