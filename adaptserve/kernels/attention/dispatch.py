"""The attention backend the runner uses: it asks the kernel registry which variant runs this step.

The choice is made once per step (`begin_step`), from the step's shape bucket, and reused by every
layer; inside a CUDA graph the runner forces the variant the graph was captured with. RoPE and the
KV-cache write go through one fused Triton kernel on CUDA, or the reference ops elsewhere.
"""

from __future__ import annotations

import torch

from adaptserve.kernels.attention.metadata import AttentionMetadata
from adaptserve.kernels.attention.torch_ref import TorchReferenceAttention
from adaptserve.kernels.registry import (
    DECODE_ATTENTION,
    PREFILL_ATTENTION,
    KernelRegistry,
    KernelVariant,
    ShapeBucket,
)
from adaptserve.model.rope import RopeContext

_REFERENCE = TorchReferenceAttention()


class TunedAttention:
    name = "tuned"

    def __init__(
        self, registry: KernelRegistry, num_heads: int, num_kv_heads: int, head_dim: int, fused_rope: bool
    ):
        self.registry = registry
        self.layout = (num_heads, num_kv_heads, head_dim)
        self.fused_rope = fused_rope  # Triton rope + KV write (CUDA); else apply_rope + index_copy_
        self._decode: KernelVariant | None = None
        self._prefill: KernelVariant | None = None

    def buckets(
        self, num_decodes: int, num_prefill_tokens: int, max_context_len: int
    ) -> tuple[ShapeBucket | None, ShapeBucket | None]:
        """The decode and prefill shape buckets of a step (None where it has no such rows)."""
        decode = prefill = None
        if num_decodes:
            decode = ShapeBucket.of(DECODE_ATTENTION, num_decodes, max_context_len, *self.layout)
        if num_prefill_tokens:
            prefill = ShapeBucket.of(PREFILL_ATTENTION, num_prefill_tokens, max_context_len, *self.layout)
        return decode, prefill

    def begin_step(self, meta: AttentionMetadata, decode: KernelVariant | None = None) -> None:
        """Pick this step's variants (`decode` forces one: the variant a CUDA graph is captured with)."""
        num_prefill_tokens = int(meta.slot_mapping.shape[0]) - meta.num_decode_tokens if meta.prefills else 0
        decode_bucket, prefill_bucket = self.buckets(
            meta.num_decode_tokens, num_prefill_tokens, meta.max_context_len
        )
        self._decode = decode or (self.registry.choose(decode_bucket) if decode_bucket else None)
        self._prefill = self.registry.choose(prefill_bucket) if prefill_bucket else None

    def rope_and_write_kv(self, q, k, v, rope: RopeContext, k_cache, v_cache, meta: AttentionMetadata):
        """Rotate q and k, write k and v into the caches -> (q, k) rotated."""
        if self.fused_rope:
            from adaptserve.kernels.triton_rope import rope_and_write_kv

            rope_and_write_kv(
                q, k, v, rope.cos_table, rope.sin_table, rope.positions, k_cache, v_cache, meta.slot_mapping
            )
            return q, k
        return _REFERENCE.rope_and_write_kv(q, k, v, rope, k_cache, v_cache, meta)

    def attend(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, H, D]; k, v: this step's [T, KVH, D] (already in the cache) -> [T, H, D]."""
        out = torch.empty_like(q)
        if meta.num_decode_tokens:
            self._decode.run(q, k, v, k_cache, v_cache, meta, scale, out)
        if self._prefill is not None:
            self._prefill.run(q, k, v, k_cache, v_cache, meta, scale, out)
        return out
