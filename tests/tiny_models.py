"""Tiny Llama/Qwen configurations for parity tests against transformers."""

import transformers

# shared by the three tiny models: large init so the logits are peaky and greedy has no near-ties
_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,
)
_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def llama3_config():
    return transformers.LlamaConfig(
        **_TINY,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING,
    )


def qwen3_config():
    return transformers.Qwen3Config(
        **_TINY, head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True, rope_theta=1e6
    )


def qwen2_config():
    return transformers.Qwen2Config(**_TINY, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1e6)
