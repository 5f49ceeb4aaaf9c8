"""Load a llama.cpp GGUF file: architecture from its metadata, weights dequantized to float32 under HF names.

Dequantization is gguf's own (`gguf.quants.dequantize`); the header comes from `gguf_file`. llama.cpp's
converter permutes the q/k projection rows of llama and mistral models for its interleaved rope; we
undo that so the weights are in Hugging Face's rotate-half layout (qwen2/qwen3 are stored unpermuted).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape
from tqdm.auto import tqdm

from adaptserve.model.config import ARCHITECTURES, ModelArchConfig
from adaptserve.model.loaders.checkpoint import LoadedCheckpoint, ModelLoadError, check_state_dict
from adaptserve.model.loaders.gguf_file import GGUFHeader, GGUFTensorInfo, read_gguf_header
from adaptserve.model.tokenizer import Tokenizer, gguf_eos_token_ids

SUPPORTED_TYPES = tuple(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
)  # Q5_0/Q5_1 are what llama.cpp's K-quant mixes fall back to for rows that are not a multiple of 256
_ROPE_PERMUTED_ARCHS = ("llama", "mistral")  # convert_hf_to_gguf.py permutes q/k only for these

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")
_ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, stored as per-frequency divisors; read into the arch


def load_gguf(path: str | Path, *, progress: bool = True) -> LoadedCheckpoint:
    """Architecture, float32 weights and tokenizer of a GGUF file."""
    header = read_gguf_header(path)
    arch = arch_from_gguf(header)
    state_dict = read_state_dict(header, arch, progress=progress)
    check_state_dict(arch, state_dict, header.path)
    tokenizer = None
    if "tokenizer.ggml.tokens" in header.metadata:
        tokenizer = Tokenizer.from_gguf(header.path, header.metadata)
    return LoadedCheckpoint(arch=arch, state_dict=state_dict, tokenizer=tokenizer, source=header.path)


def arch_from_gguf(header: GGUFHeader) -> ModelArchConfig:
    """ModelArchConfig from `{arch}.*` metadata; vocabulary, tying and biases from the tensor table."""
    name = header.metadata.get("general.architecture")
    if name not in ARCHITECTURES:
        raise ModelLoadError(
            f"{header.path}: architecture {name!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    try:
        return _arch_from_metadata(header, name)
    except ModelLoadError:
        raise
    except (ValueError, TypeError) as e:  # garbage values: a string where a number belongs, ...
        raise ModelLoadError(f"{header.path}: invalid model metadata ({e})") from e


def _arch_from_metadata(header: GGUFHeader, name: str) -> ModelArchConfig:
    metadata, path = header.metadata, header.path

    def key(suffix: str, default: Any = None) -> Any:
        value = metadata.get(f"{name}.{suffix}", default)
        if value is None:
            raise ModelLoadError(f"{path}: metadata key {name}.{suffix} is missing")
        if isinstance(default, int | None) and not (isinstance(value, int) and 0 < value < 2**31):
            raise ModelLoadError(f"{path}: metadata key {name}.{suffix} = {value!r} is not a valid size")
        return value

    if "token_embd.weight" not in header.tensors:
        raise ModelLoadError(f"{path}: tensor token_embd.weight is missing")
    num_layers = key("block_count")
    layer_ids = {int(m.group(1)) for m in map(_LAYER_TENSOR.fullmatch, header.tensors) if m}
    if layer_ids != set(range(num_layers)):
        raise ModelLoadError(
            f"{path}: {name}.block_count is {num_layers} but the file has {len(layer_ids)} layers"
        )
    hidden_size, num_heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden_size // num_heads)
    if key("attention.value_length", head_dim) != head_dim:
        raise ModelLoadError(
            f"{path}: attention.value_length differs from attention.key_length; not supported"
        )
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ModelLoadError(f"{path}: rope over part of each head (rope.dimension_count) is not supported")
    rope_theta = float(key("rope.freq_base", 10000.0))
    return ModelArchConfig(
        architecture=name,
        vocab_size=header.tensors["token_embd.weight"].shape[0],
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=key("attention.head_count_kv", num_heads),
        intermediate_size=key("feed_forward_length"),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(header, name, head_dim, rope_theta),
        max_position_embeddings=key("context_length", 4096),
        tie_word_embeddings="output.weight" not in header.tensors,
        attention_bias="blk.0.attn_q.bias" in header.tensors,
        o_proj_bias="blk.0.attn_output.bias" in header.tensors,
        qk_norm=name == "qwen3",
        sliding_window=metadata.get(f"{name}.attention.sliding_window") if name == "mistral" else None,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=gguf_eos_token_ids(metadata),
    )


def read_state_dict(
    header: GGUFHeader, arch: ModelArchConfig, *, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32 under its Hugging Face name, q/k rows in rotate-half order."""
    data = np.memmap(header.path, dtype=np.uint8, mode="r")
    state_dict = {}
    tensors = [info for info in header.tensors.values() if info.name != _ROPE_FREQS]
    for info in tqdm(tensors, desc=f"Loading {Path(header.path).name}", unit="tensor", disable=not progress):
        hf_name = _hf_name(info.name, header.path)
        weight = _dequantize(data, info, header.path)
        if arch.architecture in _ROPE_PERMUTED_ARCHS and ".q_proj." in hf_name:
            weight = unpermute_rope_rows(weight, arch.num_heads)
        elif arch.architecture in _ROPE_PERMUTED_ARCHS and ".k_proj." in hf_name:
            weight = unpermute_rope_rows(weight, arch.num_kv_heads)
        state_dict[hf_name] = weight
    return state_dict


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (weight or bias), back to HF's rotate-half layout.

    HF rotates the first half of each head's rows against the second half; ggml rotates adjacent
    pairs. convert_hf_to_gguf.py therefore stores, per head, rows [0, d/2, 1, d/2+1, ...]:
    `w.reshape(heads, 2, d // 2, *rest).swapaxes(1, 2)`. This is the inverse.
    """
    head_dim = weight.shape[0] // num_heads
    rest = weight.shape[1:]
    interleaved = weight.reshape(num_heads, head_dim // 2, 2, *rest)  # [H, D/2, 2, ...] = (real, imag) pairs
    return interleaved.transpose(1, 2).reshape(weight.shape).contiguous()  # [H, 2, D/2, ...] -> rows


def _hf_name(gguf_name: str, path: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ModelLoadError(f"{path}: tensor {gguf_name!r} is not part of a llama/mistral/qwen2/qwen3 model")


def _dequantize(data: np.memmap, info: GGUFTensorInfo, path: str) -> torch.Tensor:
    if info.ggml_type not in SUPPORTED_TYPES:
        raise ModelLoadError(
            f"{path}: tensor {info.name!r} has type {info.ggml_type.name}, which adaptserve cannot load; "
            f"supported: {', '.join(t.name for t in SUPPORTED_TYPES)}"
        )
    raw = data[info.offset : info.offset + info.nbytes]
    raw = raw.reshape(quant_shape_to_byte_shape(info.shape, info.ggml_type))  # [*shape[:-1], bytes per row]
    values = dequantize(np.asarray(raw), info.ggml_type)  # float32 [*shape]; F32 is a view of the file
    if not np.isfinite(values).all():  # numpy's check is ~10x faster than torch.isfinite on CPU
        raise ModelLoadError(
            f"{path}: tensor {info.name!r} holds NaN or infinite values; the file is corrupt"
        )
    return torch.from_numpy(
        np.array(values, dtype=np.float32, copy=info.ggml_type == GGMLQuantizationType.F32)
    )


def _rope_scaling(header: GGUFHeader, name: str, head_dim: int, rope_theta: float) -> dict[str, Any] | None:
    """HF-style rope_scaling: linear from metadata, or llama3 recovered from a rope_freqs tensor."""
    metadata, path = header.metadata, header.path
    scaling_type = metadata.get(f"{name}.rope.scaling.type", "none")
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": float(metadata[f"{name}.rope.scaling.factor"])}
    if scaling_type != "none":
        raise ModelLoadError(
            f"{path}: rope scaling {scaling_type!r} is not supported (supported: linear, llama3)"
        )
    if _ROPE_FREQS not in header.tensors:
        return None
    divisors = _dequantize(np.memmap(path, dtype=np.uint8, mode="r"), header.tensors[_ROPE_FREQS], path)
    return _llama3_scaling_from_divisors(divisors, head_dim, rope_theta, path)


def _llama3_scaling_from_divisors(
    divisors: torch.Tensor, head_dim: int, rope_theta: float, path: str
) -> dict:
    """convert_hf_to_gguf.py stores llama3 scaling as one divisor per frequency; find the parameters.

    Every Llama 3.x release uses low_freq_factor 1, high_freq_factor 4 and an original context of 8192, with
    the largest divisor as the factor; we recompute the divisors from those and require a match.
    """
    scaling = {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = original / scaling["low_freq_factor"], original / scaling["high_freq_factor"]
    expected = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * rope_theta ** (i / head_dim)
        if wavelen < high_wavelen:
            expected.append(1.0)
        elif wavelen > low_wavelen:
            expected.append(factor)
        else:
            smooth = (original / wavelen - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"]
            )
            expected.append(1 / ((1 - smooth) / factor + smooth))
    if divisors.shape != (head_dim // 2,) or not torch.allclose(divisors, torch.tensor(expected), rtol=1e-4):
        raise ModelLoadError(f"{path}: {_ROPE_FREQS} does not match llama3 rope scaling; not supported")
    return scaling
