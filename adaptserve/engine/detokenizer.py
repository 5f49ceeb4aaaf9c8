"""Incremental detokenization: the text of a growing token list, a few tokens at a time.

Byte-level BPE can split one character over several tokens, so decoding the last token alone may end
in U+FFFD. We decode a short window that starts a few tokens back (`prefix_offset`) and release text
only once it no longer ends in a partial character, the way streaming engines (HF's TextStreamer,
vLLM) do. Each update costs O(window), not O(output).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adaptserve.model.tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.text = ""  # all text released so far
        self._prefix_offset = 0  # window start: decoded again for context
        self._read_offset = 0  # tokens before this are already in `text`

    def update(self, token_ids: list[int]) -> str:
        """Take the whole output so far; return the text its new tokens add (may be empty)."""
        prefix_text = self.tokenizer.decode(token_ids[self._prefix_offset : self._read_offset])
        window_text = self.tokenizer.decode(token_ids[self._prefix_offset :])
        if len(window_text) <= len(prefix_text) or window_text.endswith(_REPLACEMENT_CHAR):
            return ""  # nothing new yet, or a character still cut in half
        delta = window_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(token_ids)
        self.text += delta
        return delta
