"""The same weights in Hugging Face transformers: the reference for parity tests and the baseline in
benchmarks."""

from __future__ import annotations

import torch

from adaptserve.model.config import ModelArchConfig
from adaptserve.model.loaders import LoadedCheckpoint

_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_CONFIGS = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
}


def transformers_config(arch: ModelArchConfig):
    import transformers

    config_cls = getattr(transformers, _CONFIGS[arch.architecture])
    kwargs = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        rms_norm_eps=arch.rms_norm_eps,
        rope_theta=arch.rope_theta,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=arch.bos_token_id,
        eos_token_id=arch.eos_token_ids or None,
    )
    if arch.rope_scaling:
        kwargs["rope_scaling"] = dict(arch.rope_scaling)
    if arch.architecture in ("llama", "qwen3"):
        kwargs["attention_bias"] = arch.attention_bias or arch.o_proj_bias
    return config_cls(**kwargs)


def transformers_model(checkpoint: LoadedCheckpoint, dtype: torch.dtype = torch.float32):
    """A transformers model holding exactly the checkpoint's weights (random presets: not supported)."""
    import transformers

    if checkpoint.state_dict is None:
        raise ValueError("transformers baselines need real weights, not a random preset")
    arch = checkpoint.arch
    model_cls = getattr(transformers, _CLASSES[arch.architecture])
    model = model_cls(transformers_config(arch))
    state = dict(checkpoint.state_dict)
    if arch.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit transformers' model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.to(dtype).eval()
