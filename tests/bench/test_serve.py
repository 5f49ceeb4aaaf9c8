"""`adaptserve bench serve` end to end: the real client against a real server on the embedded SmolLM2."""

import json

import pytest

from adaptserve.cli import build_parser
from adaptserve.server.config import AdmissionConfig, ServerConfig
from tests.server.live import live_server


@pytest.fixture(scope="module")
def server(smollm2):
    with live_server(smollm2, ServerConfig(admission=AdmissionConfig(enabled=False))) as live:
        yield live


def _args(url: str, tmp_path, *extra: str):
    argv = ["bench", "serve", "--base-url", url, "--result-dir", str(tmp_path), "--result-name", "serve-test"]
    argv += ["--disable-tqdm", "--seed", "3", *extra]
    return build_parser().parse_args(argv)


def _run(args):
    from adaptserve.bench.serve import run_serve_benchmark

    return run_serve_benchmark(args)


def test_rate_sweep_with_a_baseline_writes_vllm_keys_and_a_plot(server, tmp_path):
    args = _args(
        server.url,
        tmp_path,
        *("--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "4"),
        *("--num-prompts", "6", "--request-rate", "8,inf", "--ignore-eos"),
        *("--baseline", f"again={server.url}", "--goodput", "ttft:600000", "tpot:600000"),
    )
    payload = _run(args)
    saved = json.loads((tmp_path / "serve-test.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(payload["runs"]))
    assert saved["git_commit"] and saved["date"] and saved["command"] and saved["device"]
    assert saved["model"] == "SmolLM2-135M-Instruct"
    assert saved["workload"]["name"] == "random" and "uniform" in saved["workload"]["rule"]
    runs = saved["runs"]
    assert [(r["label"], r["request_rate"]) for r in runs] == [
        ("adaptserve", 8.0),
        ("again", 8.0),
        ("adaptserve", "inf"),
        ("again", "inf"),
    ]
    for run in runs:
        assert run["completed"] == 6 and run["failed"] == 0 and run["error_counts"] == {}
        assert run["total_input_tokens"] == 6 * 16
        assert run["total_output_tokens"] == 6 * 4  # from usage: ignore_eos gives exactly max_tokens
        assert run["output_throughput"] == pytest.approx(24 / run["duration"])
        assert run["request_goodput"] == pytest.approx(run["request_throughput"])  # generous SLOs
        assert len(run["ttfts"]) == 6 and all(
            0 < t < e for t, e in zip(run["ttfts"], run["e2els"], strict=True)
        )
        for key in ("mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "p90_e2el_ms", "std_ttft_ms"):
            assert run[key] > 0, key
        assert run["mean_ttft_ms"] <= run["mean_e2el_ms"]
    # at rate 8 the requests are spread out (seeded Gamma gaps); at inf they leave together
    assert max(runs[0]["start_times"]) > 0.05 and max(runs[2]["start_times"]) < 0.5
    assert (tmp_path / "serve-test.png").stat().st_size > 10_000


def test_chat_backend_and_a_saved_trace_replay(server, tmp_path):
    trace = tmp_path / "trace.jsonl"
    args = _args(
        server.url,
        tmp_path,
        *("--backend", "openai-chat", "--dataset-name", "sharegpt-synth", "--num-prompts", "3"),
        *("--request-rate", "20", "--save-trace", str(trace), "--no-plot", "--save-detailed"),
    )
    (run,) = _run(args)["runs"]
    assert run["completed"] == 3 and run["total_output_tokens"] > 0
    assert len(run["itls"]) == 3
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(lines) == 3 and all("prompt_token_ids" in line and "arrival_s" in line for line in lines)
    replay = _args(
        server.url,
        tmp_path,
        *("--dataset-name", "trace", "--dataset-path", str(trace), "--num-prompts", "3"),
        *("--no-plot", "--ignore-eos", "--random-output-len", "1"),
    )
    (run,) = _run(replay)["runs"]
    assert run["request_rate"] == "trace" and run["completed"] == 3
    assert run["total_output_tokens"] == sum(line["output_len"] for line in lines)
    assert run["arrivals"]["name"] == "trace"


def test_failed_requests_are_counted_not_fatal(server, tmp_path):
    # prompts longer than the server's window (2048) are refused with a 400: counted as failed
    args = _args(
        server.url,
        tmp_path,
        *("--dataset-name", "mixed", "--long-fraction", "0.5", "--long-min-len", "3000"),
        *("--long-max-len", "3000", "--num-prompts", "8", "--request-rate", "inf", "--no-plot"),
        *("--seed", "1"),
    )
    (run,) = _run(args)["runs"]
    assert run["failed"] > 0 and run["completed"] > 0 and run["completed"] + run["failed"] == 8
    assert run["error_counts"] == {"HTTP 400": run["failed"]}
    assert len(run["ttfts"]) == run["completed"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--request-rate", "0"), "--request-rate must be > 0"),
        (("--request-rate", "fast"), "not a number"),
        (("--baseline", "vllm"), "--baseline: expected NAME=http"),
        (("--goodput", "ttft=5"), "ttft=5"),
        (("--max-concurrency", "0"), "--max-concurrency must be >= 1"),
        (("--arrival", "weekly"), "weekly"),
        (("--dataset-name", "trace"), "--dataset-path"),
    ],
)
def test_bad_flags_name_the_flag(server, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        _run(_args(server.url, tmp_path, "--num-prompts", "2", "--no-plot", *extra))


def test_an_unreachable_server_fails_fast(tmp_path):
    with pytest.raises(ValueError, match="cannot reach an OpenAI-compatible server"):
        _run(_args("http://127.0.0.1:9", tmp_path, "--num-prompts", "2", "--no-plot"))
