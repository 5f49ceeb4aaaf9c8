"""Bad input through the public API (`LLM`, `SamplingParams`, `LLM.engine.add_request`): each is refused
with an error that names the field and the limit, and the engine is left exactly as it was."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest

from adaptserve import LLM, SamplingParams
from adaptserve.config import ConfigError
from adaptserve.engine.request import InvalidRequestError
from adaptserve.model.loaders import ModelLoadError, default_model_path

MAX_MODEL_LEN = 64
NUM_BLOCKS = 16
VOCAB = 512  # the tiny preset's
GREEDY = SamplingParams(temperature=0.0, max_tokens=4)
GOOD_PROMPT = [5, 17, 300, 42]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny", max_model_len=MAX_MODEL_LEN, num_blocks=NUM_BLOCKS)


@pytest.fixture(scope="module")
def reference(llm) -> list[int]:
    """GOOD_PROMPT's greedy tokens from the fresh engine, to compare with after bad requests."""
    return _generate_ok(llm)


def _generate_ok(llm: LLM) -> list[int]:
    out = llm.generate(GOOD_PROMPT, GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    return out.token_ids


def assert_engine_idle(llm: LLM) -> None:
    """Nothing queued or running, every KV block back in the free pool."""
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.num_unfinished == 0
    assert llm.engine.kv_cache.num_free_blocks == NUM_BLOCKS


def _raises_invalid(field_name: str, *fragments: str, fn, **kwargs) -> str:
    with pytest.raises(InvalidRequestError) as info:
        fn(**kwargs)
    message = str(info.value)
    assert info.value.field_name == field_name, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ---------------------------------------------------------------------------------------------------
# Prompts


@pytest.mark.parametrize(
    ("prompt", "fragments"),
    [
        ("", ["prompt is empty"]),
        ([], ["prompt is empty"]),
        ([5] * 100, ["100 tokens", f"{MAX_MODEL_LEN} tokens"]),
        ([5] * MAX_MODEL_LEN, [f"{MAX_MODEL_LEN} tokens", "room for at least one generated token"]),
        ([5, VOCAB], [f"token id {VOCAB} at position 1", f"[0, {VOCAB})"]),
        ([5, 6, -1], ["token id -1 at position 2", f"[0, {VOCAB})"]),
        ([5, 1.5], ["integers", "1.5"]),
        ([5, "7"], ["integers", "'7'"]),
        ([True, 5], ["integers", "True"]),
        (None, ["string or a list of token ids", "NoneType"]),
        (7, ["string or a list of token ids", "int"]),
        ("hello", ["no tokenizer", "token ids"]),  # the tiny preset has random weights and no tokenizer
    ],
    ids=[
        "empty-str",
        "empty-list",
        "longer-than-context",
        "fills-context",
        "id-past-vocab",
        "negative-id",
        "float-id",
        "str-id",
        "bool-id",
        "none",
        "bare-int",
        "text-without-tokenizer",
    ],
)
def test_bad_prompt_is_refused_by_add_request(llm, reference, prompt, fragments):
    _raises_invalid(
        "prompt", *fragments, fn=llm.engine.add_request, request_id="bad", prompt=prompt, params=GREEDY
    )
    assert_engine_idle(llm)
    assert _generate_ok(llm) == reference


@pytest.mark.parametrize(
    "prompt", ["", [[]], [5] * 100, [5, VOCAB]], ids=["empty-str", "empty-list", "long", "oov"]
)
def test_bad_prompt_is_refused_by_generate(llm, reference, prompt):
    with pytest.raises(InvalidRequestError, match="prompt"):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    assert_engine_idle(llm)
    assert _generate_ok(llm) == reference


def test_prompt_one_short_of_the_context_gets_exactly_one_token(llm):
    out = llm.generate(
        [5] * (MAX_MODEL_LEN - 1), SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False
    )
    assert len(out[0].outputs[0].token_ids) == 1
    assert out[0].outputs[0].finish_reason == "length"
    assert_engine_idle(llm)


def test_numpy_token_ids_are_accepted(llm, reference):
    out = llm.generate([np.array(GOOD_PROMPT)], GREEDY, use_tqdm=False)
    assert out[0].outputs[0].token_ids == reference


def test_one_bad_prompt_rejects_the_whole_batch_and_queues_nothing(llm, reference):
    with pytest.raises(InvalidRequestError, match=f"token id {VOCAB} at position 0"):
        llm.generate([GOOD_PROMPT, [7, 8], [VOCAB], [9]], GREEDY, use_tqdm=False)
    assert_engine_idle(llm)
    outputs = llm.generate([GOOD_PROMPT, [7, 8]], GREEDY, use_tqdm=False)
    assert len(outputs) == 2 and outputs[0].outputs[0].token_ids == reference


def test_mismatched_list_lengths_are_refused_before_queueing(llm):
    with pytest.raises(ValueError, match="got 1 sampling params for 2 prompts"):
        llm.generate([GOOD_PROMPT, [7]], [GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="got 1 priorities for 2 prompts"):
        llm.generate([GOOD_PROMPT, [7]], GREEDY, use_tqdm=False, priority=[0])
    assert_engine_idle(llm)


def test_duplicate_request_id_is_refused_and_the_first_one_still_runs(llm, reference):
    llm.engine.add_request("dup", GOOD_PROMPT, GREEDY)
    _raises_invalid(
        "request_id",
        "'dup'",
        "already in use",
        fn=llm.engine.add_request,
        request_id="dup",
        prompt=[7],
        params=GREEDY,
    )
    finished = []
    while llm.engine.has_unfinished_requests():
        finished += llm.engine.step()
    assert [o.request_id for o in finished] == ["dup"]
    assert finished[0].outputs[0].token_ids == reference
    assert_engine_idle(llm)


def test_chat_without_tokenizer_is_refused(llm):
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.chat([{"role": "user", "content": "hi"}])
    assert_engine_idle(llm)


# ---------------------------------------------------------------------------------------------------
# Sampling params

BAD_PARAMS = [
    # (field, value, fragments of the message), with other fields at their defaults
    ("max_tokens", 0, ["max_tokens", ">= 1", "got 0"]),
    ("max_tokens", -1, ["max_tokens", ">= 1", "got -1"]),
    ("max_tokens", 1.5, ["max_tokens", "integer", "got 1.5"]),
    ("temperature", -0.5, ["temperature", ">= 0", "got -0.5"]),
    ("temperature", math.nan, ["temperature", "got nan"]),
    ("top_p", 0, ["top_p", "(0, 1]", "got 0"]),
    ("top_p", 1.5, ["top_p", "(0, 1]", "got 1.5"]),
    ("top_k", -2, ["top_k", "got -2"]),
    ("top_k", 2.5, ["top_k", "got 2.5"]),
    ("min_p", 1.5, ["min_p", "[0, 1]", "got 1.5"]),
    ("repetition_penalty", 0.0, ["repetition_penalty", "> 0"]),
    ("presence_penalty", 3.0, ["presence_penalty", "[-2, 2]"]),
    ("frequency_penalty", -3.0, ["frequency_penalty", "[-2, 2]"]),
    ("n", 0, ["n must be >= 1", "got 0"]),
    ("min_tokens", -1, ["min_tokens", ">= 0", "got -1"]),
    ("min_tokens", 1.5, ["min_tokens", "integer", "got 1.5"]),
    ("logprobs", 21, ["logprobs", "[0, 20]", "got 21"]),
    ("logprobs", 2.5, ["logprobs", "integer", "got 2.5"]),
    ("seed", 2**64, ["seed", "2**64", str(2**64)]),
    ("seed", -(2**63) - 1, ["seed", "-2**63"]),
    ("seed", 1.5, ["seed", "integer", "got 1.5"]),
    ("stop", [""], ["stop strings must be non-empty"]),
    ("stop_token_ids", ["2"], ["stop_token_ids", "integers", "'2'"]),
]
BAD_PARAM_IDS = [f"{name}={value!r}" for name, value, _ in BAD_PARAMS]


@pytest.mark.parametrize(("field_name", "value", "fragments"), BAD_PARAMS, ids=BAD_PARAM_IDS)
def test_bad_sampling_params_are_refused_at_construction(field_name, value, fragments):
    _raises_invalid(field_name, *fragments, fn=SamplingParams, **{field_name: value})


@pytest.mark.parametrize(("field_name", "value", "fragments"), BAD_PARAMS, ids=BAD_PARAM_IDS)
def test_bad_sampling_params_set_later_are_refused_by_generate(llm, reference, field_name, value, fragments):
    """A SamplingParams changed after construction is validated again when the request is added; before
    that check a float seed or logprobs got into the runner and failed every later step."""
    params = dataclasses.replace(GREEDY)
    setattr(params, field_name, value)
    _raises_invalid(
        field_name, *fragments, fn=llm.generate, prompts=GOOD_PROMPT, sampling_params=params, use_tqdm=False
    )
    assert_engine_idle(llm)
    assert _generate_ok(llm) == reference


def test_min_tokens_above_max_tokens_is_refused():
    _raises_invalid(
        "min_tokens", "min_tokens (5)", "max_tokens (3)", fn=SamplingParams, min_tokens=5, max_tokens=3
    )


def test_seed_range_leaves_room_for_each_of_n_children():
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
    _raises_invalid("seed", "2**64 - n", fn=SamplingParams, seed=2**64 - 1, n=2)


def test_edge_seeds_generate(llm):
    """The extremes torch.Generator.manual_seed takes, and a numpy integer, all run."""
    for seed in (-(2**63), 2**64 - 1, np.int64(7)):
        params = SamplingParams(temperature=1.0, max_tokens=3, seed=seed)
        first = llm.generate(GOOD_PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids
        again = llm.generate(GOOD_PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids
        assert len(first) == 3 and first == again
    assert_engine_idle(llm)


def test_top_k_minus_one_means_off():
    assert SamplingParams(top_k=-1).top_k == 0


# ---------------------------------------------------------------------------------------------------
# Engine options and model files


def test_misspelled_engine_option_names_the_key_and_the_known_ones():
    with pytest.raises(ConfigError) as info:
        LLM("tiny", max_num_seq=3)
    message = str(info.value)
    assert "'max_num_seq'" in message and "max_num_seqs" in message


def test_engine_option_out_of_range_names_the_option_and_the_allowed_values():
    with pytest.raises(ConfigError, match=re.escape("cache.block_size=7 is out of range; allowed: 8, 16")):
        LLM("tiny", block_size=7)


def test_max_model_len_past_the_models_window_is_refused():
    with pytest.raises(ValueError, match=r"max_model_len=100000 exceeds .* \(512 tokens\)"):
        LLM("tiny", max_model_len=100_000)


def test_kv_cache_smaller_than_the_context_window_is_refused():
    with pytest.raises(ValueError, match=r"holds 32 tokens \(2 blocks\), fewer than max_model_len=64"):
        LLM("tiny", max_model_len=64, num_blocks=2)


def test_unknown_model_path_names_the_path(tmp_path):
    path = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as info:
        LLM(str(path))
    message = str(info.value)
    assert str(path) in message and "no such file or folder" in message and "tiny" in message


def test_garbage_gguf_is_refused(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError) as info:
        LLM(str(path))
    assert str(path) in str(info.value) and "not a GGUF file" in str(info.value)


def test_gguf_cut_in_its_tensor_data_is_refused(tmp_path):
    whole = tmp_path / "whole.gguf"
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(whole, arch="llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = whole.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as info:
        LLM(str(cut))
    message = str(info.value)
    assert str(cut) in message and "truncated or corrupt" in message and "token_embd.weight" in message


def test_real_gguf_cut_in_its_header_is_refused(tmp_path):
    """The first MB of SmolLM2's 98 MB file ends inside its tokenizer vocabulary."""
    path = tmp_path / "smollm2-head.gguf"
    with open(default_model_path(), "rb") as src:
        path.write_bytes(src.read(1 << 20))
    with pytest.raises(ModelLoadError) as info:
        LLM(str(path))
    assert str(path) in str(info.value) and "truncated" in str(info.value)
