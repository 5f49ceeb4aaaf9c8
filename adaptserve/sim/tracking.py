"""What a streaming client would see of each request, taken from the engine's delta outputs: the
time of every chunk. Shared by the simulator and the real-engine replay, so both measure alike."""

from __future__ import annotations

from dataclasses import dataclass, field

from adaptserve.bench.metrics import RequestOutcome
from adaptserve.engine.request import RequestOutput


@dataclass(slots=True)
class RequestTrack:
    """One request from its arrival to its last chunk (times on the engine's clock)."""

    index: int  # position in the workload
    prompt_len: int
    output_len: int  # tokens asked for
    arrival_time: float
    chunk_times: list[float] = field(default_factory=list)  # one per delta output with tokens
    num_output_tokens: int = 0
    finish_time: float | None = None
    error: str = ""

    def on_output(self, output: RequestOutput, now: float) -> None:
        """A delta output of this request, read at `now`."""
        num_tokens = sum(len(c.token_ids) for c in output.outputs)
        if num_tokens:
            self.chunk_times.append(now)
            self.num_output_tokens += num_tokens
        if output.finished:
            self.finish_time = now

    def fail(self, error: str) -> None:
        self.error = error
        self.finish_time = self.arrival_time

    def chunks_by(self, t: float) -> int:
        """Chunks received by time `t`. A replica's steps do not overlap, so only the last chunk (of the
        step in progress at `t`) can lie after `t`."""
        late = bool(self.chunk_times) and self.chunk_times[-1] > t
        return len(self.chunk_times) - late

    def outcome(self, start_time: float = 0.0) -> RequestOutcome:
        """A RequestOutcome as `bench serve`'s client builds it: TTFT from the arrival to the first chunk,
        ITL between chunks, latency from the arrival to the last chunk, times relative to `start_time`."""
        outcome = RequestOutcome(success=False, prompt_len=self.prompt_len, error=self.error)
        outcome.start_time = self.arrival_time - start_time
        if self.error:
            return outcome
        if not self.chunk_times:
            outcome.error = "Never received a valid chunk to calculate TTFT."
            return outcome
        outcome.ttft = self.chunk_times[0] - self.arrival_time
        outcome.itl = [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]
        outcome.latency = self.chunk_times[-1] - self.arrival_time
        outcome.output_tokens = self.num_output_tokens
        outcome.success = True
        return outcome
