"""Offline API shaped like vLLM's: `LLM(model=None).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from adaptserve.config import EngineConfig
from adaptserve.engine.engine import LLMEngine
from adaptserve.engine.request import RequestOutput, SamplingParams
from adaptserve.model.loaders import LoadedCheckpoint

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """An engine in this process. `model`: None (embedded SmolLM2), a HF folder, a .gguf file or a
    preset name; other keyword arguments are engine options (see adaptserve.config), e.g.
    `LLM(dtype="bfloat16", max_num_seqs=32, enable_prefix_caching=False)`."""

    def __init__(self, model: str | None = None, **engine_options: Any):
        self._init(EngineConfig.from_flat(model=model, **engine_options), None)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: LoadedCheckpoint,
        *,
        clock: Callable[[], float] = time.monotonic,
        **engine_options: Any,
    ) -> LLM:
        """An engine over weights already in memory (tests and benchmarks reuse one load). `clock`:
        the engine's time source instead of time.monotonic (a benchmark's virtual clock)."""
        llm = cls.__new__(cls)
        llm._init(EngineConfig.from_flat(model=checkpoint.source, **engine_options), checkpoint, clock)
        return llm

    def _init(
        self,
        config: EngineConfig,
        checkpoint: LoadedCheckpoint | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.engine = LLMEngine(config, checkpoint=checkpoint, clock=clock)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion in one continuous batch; outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        request_ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, p, priority=priority[i] if priority else 0)
                request_ids.append(request_id)
        except Exception:
            for request_id in request_ids:  # one bad prompt rejects the batch: drop those already queued
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids, use_tqdm and len(prompts) > 1)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer and so no chat template")
        # the template writes its own special tokens, so none are added when encoding
        prompts = [
            self.tokenizer.encode(
                self.tokenizer.apply_chat_template(c, add_generation_prompt=True), add_special_tokens=False
            )
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], show_progress: bool) -> list[RequestOutput]:
        outputs: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="generating", unit="req", disable=not show_progress) as bar:
            try:
                while self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        outputs[output.request_id] = output
                        bar.update(1)
            except BaseException:  # an error or Ctrl-C mid-step: free what this call queued, then re-raise
                for request_id in request_ids:
                    self.engine.abort_request(request_id)
                raise
        return [outputs[r] for r in request_ids]
