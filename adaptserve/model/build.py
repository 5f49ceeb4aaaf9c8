"""A model from a loaded checkpoint, on its device and in its dtype, without a copy on the way."""

from __future__ import annotations

import torch

from adaptserve.model.llama import LlamaForCausalLM
from adaptserve.model.loaders import LoadedCheckpoint


def build_model(
    checkpoint: LoadedCheckpoint, max_model_len: int, device: torch.device, dtype: torch.dtype, seed: int
) -> LlamaForCausalLM:
    """Build on the meta device, then allocate once on the target device in the target dtype."""
    with torch.device("meta"):
        model = LlamaForCausalLM(checkpoint.arch, max_model_len)
    model = model.to(dtype).to_empty(device=device)
    model.rebuild_rope(max_model_len, device)
    if checkpoint.state_dict is None:
        model.init_random(seed)
    else:
        model.load_hf_state_dict(checkpoint.state_dict)
    return model.eval()
