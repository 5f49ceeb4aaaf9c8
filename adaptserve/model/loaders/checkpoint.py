"""What every loader returns: the LoadedCheckpoint record, its error type and its weight-name contract."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from adaptserve.model.config import ModelArchConfig

if TYPE_CHECKING:
    import torch

    from adaptserve.model.tokenizer import Tokenizer


class ModelLoadError(ValueError):
    """A checkpoint could not be loaded; the message names the file or spec and what was expected."""


@dataclass
class LoadedCheckpoint:
    arch: ModelArchConfig
    state_dict: dict[str, torch.Tensor] | None  # Hugging Face names, float32 CPU; None = random weights
    tokenizer: Tokenizer | None  # None for random presets
    source: str  # human-readable: path or preset name


def expected_weight_shapes(arch: ModelArchConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `arch` must hold, under its Hugging Face name."""
    hidden, inter, head_dim = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q_dim, kv_dim = arch.num_heads * head_dim, arch.num_kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, hidden)}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (q_dim, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q_dim)
        if arch.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_dim,)
        if arch.o_proj_bias:
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        if arch.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, hidden)
    return shapes


def check_state_dict(arch: ModelArchConfig, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise ModelLoadError unless `state_dict` holds exactly the tensors `arch` needs, with their shapes."""
    expected = expected_weight_shapes(arch)
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    wrong = [
        f"{name} {tuple(state_dict[name].shape)} (expected {shape})"
        for name, shape in expected.items()
        if name in state_dict and tuple(state_dict[name].shape) != shape
    ]
    problems = [
        f"{label} ({len(names)}): {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if names
    ]
    if problems:
        raise ModelLoadError(
            f"{source}: the weights do not match the {arch.architecture} config: {'; '.join(problems)}"
        )
