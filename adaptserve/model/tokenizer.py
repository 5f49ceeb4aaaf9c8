"""Text ⇄ token ids and chat formatting for one model, over a transformers tokenizer.

Two sources: a Hugging Face folder (AutoTokenizer, local files only) or a GGUF file. transformers can
convert a GGUF's tokenizer itself (`AutoTokenizer.from_pretrained(folder, gguf_file=name)`), but that
takes ~9 s for SmolLM2: it first builds the *model* config through gguf.GGUFReader, which makes a
numpy view per element of the 98k vocabulary and merge strings (~3.5 s), parses them again value by
value (~2.5 s), and imports the modeling stack (~3 s). For byte-level BPE vocabularies (SmolLM2,
Llama 3, Qwen2/3) we build the same `tokenizers` BPE from the parsed header ourselves (~0.5 s);
tests check it encodes and decodes like transformers' conversion. Other vocabularies take the slow path.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# llama.cpp token types (tokenizer.ggml.token_type)
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4

# Pre-tokenizer split regexes by tokenizer.ggml.pre, as transformers' GGUF conversion uses them;
# None = GPT-2's own byte-level regex. A `pre` not listed here takes transformers' conversion.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTE_LEVEL_SPLITS: dict[str, str | None] = {
    "default": None,
    "gpt-2": None,
    "smollm": None,  # SmolLM2 has no multi-digit tokens, so GPT-2's split equals llama.cpp's digit split
    "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


class Tokenizer:
    """A model's tokenizer: `encode`, `decode`, `apply_chat_template`, and its special token ids."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: Sequence[int] = (), source: str = ""):
        self.hf = hf_tokenizer  # the transformers tokenizer, for callers that need more (streaming decode)
        self.source = source
        ids = list(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None and hf_tokenizer.eos_token_id not in ids:
            ids.insert(0, hf_tokenizer.eos_token_id)
        self._eos_token_ids = ids

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of a local Hugging Face model folder; EOS ids also from generation_config.json."""
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        eos_ids: list[int] = []
        generation_config = Path(path) / "generation_config.json"
        if generation_config.is_file():
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
            eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return cls(hf, eos_ids, source=str(path))

    @classmethod
    def from_gguf(cls, path: str | Path, metadata: dict[str, Any] | None = None) -> Tokenizer:
        """The tokenizer and chat template stored in a GGUF file (pass `metadata` if already parsed)."""
        if metadata is None:
            from adaptserve.model.loaders.gguf_file import read_gguf_header

            metadata = read_gguf_header(path).metadata
        if "tokenizer.ggml.tokens" not in metadata:
            from adaptserve.model.loaders.checkpoint import ModelLoadError

            raise ModelLoadError(f"{path}: the GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if metadata.get("tokenizer.ggml.model") == "gpt2" and pre in _BYTE_LEVEL_SPLITS:
            hf = _byte_level_tokenizer(metadata, _BYTE_LEVEL_SPLITS[pre])
        else:
            from transformers import AutoTokenizer

            path = Path(path)
            hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        return cls(hf, gguf_eos_token_ids(metadata), source=str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) become their ids."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, formatted by the model's own chat template."""
        if not self.hf.chat_template:
            raise ValueError(
                f"the model {self.source or '(unnamed)'} has no chat template; send a plain prompt "
                "(completions) instead of chat messages"
            )
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation (the tokenizer's EOS first)."""
        return list(self._eos_token_ids)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added tokens included."""
        return len(self.hf)


def gguf_eos_token_ids(metadata: dict[str, Any]) -> list[int]:
    """Ids that end generation per llama.cpp: EOS, then end-of-turn and end-of-message if named."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token_id = metadata.get(key)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


def _byte_level_tokenizer(metadata: dict[str, Any], split_regex: str | None) -> Any:
    """A byte-level BPE tokenizer from GGUF metadata, built as transformers' GGUF conversion builds it."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    token_types: list[int] = metadata.get("tokenizer.ggml.token_type") or []
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Byte-level vocabularies spell each byte as a printable character; re-spell the odd token that does not.
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    merges = [tuple(merge.split(" ")) for merge in metadata.get("tokenizer.ggml.merges", [])]
    backend = BackendTokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False)
    )  # fmt: skip
    if split_regex is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )  # fmt: skip
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_end|>) stay whole and count as special; a control token spelled outside the byte
    # alphabet is a llama.cpp mislabel that would grow the vocabulary, so it is skipped, as transformers does.
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, token_type in zip(tokens, token_types, strict=False)
        if token_type == _GGUF_CONTROL and set(token) <= alphabet
    ]
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, token_type in zip(tokens, token_types, strict=False)
        if token_type == _GGUF_USER_DEFINED and token in vocab
    ]
    backend.add_special_tokens(control)
    backend.add_tokens(user_defined)

    def token_at(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None else None

    config: dict[str, Any] = {
        "bos_token": token_at("bos_token_id"),
        "eos_token": token_at("eos_token_id"),
        "unk_token": token_at("unknown_token_id"),
        "pad_token": token_at("padding_token_id"),
    }
    optional = {
        "tokenizer.chat_template": "chat_template",
        "tokenizer.ggml.add_bos_token": "add_bos_token",
        "tokenizer.ggml.add_eos_token": "add_eos_token",
    }
    for key, name in optional.items():
        if key in metadata:
            config[name] = metadata[key]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map used by byte-level BPE vocabularies."""
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping
