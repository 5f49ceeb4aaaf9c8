"""A request's prompt as token ids, checked against the vocabulary and the context window; every
refusal is an InvalidRequestError that names the `prompt` field and the limit."""

from __future__ import annotations

import numbers

from adaptserve.engine.request import InvalidRequestError
from adaptserve.model.tokenizer import Tokenizer


def encode_prompt(
    prompt: str | list[int], tokenizer: Tokenizer | None, vocab_size: int, max_model_len: int
) -> list[int]:
    """Token ids of a prompt (a string, through the tokenizer, or ids given directly)."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt is empty; give at least one token", "prompt")
        if tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer; give prompt token ids", "prompt")
        ids = tokenizer.encode(prompt)
    else:
        try:
            ids = [_token_id(t) for t in prompt]
        except TypeError:  # not iterable: None, a bare int, ...
            raise InvalidRequestError(
                f"prompt must be a string or a list of token ids, got {type(prompt).__name__}", "prompt"
            ) from None
    if not ids:
        raise InvalidRequestError("prompt is empty; give at least one token", "prompt")
    bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            f"prompt token id {ids[bad]} at position {bad} is out of range; "
            f"token ids must be in [0, {vocab_size})",
            "prompt",
        )
    if len(ids) >= max_model_len:
        raise InvalidRequestError(
            f"prompt is {len(ids)} tokens; the context window is {max_model_len} tokens and must "
            f"leave room for at least one generated token",
            "prompt",
        )
    return ids


def _token_id(token: object) -> int:
    """An int token id; a float or a string is refused rather than silently truncated or crashing later."""
    if isinstance(token, bool) or not isinstance(token, numbers.Integral):
        raise InvalidRequestError(
            f"prompt token ids must be integers, got {token!r} ({type(token).__name__})", "prompt"
        )
    return int(token)
