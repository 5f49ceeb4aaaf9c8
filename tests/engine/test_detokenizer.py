"""IncrementalDetokenizer over the real SmolLM2 tokenizer: token ids fed one at a time give deltas that
add up to the full decode, and a character split over several byte-level tokens is never half-sent."""

import pytest

from adaptserve.engine.detokenizer import IncrementalDetokenizer

REPLACEMENT_CHAR = "\ufffd"

TEXTS = [
    "Café 東京 🎉🎉 naïve",
    "Hello, world! How are you today?",
    "日本語のテキスト、中文：你好，世界！",
    "emoji run: 😀😃😄👩‍👩‍👧‍👦🇫🇷 done",
    "résumé Ångström Straße Привет",
    "  leading spaces\n\nand\ttabs  ",
    "🎉",
]


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    """Feed the output one token longer each time, as the engine does; return every delta."""
    return [detokenizer.update(token_ids[: i + 1]) for i in range(len(token_ids))]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_full_decode(smollm2, text):
    tokenizer = smollm2.tokenizer
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = stream(detokenizer, token_ids)
    assert "".join(deltas) == tokenizer.decode(token_ids)
    assert detokenizer.text == tokenizer.decode(token_ids)


@pytest.mark.parametrize("text", TEXTS)
def test_no_delta_holds_a_half_character(smollm2, text):
    tokenizer = smollm2.tokenizer
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(IncrementalDetokenizer(tokenizer), token_ids)
    assert not any(REPLACEMENT_CHAR in d for d in deltas), deltas


def test_multibyte_characters_really_span_several_tokens(smollm2):
    """Guard for the two tests above: the emoji text must make the detokenizer hold text back."""
    tokenizer = smollm2.tokenizer
    token_ids = tokenizer.encode("🎉🎉", add_special_tokens=False)
    assert any(REPLACEMENT_CHAR in tokenizer.decode([t]) for t in token_ids)
    deltas = stream(IncrementalDetokenizer(tokenizer), token_ids)
    assert "" in deltas  # at least one token completed no character


def test_update_with_no_new_tokens_returns_empty(smollm2):
    tokenizer = smollm2.tokenizer
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.update([]) == ""
    token_ids = tokenizer.encode("Hello world", add_special_tokens=False)
    assert detokenizer.update(token_ids) == "Hello world"
    assert detokenizer.update(token_ids) == ""  # the same tokens again add nothing
    assert detokenizer.text == "Hello world"
