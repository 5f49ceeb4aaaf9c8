"""GET /metrics on a fresh server after a known mix of requests: every counter, histogram count and
gauge agrees with what the clients were told (usage, finish reasons, error statuses)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adaptserve.server.config import AdmissionConfig, ServerConfig, parse_slos
from adaptserve.server.metrics import OUTCOMES
from tests.server.live import live_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
GREEDY = {"temperature": 0}
IGNORE_EOS = {"extra_body": {"ignore_eos": True}}
BLOCK_SIZE = 16  # the engine's default KV block

# knob values that differ from the defaults where they can, so the gauges show the configured ones
ENGINE_OPTIONS = {"max_num_seqs": 16, "long_prefill_token_threshold": 512}
ADMISSION = AdmissionConfig(max_waiting_requests=100, tiers=parse_slos("high=0.75,low=30"))
EXPECTED_KNOBS = {  # the engine's Knobs record (a choice is its index), then the server's admission
    "max_num_seqs": 16,
    "max_num_batched_tokens": 2048,
    "prefill_chunk": 512,  # from long_prefill_token_threshold
    "batch_wait_s": 0.0,
    "precision_policy": 0,  # native
    "kv_format": 0,  # bf16
    "spec_mode": 0,  # off
    "draft_len": 0,
    "kv_prefetch": 0,
    "parallelism": 0,  # single
    "admission_enabled": 1,
    "max_waiting_requests": 100,
    "max_waiting_tokens": 2**20,
    "ttft_slo_seconds_high": 0.75,
    "ttft_slo_seconds_normal": 5.0,
    "ttft_slo_seconds_low": 30.0,
}


class Scrape:
    """One /metrics page, parsed. The parser names counter families without `_total`; samples keep it,
    so lookups go by sample name."""

    def __init__(self, text: str):
        self.families = list(text_string_to_metric_families(text))
        self.samples = [sample for family in self.families for sample in family.samples]

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items()]
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
        return found[0]

    def names(self, prefix: str) -> set[str]:
        return {s.name for s in self.samples if s.name.startswith(prefix)}


def scrape(live) -> Scrape:
    response = httpx.get(f"{live.url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


@dataclass
class Traffic:
    """What the clients saw: finish reasons and error statuses per request, summed usage."""

    outcomes: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    num_requests: int = 0  # that reached the engine and finished
    num_sequences: int = 0  # their completions (n each)

    def add(self, usage, finish_reasons: list[str]) -> None:
        self.outcomes[finish_reasons[0]] += 1  # a request of n completions counts once
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.num_requests += 1
        self.num_sequences += len(finish_reasons)


@pytest.fixture(scope="module")
def live(smollm2):
    with live_server(smollm2, ServerConfig(admission=ADMISSION), **ENGINE_OPTIONS) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def traffic(live, client) -> tuple[Traffic, Scrape]:
    """A known mix of requests, sent one after another; then one scrape of /metrics."""
    seen = Traffic()
    messages = [{"role": "user", "content": "Name a colour."}]

    # a stop string, and an EOS, each ending a request with "stop"
    response = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=16, stop=[","], **GREEDY
    )
    assert response.choices[0].finish_reason == "stop"
    seen.add(response.usage, ["stop"])
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 2+2? Answer with one word."}],
        max_completion_tokens=64,
        **GREEDY,
    )
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens < 64
    seen.add(response.usage, ["stop"])

    for prompt, max_tokens in [("The sky is", 5), ("Once upon a time", 6), ("def main():", 7)]:
        response = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, **GREEDY, **IGNORE_EOS
        )
        assert response.usage.completion_tokens == max_tokens
        seen.add(response.usage, [c.finish_reason for c in response.choices])
    for max_tokens in (4, 5):
        response = client.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=max_tokens, **GREEDY, **IGNORE_EOS
        )
        assert response.usage.completion_tokens == max_tokens
        seen.add(response.usage, [c.finish_reason for c in response.choices])

    stream = client.completions.create(
        model=MODEL,
        prompt="Streaming is",
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
        **IGNORE_EOS,
    )
    chunks = list(stream)
    seen.add(chunks[-1].usage, [c.finish_reason for c in chunks[-2].choices])
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
        **IGNORE_EOS,
    )
    chunks = list(stream)
    seen.add(chunks[-1].usage, [c.finish_reason for c in chunks[-2].choices])

    response = client.completions.create(
        model=MODEL, prompt="Two answers:", max_tokens=4, n=2, **GREEDY, **IGNORE_EOS
    )
    assert len(response.choices) == 2 and response.usage.completion_tokens == 8
    seen.add(response.usage, [c.finish_reason for c in response.choices])

    with httpx.Client(base_url=live.v1, timeout=30) as http:
        for path, body, status in [
            ("/completions", {"model": MODEL, "prompt": "Hi", "temperature": -1}, 400),
            ("/chat/completions", {"model": MODEL, "messages": []}, 400),
            ("/completions", {"model": "gpt-4o", "prompt": "Hi"}, 404),
        ]:
            assert http.post(path, json=body).status_code == status
            seen.outcomes["invalid"] += 1

    assert seen.outcomes == {"stop": 2, "length": 8, "invalid": 3}
    return seen, scrape(live)


def test_every_metric_is_named_adaptserve(traffic):
    _, metrics = traffic
    assert metrics.families
    for family in metrics.families:
        assert family.name.startswith("adaptserve:"), family.name
        for sample in family.samples:
            assert sample.name.startswith("adaptserve:"), sample.name


def test_requests_by_outcome(traffic):
    seen, metrics = traffic
    for outcome in OUTCOMES:  # stop, length, invalid as sent; nothing aborted, rejected or failed
        assert metrics.value("adaptserve:requests_total", outcome=outcome) == seen.outcomes[outcome], outcome
    # the /health probes while the server loaded were not refused requests
    assert metrics.names("adaptserve:request_rejected_total") == set()


def test_token_counters_match_usage(traffic):
    seen, metrics = traffic
    assert metrics.value("adaptserve:prompt_tokens_total") == seen.prompt_tokens
    assert metrics.value("adaptserve:generation_tokens_total") == seen.completion_tokens


def test_latency_histograms_count_sequences_and_requests(traffic):
    seen, metrics = traffic
    assert seen.num_sequences == seen.num_requests + 1  # the n=2 request

    def count(name: str) -> float:
        return metrics.value(f"adaptserve:{name}_count")

    assert count("time_to_first_token_seconds") == seen.num_sequences  # one first token per sequence
    assert count("inter_token_latency_seconds") == seen.completion_tokens - seen.num_sequences
    assert count("e2e_request_latency_seconds") == seen.num_requests
    assert count("request_queue_time_seconds") == seen.num_requests
    assert count("request_time_per_output_token_seconds") == seen.num_requests  # each made > 1 token
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert metrics.value(f"adaptserve:{name}_bucket", le="+Inf") == count(name)
        assert metrics.value(f"adaptserve:{name}_sum") > 0


def test_gauges_idle_after_all_finished(traffic):
    _, metrics = traffic
    assert metrics.value("adaptserve:num_requests_running") == 0
    assert metrics.value("adaptserve:num_requests_waiting") == 0
    assert metrics.value("adaptserve:kv_cache_usage_perc") == 0


def test_knob_gauges_show_the_configured_values(traffic):
    _, metrics = traffic
    prefix = "adaptserve:knob_"
    assert metrics.names(prefix) == {prefix + name for name in EXPECTED_KNOBS}
    for name, value in EXPECTED_KNOBS.items():
        assert metrics.value(prefix + name) == value, name


def test_prefix_cache_hits_on_a_repeated_prompt(live, client, traffic, smollm2):
    words = "amber basalt cedar dune ember fjord garnet harbor iris juniper kelp lagoon meadow".split()
    prompt = "A unique inventory: " + " ".join(f"{w}-{i}" for i in range(8) for w in words)
    num_tokens = len(smollm2.tokenizer.encode(prompt))
    assert num_tokens > 8 * BLOCK_SIZE

    def send() -> tuple[float, float]:
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, **GREEDY)
        assert response.usage.prompt_tokens == num_tokens
        metrics = scrape(live)
        return (
            metrics.value("adaptserve:prefix_cache_queries_total"),
            metrics.value("adaptserve:prefix_cache_hits_total"),
        )

    before = scrape(live)
    queries0 = before.value("adaptserve:prefix_cache_queries_total")
    hits0 = before.value("adaptserve:prefix_cache_hits_total")
    queries1, hits1 = send()
    assert queries1 - queries0 == num_tokens
    assert hits1 == hits0  # never seen before
    queries2, hits2 = send()
    assert queries2 - queries1 == num_tokens
    # every full block of the prompt but the one holding its last token (which must be recomputed)
    assert num_tokens - 2 * BLOCK_SIZE < hits2 - hits1 < num_tokens
    assert scrape(live).value("adaptserve:prefix_cache_hit_rate") == pytest.approx(hits2 / queries2)


def test_gauges_idle_after_a_stop_string_ends_the_last_request(live, client, traffic):
    response = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=16, stop=[","], **GREEDY
    )
    assert response.choices[0].finish_reason == "stop"
    metrics = scrape(live)
    assert metrics.value("adaptserve:num_requests_running") == 0
    assert metrics.value("adaptserve:kv_cache_usage_perc") == 0


def test_precision_steps_count_the_engine_steps(traffic):
    _, metrics = traffic
    steps = metrics.value("adaptserve:precision_steps_total", precision="native")
    assert steps >= metrics.value("adaptserve:generation_tokens_total") / 16  # at most 16 rows a step
    assert metrics.value("adaptserve:precision_current", precision="native") == 1
    assert metrics.value("adaptserve:weight_format_bytes", format="native") > 100e6  # 135M params
