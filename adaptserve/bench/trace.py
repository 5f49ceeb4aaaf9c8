"""Trace files: replay your own traffic. JSON Lines, one request per line, in arrival order.

Each line has the output length and one way to give the prompt; the arrival time is optional:

    {"arrival_s": 0.00, "prompt_len": 812, "output_len": 128}
    {"arrival_s": 0.37, "prompt_token_ids": [1, 3923, 374], "output_len": 64}
    {"arrival_s": 0.91, "prompt": "Summarize this: ...", "output_len": 200}
    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48]}

- time: `arrival_s` (seconds) or `timestamp` (milliseconds, as in Mooncake's traces), taken relative
  to the first line. Without times on every line the arrival process of the run decides.
- prompt: `prompt_token_ids`, `prompt` (text; needs a tokenizer to count it), or a length
  (`prompt_len` / `input_length`) filled with random ids. With `hash_ids` (Mooncake) the prompt is
  built from blocks of `block_tokens` ids, one block per hash id, so lines that share hash ids share
  their prefix exactly as in the original trace.
- output: `output_len` or `output_length`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adaptserve.bench.workloads import BenchRequest, random_ids


@dataclass(frozen=True)
class TraceWorkload:
    """The requests of a trace file; `requests(num, seed)` takes the first `num` lines."""

    path: str
    vocab_size: int
    block_tokens: int = 512  # tokens per Mooncake hash id
    count_tokens: Callable[[str], int] | None = None  # for text prompts

    def requests(self, num: int, seed: int) -> list[BenchRequest]:
        lines = _read_lines(Path(self.path))
        if num > len(lines):
            raise ValueError(f"num_prompts={num} but the trace {self.path} has only {len(lines)} requests")
        rng = np.random.default_rng(seed)
        requests = [self._request(record, where, rng) for where, record in lines[:num]]
        times = [r.arrival_s for r in requests]
        if any(t is None for t in times):
            for r in requests:
                r.arrival_s = None
        else:
            first = times[0]
            for r in requests:
                r.arrival_s = r.arrival_s - first
            if any(b < a for a, b in zip(times, times[1:], strict=False)):
                raise ValueError(f"trace {self.path}: arrival times must not decrease")
        return requests

    def describe(self) -> dict[str, Any]:
        return {"name": "trace", "rule": f"replayed from {self.path}", "path": self.path}

    def _request(self, record: dict[str, Any], where: str, rng: np.random.Generator) -> BenchRequest:
        output_len = _first(record, ("output_len", "output_length"), where)
        if not isinstance(output_len, int) or output_len < 1:
            raise ValueError(f"{where}: output_len must be an integer >= 1, got {output_len!r}")
        prompt = self._prompt(record, where, rng)
        if isinstance(prompt, str):
            if self.count_tokens is None:
                raise ValueError(
                    f"{where}: a text prompt needs a tokenizer (--tokenizer) to count its tokens"
                )
            prompt_len = self.count_tokens(prompt)
        else:
            prompt_len = len(prompt)
        return BenchRequest(prompt, prompt_len, output_len, arrival_s=_arrival(record, where))

    def _prompt(self, record: dict[str, Any], where: str, rng: np.random.Generator) -> list[int] | str:
        if "prompt_token_ids" in record:
            ids = record["prompt_token_ids"]
            if not ids or not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids):
                raise ValueError(f"{where}: prompt_token_ids must be non-empty ids in [0, {self.vocab_size})")
            return ids
        if "prompt" in record:
            return str(record["prompt"])
        length = _first(record, ("prompt_len", "input_length"), where)
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"{where}: prompt_len must be an integer >= 1, got {length!r}")
        if "hash_ids" in record:
            ids = [tok for h in record["hash_ids"] for tok in self._block(int(h))]
            if len(ids) < length:
                ids += random_ids(rng, length - len(ids), self.vocab_size)
            return ids[:length]
        return random_ids(rng, length, self.vocab_size)

    def _block(self, hash_id: int) -> list[int]:
        """The same ids for the same hash id, in every line and every run."""
        return random_ids(np.random.default_rng([hash_id, 0x5EED]), self.block_tokens, self.vocab_size)


def save_trace(path: str | Path, requests: Sequence[BenchRequest], arrival_times: Sequence[float]) -> None:
    """Write requests and their arrival times as a trace that replays exactly (token ids kept)."""
    with open(path, "w", encoding="utf-8") as f:
        for request, t in zip(requests, arrival_times, strict=True):
            record: dict[str, Any] = {"arrival_s": round(float(t), 6)}
            if isinstance(request.prompt, str):
                record["prompt"] = request.prompt
            else:
                record["prompt_token_ids"] = request.prompt
            record["output_len"] = request.output_len
            f.write(json.dumps(record) + "\n")


def _read_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    if not path.is_file():
        raise ValueError(f"trace file {path} does not exist")
    lines = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: each line must be a JSON object")
            lines.append((where, record))
    if not lines:
        raise ValueError(f"trace file {path} holds no requests")
    return lines


def _first(record: dict[str, Any], keys: tuple[str, ...], where: str) -> Any:
    for key in keys:
        if key in record:
            return record[key]
    raise ValueError(f"{where}: missing {' or '.join(keys)}")


def _arrival(record: dict[str, Any], where: str) -> float | None:
    if "arrival_s" in record:
        value = record["arrival_s"]
    elif "timestamp" in record:
        value = record["timestamp"] / 1000.0 if isinstance(record["timestamp"], (int, float)) else None
    else:
        return None
    if not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{where}: arrival_s/timestamp must be a number >= 0, got {value!r}")
    return float(value)
