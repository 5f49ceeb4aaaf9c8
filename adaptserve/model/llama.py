"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/3, SmolLM2) over a paged KV cache.

Tokens arrive flat ([T] ids with their positions), not padded per sequence; attention reads and writes
the paged cache through the backend the runner picked. Projections are fused: one qkv matmul and one
gate/up matmul per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from adaptserve.kernels.activation import silu_and_mul
from adaptserve.kernels.attention.backend import AttentionBackend
from adaptserve.kernels.attention.metadata import AttentionMetadata
from adaptserve.kernels.norm import rms_norm
from adaptserve.model.config import ModelArchConfig
from adaptserve.model.projection import NATIVE, Projection, linear_in_format, quantized_copy
from adaptserve.model.rope import RopeContext, RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]  # ([blocks, block_size, KVH, D], same) for one layer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x: [..., dim] -> normed; with `residual`: (norm(residual + x), residual + x)."""
        if x.dim() != 2:  # per-head q/k norms: [T, heads, D]
            return rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        return rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, arch: ModelArchConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Projection(arch.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.attention_bias)
        self.o_proj = Projection(self.q_size, arch.hidden_size, bias=arch.o_proj_bias)
        self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps) if arch.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeContext,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        backend: AttentionBackend,
        precision: str = NATIVE,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x, precision).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k_cache, v_cache = kv_cache
        q, k = backend.rope_and_write_kv(q, k, v, rope, k_cache, v_cache, meta)
        o = backend.attend(q, k, v, k_cache, v_cache, meta, self.scale)  # [T, H, D]
        return self.o_proj(o.reshape(num_tokens, self.q_size), precision)


class MLP(nn.Module):
    def __init__(self, arch: ModelArchConfig):
        super().__init__()
        self.intermediate_size = arch.intermediate_size
        self.gate_up_proj = Projection(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = Projection(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, precision: str = NATIVE) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, precision)  # [T, 2I]: gate then up
        return self.down_proj(silu_and_mul(gate_up), precision)  # silu(gate) * up: [T, I]


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArchConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def forward(self, x, residual, rope, kv_cache, meta, backend, precision: str = NATIVE):
        """x: [T, hidden] the previous layer's output, residual: the stream before it (None for the
        first layer) -> (this layer's output, the stream before it); the adds are fused into the norms."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope, kv_cache, meta, backend, precision)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x, precision), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ModelArchConfig, max_positions: int):
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = (
            None if arch.tie_word_embeddings else nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        )
        self.rotary = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling)
        self.head_formats: dict = {}  # the LM head's weight in other formats (quantize_head), if asked

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        backend: AttentionBackend,
        precision: str = NATIVE,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden], the projections computed in
        `precision` (a weight format the model holds; see model/projection.py). `num_layers` runs only
        the first layers, then the final norm (a self-speculative draft: spec/layer_drafter.py)."""
        x, rope = self.embed(input_ids, positions)
        end = len(self.layers) if num_layers is None else num_layers
        x, residual = self.run_layers(x, None, rope, kv_caches, meta, backend, precision, 0, end)
        return self.final_norm(x, residual)

    # the forward pass in parts, so a CUDA graph can be captured per group of layers (runner/cuda_graphs.py)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor):
        """-> (embeddings [T, hidden], the rotary context of `positions`)."""
        x = self.embed_tokens(input_ids)  # [T, hidden]
        return x, self.rotary.context(positions, x.dtype)

    def run_layers(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        backend: AttentionBackend,
        precision: str,
        start: int,
        end: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers start..end-1 -> (x [T, hidden], residual [T, hidden])."""
        for layer, kv_cache in zip(self.layers[start:end], kv_caches[start:end], strict=True):
            x, residual = layer(x, residual, rope, kv_cache, meta, backend, precision)
        return x, residual

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """-> hidden states [T, hidden]."""
        return self.norm(x, residual)[0]

    def rebuild_rope(self, max_positions: int, device: torch.device) -> None:
        """Recompute the cos/sin tables (needed after building on the meta device)."""
        arch = self.arch
        self.rotary = RotaryEmbedding(
            arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling, device
        )

    def compute_logits(self, hidden: torch.Tensor, precision: str = NATIVE) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab], with the head in `precision` if held."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear_in_format(hidden, weight, self.head_formats.get(precision)).float()

    def quantize_head(self, formats: tuple[str, ...], int4_group_size: int = 128) -> dict:
        """Hold the LM head (the embedding, when tied) in `formats` too; returns the copies."""
        weight = (self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight).detach()
        self.head_formats = {name: quantized_copy(weight, name, int4_group_size) for name in formats}
        return self.head_formats

    # ---- weights -------------------------------------------------------------------------------------

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face names (separate q/k/v and gate/up) into the fused layout."""
        own = self.state_dict()
        missing = set(own) - {_fused_name(n) for n in state_dict}
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                attn, mlp = layer.self_attn, layer.mlp
                _copy(attn.qkv_proj.weight, [state_dict[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
                if attn.qkv_proj.bias is not None:
                    _copy(attn.qkv_proj.bias, [state_dict[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
                _copy(attn.o_proj.weight, [state_dict[p + "self_attn.o_proj.weight"]])
                if attn.o_proj.bias is not None:
                    _copy(attn.o_proj.bias, [state_dict[p + "self_attn.o_proj.bias"]])
                if attn.q_norm is not None:
                    _copy(attn.q_norm.weight, [state_dict[p + "self_attn.q_norm.weight"]])
                    _copy(attn.k_norm.weight, [state_dict[p + "self_attn.k_norm.weight"]])
                _copy(
                    mlp.gate_up_proj.weight, [state_dict[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up")]
                )
                _copy(mlp.down_proj.weight, [state_dict[p + "mlp.down_proj.weight"]])
                _copy(layer.input_layernorm.weight, [state_dict[p + "input_layernorm.weight"]])
                _copy(
                    layer.post_attention_layernorm.weight, [state_dict[p + "post_attention_layernorm.weight"]]
                )
            _copy(self.embed_tokens.weight, [state_dict["model.embed_tokens.weight"]])
            _copy(self.norm.weight, [state_dict["model.norm.weight"]])
            if self.lm_head is not None:
                _copy(self.lm_head.weight, [state_dict["lm_head.weight"]])

    def init_random(self, seed: int) -> None:
        """Random weights for speed work: normal(0, 0.02) matrices, unit norms (as HF initialises)."""
        generator = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.normal_(0.0, 0.02, generator=generator)


def _copy(dst: torch.Tensor, parts: list[torch.Tensor]) -> None:
    src = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if src.shape != dst.shape:
        raise ValueError(f"weight shape {tuple(src.shape)} does not match the model's {tuple(dst.shape)}")
    dst.copy_(src)


_FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def _fused_name(hf_name: str) -> str:
    """HF parameter name -> this module's name (used to report missing tensors)."""
    name = hf_name.removeprefix("model.")
    for part, fused in _FUSED.items():
        name = name.replace(f".{part}.", f".{fused}.")
    return name
