"""Prompt checks without a model: every refusal names the prompt field and the limit."""

import pytest

from adaptserve.engine.prompt_ids import encode_prompt
from adaptserve.engine.request import InvalidRequestError


@pytest.mark.parametrize(
    "prompt,message",
    [
        ("", "prompt is empty"),
        ([], "prompt is empty"),
        ("hello", "no tokenizer"),
        (None, "must be a string or a list of token ids, got NoneType"),
        ([1, 2.0], r"must be integers, got 2.0 \(float\)"),
        ([1, True], r"must be integers, got True \(bool\)"),
        ([1, 100], r"token id 100 at position 1 is out of range; token ids must be in \[0, 100\)"),
        ([1, -1], "token id -1 at position 1"),
        (list(range(10)), "prompt is 10 tokens; the context window is 10 tokens"),
    ],
)
def test_refusals_name_the_field_and_the_limit(prompt, message):
    with pytest.raises(InvalidRequestError, match=message) as error:
        encode_prompt(prompt, None, vocab_size=100, max_model_len=10)
    assert error.value.field_name == "prompt"


def test_ids_pass_through_as_ints():
    assert encode_prompt((3, 4, 5), None, vocab_size=100, max_model_len=10) == [3, 4, 5]
