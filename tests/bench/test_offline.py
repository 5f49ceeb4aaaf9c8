import json

import pytest

from adaptserve.cli import build_parser


def test_offline_runs_every_engine_on_the_workload_and_saves_json(tmp_path):
    from adaptserve.bench.offline import run_offline_benchmark

    argv = ["bench", "offline", "--model", "tiny", "--num-prompts", "6", "--random-input-len", "12"]
    argv += ["--random-output-len", "5", "--random-range-ratio", "0.5", "--hf-max-batch-size", "4"]
    argv += ["--result-dir", str(tmp_path), "--rounds", "2"]
    results = run_offline_benchmark(build_parser().parse_args(argv))
    assert [r.engine for r in results] == ["adaptserve", "transformers-eager", "transformers-static"]
    saved = json.loads((tmp_path / "offline-cpu.json").read_text())
    assert saved["workload"]["name"] == "random" and saved["workload"]["num_prompts"] == 6
    assert saved["git_commit"] and saved["device"] and saved["rounds"] == 2
    for row in saved["results"]:
        assert len(row["elapsed_samples"]) == 2
        # throughputs are the workload's requested tokens over the median time, for every engine alike
        assert row["request_throughput"] == pytest.approx(6 / row["elapsed_s"], rel=1e-2)
        assert row["throughput_total_tok_s"] > row["throughput_output_tok_s"] > 0
    outputs = {row["throughput_output_tok_s"] * row["elapsed_s"] for row in saved["results"]}
    assert max(outputs) - min(outputs) < 1.0  # the same output tokens counted for each engine
    assert (tmp_path / "offline-cpu.png").stat().st_size > 10_000


def test_offline_without_baselines(tmp_path):
    from adaptserve.bench.offline import run_offline_benchmark

    argv = ["bench", "offline", "--model", "tiny", "--num-prompts", "3", "--dataset-name", "sharegpt-synth"]
    argv += ["--baselines", "none", "--result-dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"context window \(512 tokens\).*--max-model-len"):
        run_offline_benchmark(build_parser().parse_args(argv))
    argv[argv.index("sharegpt-synth")] = "random"
    argv += ["--random-input-len", "64", "--random-output-len", "16"]
    (result,) = run_offline_benchmark(build_parser().parse_args(argv))
    assert result.engine == "adaptserve" and result.throughput_output_tok_s > 0
