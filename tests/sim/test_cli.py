"""`adaptserve sim run` end to end on the tiny preset: bench serve's summary and a result JSON."""

import json

from adaptserve.adapt.step_cost import StepCostModel
from adaptserve.cli import main


def test_sim_run_prints_the_summary_and_writes_the_result(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ADAPTSERVE_GIT_COMMIT", "abc1234")  # no git call from the test
    profile = tmp_path / "cpu-tiny.json"
    StepCostModel(fixed_s=0.004, per_token_s=1e-4, device="Test CPU").save(profile)
    argv = ["sim", "run", "--profile", str(profile), "--model", "tiny", "--replicas", "2"]
    argv += ["--dataset-name", "random", "--num-prompts", "30", "--random-input-len", "40"]
    argv += ["--random-output-len", "10", "--request-rate", "20", "--goodput", "ttft:50", "tpot:20"]
    argv += ["--max-num-seqs", "8", "--result-dir", str(tmp_path), "--max-model-len", "256"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Successful requests:                     30" in out
    assert "Request goodput (req/s):" in out and "Mean TPOT (ms):" in out
    record = json.loads((tmp_path / "sim-cpu-tiny.json").read_text())
    assert record["device"] == "sim:Test CPU" and record["git_commit"] == "abc1234"
    assert record["benchmark"] == "sim" and record["replicas"] == 2
    (run,) = record["runs"]
    assert run["completed"] == 30 and run["request_goodput"] is not None
    assert len(run["time_series"]) == 2 and sum(run["num_steps"]) > 0


def test_a_bad_profile_path_is_an_error(tmp_path, capsys):
    argv = ["sim", "run", "--profile", str(tmp_path / "missing.json"), "--model", "tiny"]
    assert main(argv) == 2
    assert "missing.json: no such file; `adaptserve sim calibrate` writes one" in capsys.readouterr().err
