"""N-gram prompt lookup (Saxena 2023; vLLM's "ngram" method): draft the tokens that followed the
latest earlier occurrence of the sequence's last n tokens.

Tasks that quote their input (summaries, edits, code changes, extraction) repeat long runs of the
prompt, so the continuation of a matching n-gram is often exactly what the model writes next. The
lookup costs no model pass: drafts are free, and a miss costs only the verified rows.

The longest suffix n-gram (ngram_max down to ngram_min) with an earlier match wins; among its
matches, the most recent one that is followed by `max_drafts` tokens, else the one followed by the
most (the earliest). In a repeating run the most recent match sits just behind the suffix and is
followed by a token or two only; an earlier one drafts the whole run. Token ids are kept per request
as a growing numpy array so each lookup is a few vectorised comparisons, not a Python loop over the
context.
"""

from __future__ import annotations

import numpy as np


class NgramProposer:
    """propose(request_id, token_ids, max_drafts) -> up to max_drafts drafted ids."""

    name = "ngram"

    def __init__(self, ngram_min: int = 1, ngram_max: int = 4):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min} and {ngram_max}")
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max
        self._tokens: dict[str, _TokenBuffer] = {}

    def propose(self, request_id: str, token_ids: list[int], max_drafts: int) -> list[int]:
        if max_drafts <= 0:
            return []
        buffer = self._tokens.get(request_id)
        if buffer is None:
            buffer = self._tokens[request_id] = _TokenBuffer()
        tokens = buffer.sync(token_ids)  # [L]
        length = len(tokens)
        if length < 2:
            return []
        # every n-gram match ends where an earlier token equals the last one: usually a handful
        ends = np.flatnonzero(tokens[: length - 1] == tokens[length - 1])  # [C] ascending
        if len(ends) > MAX_PYTHON_CANDIDATES:  # a frequent token: compare whole n-grams with numpy
            for n in range(min(self.ngram_max, length - 1), self.ngram_min - 1, -1):
                start = _best_match(tokens, n, max_drafts)
                if start is not None:
                    return token_ids[start + n : start + n + max_drafts]
            return []
        match = _longest_match(token_ids, ends.tolist(), self.ngram_max, max_drafts)
        if match is None or match[1] < self.ngram_min:
            return []
        start, n = match
        return token_ids[start + n : start + n + max_drafts]

    def forget(self, request_id: str) -> None:
        self._tokens.pop(request_id, None)


MAX_PYTHON_CANDIDATES = 32  # past this many 1-gram matches, numpy beats a Python loop over them


def _longest_match(token_ids: list[int], ends: list[int], ngram_max: int, max_drafts: int):
    """(start, n) of the match `_best_match` picks for the longest n with one, found from the ends
    of the 1-gram matches (ascending) by extending each backwards; None without a match. Each
    numpy pass over the context costs about a microsecond whatever its length, and the scan of n
    from ngram_max down took ~14 of them a lookup (30 us at batch 1, 4 ms of a verify step's host
    time at batch 128); this takes one."""
    if not ends:
        return None
    last = len(token_ids) - 1
    lengths = []
    for end in ends:
        size = 1
        while size < ngram_max and size <= end and token_ids[end - size] == token_ids[last - size]:
            size += 1
        lengths.append(size)
    n = max(lengths)
    starts = [end - n + 1 for end, size in zip(ends, lengths, strict=True) if size >= n]  # ascending
    # start s is followed by L - n - s tokens: the latest with max_drafts of them, else the earliest
    full = [s for s in starts if s <= last + 1 - n - max_drafts]
    return (full[-1] if full else starts[0]), n


def _best_match(tokens: np.ndarray, n: int, max_drafts: int) -> int | None:
    """Start of the latest earlier occurrence of tokens[-n:] (overlaps allowed) followed by at least
    `max_drafts` tokens, else of the earliest one (followed by the most); None without one."""
    num_starts = len(tokens) - n  # starts 0 .. L - n - 1: the suffix itself (start L - n) is excluded
    if num_starts <= 0:
        return None
    suffix = tokens[-n:]  # [n]
    matches = tokens[:num_starts] == suffix[0]  # [S]
    for offset in range(1, n):
        matches &= tokens[offset : num_starts + offset] == suffix[offset]
    hits = np.flatnonzero(matches)  # [H] ascending; hit h is followed by L - n - h tokens
    if not len(hits):
        return None
    full = hits[hits <= len(tokens) - n - max_drafts]
    return int(full[-1]) if len(full) else int(hits[0])


class _TokenBuffer:
    """A request's token ids as a numpy array that grows with its output (tokens only get appended,
    except after preemption or a rewrite, when it is rebuilt)."""

    def __init__(self):
        self.array = np.empty(0, np.int64)
        self.length = 0

    def sync(self, token_ids: list[int]) -> np.ndarray:
        count = len(token_ids)
        if count < self.length or (self.length and token_ids[self.length - 1] != self.array[self.length - 1]):
            self.length = 0  # not an extension of what we hold: start over
        if count > len(self.array):
            grown = np.empty(max(count, 2 * len(self.array)), np.int64)
            grown[: self.length] = self.array[: self.length]
            self.array = grown
        self.array[self.length : count] = token_ids[self.length : count]
        self.length = count
        return self.array[:count]
