"""`adaptserve bench plot`: every benchmark kind draws a real PNG from small hand-made JSON files."""

import argparse
import json
import random
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from adaptserve.bench.plot import PLOTTERS, add_plot_args, plot_file, run_plot  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADER = {"device": "test device", "date": "2026-11-22", "git_commit": "abc1234", "command": "pytest"}


def write_json(tmp_path: Path, name: str, record: dict) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(record), encoding="utf-8")
    return path


def assert_png(path: Path) -> None:
    assert path.exists()
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 10_000


def serve_run(label: str, rate, num_requests: int = 40, seed: int = 0, failed: bool = False) -> dict:
    rng = random.Random(seed)
    num_ok = 0 if failed else num_requests
    ttfts = [rng.uniform(0.05, 0.5) * (1 + seed / 10) for _ in range(num_ok)]
    e2els = [t + rng.uniform(1.0, 3.0) for t in ttfts]
    itls = [[rng.uniform(0.01, 0.03) for _ in range(8)] for _ in range(num_ok)]
    run = {
        "label": label,
        "request_rate": rate,
        "burstiness": 1.0,
        "duration": 10.0,
        "completed": num_ok,
        "failed": num_requests - num_ok,
        "request_throughput": (4.5 if rate == "inf" else rate) * num_ok / num_requests,
        "request_goodput": None,
        "output_throughput": 50.0
        * (4.5 if rate == "inf" else rate)
        * num_ok
        / num_requests
        / (1 + seed / 10),
        "ttfts": ttfts,
        "e2els": e2els,
        "itls": itls,
        "input_lens": [128] * num_ok,
        "output_lens": [64] * num_ok,
        "start_times": [i * 0.25 for i in range(num_ok)],
        "errors": [""] * num_ok,
    }
    for metric, scale in (("ttft", 300.0), ("tpot", 20.0), ("itl", 20.0), ("e2el", 2000.0)):
        for stat, factor in (("mean", 1.0), ("median", 0.9), ("std", 0.2), ("p90", 1.5), ("p99", 2.0)):
            run[f"{stat}_{metric}_ms"] = 0.0 if failed else scale * factor * (1 + seed / 10)
    return run


def serve_record(runs: list[dict]) -> dict:
    return {
        "benchmark": "serve",
        **HEADER,
        "model": "SmolLM2-135M-Instruct",
        "workload": {"name": "sharegpt", "rule": "random"},
        "arrivals": {"name": "poisson"},
        "runs": runs,
    }


def test_serve_sweep(tmp_path):
    """Two labels x three rates; the baseline's last run is at rate "inf" (placed at its achieved rate)."""
    rates = {"adaptserve": (1, 2, 4), "vllm": (1, 2, "inf")}
    runs = [
        serve_run(label, rate, seed=3 * j + i)
        for j, label in enumerate(rates)
        for i, rate in enumerate(rates[label])
    ]
    path = write_json(tmp_path, "serve-sweep", serve_record(runs))
    pngs = plot_file(path)
    assert pngs == [tmp_path / "serve-sweep.png"]
    assert_png(pngs[0])


def test_serve_single_unlimited_run(tmp_path):
    path = write_json(tmp_path, "serve-inf", serve_record([serve_run("adaptserve", "inf")]))
    (png,) = plot_file(path, tmp_path / "out")
    assert png == tmp_path / "out" / "serve-inf.png"
    assert_png(png)


def test_serve_all_requests_failed(tmp_path):
    runs = [serve_run("adaptserve", 2.0, failed=True), serve_run("adaptserve", "inf", failed=True)]
    runs[0]["median_tpot_ms"] = None
    path = write_json(tmp_path, "serve-failed", serve_record(runs))
    (png,) = plot_file(path)
    assert_png(png)


def test_decode(tmp_path):
    results = []
    for engine, overhead in (("adaptserve", 1.2), ("transformers-eager", 3.0), ("transformers-static", 1.8)):
        for batch_size in (1, 2, 4, 8, 16, 32):
            floor_ms = 5.0 + 0.05 * batch_size
            step_ms = floor_ms * overhead
            results.append(
                {
                    "engine": engine,
                    "batch_size": batch_size,
                    "step_ms": step_ms,
                    "floor_ms": floor_ms,
                    "roofline_fraction": floor_ms / step_ms,
                    "tokens_per_s": 1000.0 * batch_size / step_ms,
                }
            )
    record = {
        "benchmark": "decode",
        **HEADER,
        "model": "llama-3.1-8b",
        "dtype": "bfloat16",
        "context_len": 1024,
        "steps": 64,
        "copy_bandwidth_gb_s": 3000.0,
        "weight_bytes": 16_000_000_000,
        "results": results,
    }
    (png,) = plot_file(write_json(tmp_path, "decode-h100", record))
    assert_png(png)


def test_offline(tmp_path):
    results = [
        {
            "engine": "adaptserve",
            "dtype": "bfloat16",
            "throughput_output_tok_s": 140.0,
            "batch1_decode_tok_s": 17.0,
        },
        {"engine": "transformers", "dtype": "bfloat16", "throughput_output_tok_s": 142.0},
        {"engine": "vllm", "throughput_output_tok_s": 300.0, "request_throughput": 2.3},
    ]
    record = {"benchmark": "offline", **HEADER, "model": "SmolLM2", "results": results}
    (png,) = plot_file(write_json(tmp_path, "offline", record))
    assert_png(png)


def test_prefill_without_recorded_gemm_rate(tmp_path):
    """Two prompt lengths; no "peak_tflops" in the record, so the line sits at 770 TFLOP/s."""
    results = [
        {"engine": engine, "prompt_len": n, "seconds": 0.1, "tflops": tflops}
        for n in (1024, 4096)
        for engine, tflops in (("adaptserve", 0.6 * n / 8), ("transformers-eager", 0.5 * n / 8))
    ]
    record = {"benchmark": "prefill", **HEADER, "model": "llama-3.1-8b", "results": results}
    (png,) = plot_file(write_json(tmp_path, "prefill", record))
    assert_png(png)


def test_startup_without_phases(tmp_path):
    """An older record with totals only: each run is one "interpreter start" segment."""
    results = [{"run": i, "total_s": 12.0 + i, "weights_s": 5.0, "ready_s": 7.0 + i} for i in range(3)]
    record = {"benchmark": "startup", **HEADER, "model": "llama-3.1-8b", "results": results}
    (png,) = plot_file(write_json(tmp_path, "startup", record))
    assert_png(png)


def test_offline_scheduling_two_engines_and_rounds(tmp_path):
    """Round dots go beside each engine's bar; a run without rounds gets none."""
    runs = []
    for async_scheduling, max_num_seqs in (("on", 256), ("off", 512)):
        results = [
            {
                "engine": "adaptserve",
                "request_throughput": 40.0,
                "num_prompts": 100,
                "elapsed_samples": [2.7, 2.5, 2.4],
            },
            {"engine": "vllm", "request_throughput": 50.0, "num_prompts": 100, "elapsed_samples": [2.0]},
        ]
        runs.append({"async_scheduling": async_scheduling, "max_num_seqs": max_num_seqs, "results": results})
    record = {"benchmark": "offline_scheduling", **HEADER, "model": "llama-3.1-8b", "runs": runs}
    (png,) = plot_file(write_json(tmp_path, "offline-scheduling", record))
    assert_png(png)


def test_gemv_single_row_count(tmp_path):
    """M=1 only (one panel); a failed config is left out of "Triton best"."""
    records = []
    for shape, k, n in (("qkv", 4096, 6144), ("down", 14336, 4096)):
        records.append({"shape": shape, "K": k, "N": n, "M": 1, "impl": "cublas", "ok": True, "tbps": 2.4})
        for impl, tbps, ok in (("fma n4 k1024 s1 w4 st1", 2.7, True), ("dot n64 k128 s1 w4 st4", 9.9, False)):
            records.append(
                {"shape": shape, "K": k, "N": n, "M": 1, "impl": impl, "ok": ok, "tbps": tbps, "picked": ok}
            )
    record = {"benchmark": "gemv", **HEADER, "records": records}
    (png,) = plot_file(write_json(tmp_path, "gemv", record))
    assert_png(png)


def benchmark_kind(path: Path) -> str | None:
    data = json.loads(path.read_text(encoding="utf-8"))
    return data.get("benchmark") if isinstance(data, dict) else None


# Every benchmark record committed under docs/benchmarks/ (files without a "benchmark" key, such as
# the kernel autotuner's report, are not benchmark records).
DRAWN_BY_THEIR_SCRIPT = {"rl_tuner"}  # examples/rl_tuner.py draws its own PNG beside its JSON
REAL_FILES = [
    path
    for path in sorted((REPO_ROOT / "docs" / "benchmarks").glob("*.json"))
    if benchmark_kind(path) and benchmark_kind(path) not in DRAWN_BY_THEIR_SCRIPT
]


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda path: path.name)
def test_real_benchmark_files(tmp_path, path):
    """Each real record draws a PNG; a benchmark kind without a plot returns [] and fails here."""
    pngs = plot_file(path, tmp_path)
    assert pngs == [tmp_path / path.with_suffix(".png").name], f"no plot for '{benchmark_kind(path)}'"
    assert_png(pngs[0])


def test_every_plot_is_drawn_from_a_real_file():
    assert set(PLOTTERS) <= {benchmark_kind(path) for path in REAL_FILES}


def test_unknown_kind_is_skipped(tmp_path, capsys):
    path = write_json(tmp_path, "mystery", {"benchmark": "mystery", **HEADER})
    assert plot_file(path) == []
    assert f"skipping {path}: no plot for benchmark 'mystery'" in capsys.readouterr().out
    assert not (tmp_path / "mystery.png").exists()


def test_run_plot_defaults_to_docs_benchmarks(tmp_path, monkeypatch):
    results_dir = tmp_path / "docs" / "benchmarks"
    results_dir.mkdir(parents=True)
    record = {
        "benchmark": "offline",
        **HEADER,
        "results": [{"engine": "adaptserve", "throughput_output_tok_s": 1.0}],
    }
    write_json(results_dir, "offline-cpu", record)
    write_json(results_dir, "other", {"benchmark": "mystery", **HEADER})
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    add_plot_args(parser)

    assert run_plot(parser.parse_args([])) == [Path("docs/benchmarks/offline-cpu.png")]
    out_dir = tmp_path / "pngs"
    args = parser.parse_args([str(results_dir / "offline-cpu.json"), "--out-dir", str(out_dir)])
    assert run_plot(args) == [out_dir / "offline-cpu.png"]
