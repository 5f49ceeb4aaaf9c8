"""Free a benchmark engine's memory at once, so the engine built next finds it (the GPU's too)."""

from __future__ import annotations

import gc


def release_engine(llm) -> None:
    """Drop `llm`'s engine and return its memory: Python's, and CUDA's cached blocks."""
    del llm.engine
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
