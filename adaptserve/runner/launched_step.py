"""A step launched on the device whose sampled tokens the host reads later (async scheduling)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptserve.engine.outputs import RunnerOutput


@dataclass
class LaunchedStep:
    """The sampled ids of one step, on their way to the host. `result()` waits for them (the only
    wait on the device in a step), so the engine can schedule the next step before calling it."""

    request_ids: list[str]  # [N] in the order of the sampled rows
    host_token_ids: torch.Tensor | None = None  # [N] int64 on the host, filled once `ready` fires
    ready: torch.cuda.Event | None = None  # None: nothing is in flight
    output: RunnerOutput | None = None  # set when the sampler already waited (logprobs)

    @classmethod
    def done(cls, output: RunnerOutput) -> LaunchedStep:
        return cls(output.request_ids, output=output)

    @classmethod
    def copying(cls, request_ids: list[str], token_ids: torch.Tensor) -> LaunchedStep:
        """Start copying `token_ids` [N] (on the device) to the host without waiting for it."""
        if not token_ids.is_cuda:
            return cls(request_ids, host_token_ids=token_ids)
        host = token_ids.to("cpu", non_blocking=True)  # [N] pinned
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(token_ids.device))
        return cls(request_ids, host_token_ids=host, ready=ready)

    def result(self) -> RunnerOutput:
        if self.output is None:
            if self.ready is not None:
                self.ready.synchronize()
            token_ids = self.host_token_ids.tolist()
            self.output = RunnerOutput(self.request_ids, token_ids, [None] * len(token_ids))
        return self.output
