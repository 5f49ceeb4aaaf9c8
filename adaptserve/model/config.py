"""Architecture of a Llama-family decoder as plain data, plus named presets for random weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelArchConfig:
    architecture: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None  # None = hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling dict (llama3, linear) or None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection bias (Qwen2; Llama/Qwen3 with attention_bias)
    o_proj_bias: bool = False  # output projection bias (Llama/Qwen3 with attention_bias, not Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k before rope (Qwen3)
    sliding_window: int | None = None  # Mistral; we attend fully, so the context is capped at it
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; supported: {ARCHITECTURES}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def max_context(self) -> int:
        """Longest sequence we serve exactly: position limit, capped by a sliding window."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelArchConfig:
        """From a Hugging Face config.json dict (LlamaForCausalLM, MistralForCausalLM, Qwen2/3ForCausalLM)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json; supported: {ARCHITECTURES}"
            )
        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        rope_scaling = hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta")
        rope_params = hf.get("rope_parameters")  # transformers >= 5 folds theta and scaling in here
        if rope_params:
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = dict(rope_params)
        use_window = hf.get("use_sliding_window", model_type == "mistral")
        return cls(
            architecture=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta if rope_theta is not None else 10000.0,
            rope_scaling=_normalize_rope_scaling(rope_scaling),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=model_type == "qwen2" or hf.get("attention_bias", False),
            o_proj_bias=model_type != "qwen2" and hf.get("attention_bias", False),
            qk_norm=model_type == "qwen3",
            sliding_window=hf.get("sliding_window") if use_window else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if not scaling:
        return None
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in ("llama3", "linear"):
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: llama3, linear")
    scaling["rope_type"] = rope_type
    return scaling


_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, ModelArchConfig] = {
    "llama-3.1-8b": ModelArchConfig(
        "llama",
        128256,
        4096,
        32,
        32,
        8,
        14336,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_ids=[128001, 128008, 128009],
    ),
    "llama-3.2-1b": ModelArchConfig(
        "llama",
        128256,
        2048,
        16,
        32,
        8,
        8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_SCALING, "factor": 32.0},
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_ids=[128001, 128008, 128009],
    ),
    "qwen2.5-0.5b": ModelArchConfig(
        "qwen2",
        151936,
        896,
        24,
        14,
        2,
        4864,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        attention_bias=True,
        bos_token_id=151643,
        eos_token_ids=[151645, 151643],
    ),
    "smollm2-135m": ModelArchConfig(
        "llama",
        49152,
        576,
        30,
        9,
        3,
        1536,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=[2],
    ),
    "tiny": ModelArchConfig(
        "llama",
        512,
        64,
        2,
        4,
        2,
        128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=[2],
    ),
}


def get_preset(name: str) -> ModelArchConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
