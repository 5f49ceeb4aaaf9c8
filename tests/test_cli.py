"""`adaptserve generate` run in-process: bad input exits with code 2 and one clear line, good input prints
the prompt and its completion (plain or as JSON lines)."""

from __future__ import annotations

import json

import pytest

from adaptserve.cli import main
from adaptserve.runner import memory


@pytest.fixture(autouse=True)
def small_kv_budget(monkeypatch):
    """The CPU default KV budget (2 GiB) takes seconds to allocate; these prompts need a few MB (the
    real-model runs pass --max-model-len 1024 so that the smaller cache still holds a whole context)."""
    monkeypatch.setattr(memory, "CPU_DEFAULT_KV_GIB", 0.125)


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["generate", "--model", "tiny", "hello"], ["no tokenizer", "token ids"]),
        (["generate", "--model", "tiny", "--max-tokens", "0", "hello"], ["max_tokens must be", "got 0"]),
        (["generate", "--model", "tiny", "--top-p", "1.5", "hello"], ["top_p", "(0, 1]", "got 1.5"]),
        (["generate", "--model", "tiny", "--temperature", "-1", "hello"], ["temperature", ">= 0"]),
        (["generate", "--model", "tiny", "-n", "0", "hello"], ["n must be >= 1"]),
        (
            ["generate", "--model", "tiny", "--max-num-seqs", "0", "hello"],
            ["scheduler.max_num_seqs=0", ">= 1"],
        ),
        (["generate", "--model", "tiny", "--max-model-len", "100000", "hi"], ["max_model_len=100000", "512"]),
        (["generate", "--model", "tiny", "--chat", "hello"], ["no tokenizer", "chat template"]),
        (["generate", "--model", "tiny"], ["give a prompt or --prompts-file"]),
        (["serve", "--model", "tiny", "--ttft-slo", "urgent=1"], ["--ttft-slo", "urgent=1"]),
        (["serve", "--model", "tiny", "--ttft-slo", "high=0"], ["'high'", "ttft_slo_s=0.0", "> 0"]),
        (["serve", "--model", "tiny", "--max-waiting-requests", "0"], ["max_waiting_requests=0", ">= 1"]),
    ],
    ids=[
        "text-prompt-without-tokenizer",
        "max-tokens-0",
        "top-p-1.5",
        "negative-temperature",
        "n-0",
        "max-num-seqs-0",
        "max-model-len-too-long",
        "chat-without-tokenizer",
        "no-prompt",
        "serve-unknown-tier",
        "serve-zero-slo",
        "serve-zero-queue",
    ],
)
def test_bad_input_exits_2_with_one_error_line(capsys, argv, fragments):
    assert main(argv) == 2
    line = _error_line(capsys)
    for fragment in fragments:
        assert fragment in line, line


def test_unknown_model_path_exits_2_naming_it(capsys, tmp_path):
    path = tmp_path / "missing.gguf"
    assert main(["generate", "--model", str(path), "hello"]) == 2
    line = _error_line(capsys)
    assert str(path) in line and "no such file or folder" in line


def test_corrupt_gguf_exits_2_naming_it(capsys, tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a model at all" * 100)
    assert main(["generate", "--model", str(path), "hello"]) == 2
    line = _error_line(capsys)
    assert str(path) in line and "not a GGUF file" in line


def test_bad_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--dtype", "float64", "hello"])
    assert info.value.code == 2
    assert "invalid choice: 'float64'" in capsys.readouterr().err


@pytest.mark.slow
def test_chat_with_the_default_model_prints_prompt_and_answer(capsys):
    argv = ["generate", "--chat", "--max-tokens", "8", "--dtype", "float32", "--max-model-len", "1024"]
    argv.append("What is 2+2?")
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    # greedy in float32, through the chat template: 8 tokens are the start of the answer
    assert lines == [">>> What is 2+2?", "The answer to this classic math problem is", "[length]"]


@pytest.mark.slow
def test_prompts_file_with_json_gives_one_line_per_prompt(capsys, tmp_path):
    prompts = ["The capital of France is", "def add(a, b):", "Once upon a time"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(
        f"{prompts[0]}\n\n{prompts[1]}\n{prompts[2]}\n", encoding="utf-8"
    )  # blank line skipped
    argv = ["generate", "--prompts-file", str(prompts_file), "--max-tokens", "6", "--json"]
    argv += ["--dtype", "float32", "--max-model-len", "1024"]
    assert main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in records] == prompts
    for record in records:
        assert set(record) == {"prompt", "text", "finish_reason"}
        assert record["text"].strip() and record["finish_reason"] in ("stop", "length")
    assert "Paris" in records[0]["text"]


def test_precision_flags_reach_the_engine_options():
    from adaptserve.cli import _engine_options, build_parser
    from adaptserve.config import EngineConfig

    args = build_parser().parse_args(["serve", "--precision-policy", "adaptive", "--weight-formats", "fp8"])
    options = _engine_options(args)
    assert options["precision_policy"] == "adaptive" and options["weight_formats"] == ("fp8",)
    options.pop("model")
    assert EngineConfig.from_flat(**options).precision.formats_needed() == ("fp8",)
