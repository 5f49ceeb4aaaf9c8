"""Whether Triton can be imported here (CUDA machines, or its CPU interpreter in tests)."""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
