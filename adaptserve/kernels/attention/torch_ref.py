"""Reference paged attention in plain PyTorch: runs on CPU and GPU and is the oracle for every kernel.

The KV cache of one layer is a pair of tensors [num_blocks, block_size, num_kv_heads, head_dim]; a
token's slot is block_id * block_size + offset. New K/V are written first, then every query reads its
whole context from the cache, so tokens computed in the same step (chunked prefill, siblings sharing a
prefix) are visible to each other exactly as the causal order says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptserve.kernels.attention.metadata import AttentionMetadata
from adaptserve.model.rope import apply_rope


class TorchReferenceAttention:
    name = "torch_ref"

    def rope_and_write_kv(self, q, k, v, rope, k_cache, v_cache, meta: AttentionMetadata):
        """Rotate q and k ([T, heads, D]) with `rope` (a RopeContext), write k and v -> (q, k)."""
        cos, sin = rope.lookup()
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        return q, k

    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """k, v: [T, KVH, D] written into the flat caches [num_blocks * block_size, KVH, D]."""
        k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q: [T, H, D]; k, v: this step's [T, KVH, D] (already in the cache) -> [T, H, D]."""
        out = torch.empty_like(q)
        num_decode = meta.num_decode_tokens
        if num_decode:
            out[:num_decode] = self._decode(q[:num_decode], k_cache, v_cache, meta, scale)
        self.prefill(q, k, v, k_cache, v_cache, meta, scale, out)
        return out

    def prefill(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, out) -> None:
        """Fill the prefill rows of out [T, H, D], one sequence at a time."""
        if not meta.prefills:
            return
        flat_k = k_cache.view(-1, k_cache.shape[2] * k_cache.shape[3])  # [S, KVH * D]
        flat_v = v_cache.view(-1, v_cache.shape[2] * v_cache.shape[3])  # [S, KVH * D]
        for index, seq in enumerate(meta.prefills, start=meta.num_decode_tokens):
            rows = slice(seq.query_start, seq.query_start + seq.query_len)
            if seq.context_len == seq.query_len:  # nothing cached before: this step's K/V is all
                out[rows] = _attention(q[rows], k[rows], v[rows], scale)
            else:
                slots = seq.context_slots
                if slots is None:
                    slots = _context_slots(meta.block_table[index], seq.context_len, k_cache.shape[1])
                out[rows] = self._prefill(q[rows], flat_k, flat_v, slots, seq, scale)

    def _decode(self, q, k_cache, v_cache, meta, scale):
        """One query per sequence. The G query heads that share a KV head attend to the same keys, so
        they go in as G query rows of that head: no K/V repeated per head. Whole blocks are gathered
        with index_select (contiguous runs; much faster than per-slot indexing on CPU)."""
        num_seqs = q.shape[0]
        block_table, context_mask = meta.decode_block_table, meta.decode_context_mask
        if context_mask is None:
            block_table, context_mask = _decode_views(meta, k_cache.shape[1])
        block_ids = block_table.flatten().long()  # [N * MB]
        k = _gather_blocks(k_cache, block_ids, num_seqs)  # [N, KVH, L, D]
        v = _gather_blocks(v_cache, block_ids, num_seqs)  # [N, KVH, L, D]
        return grouped_decode(q, k, v, context_mask, scale)

    def _prefill(self, q, flat_k, flat_v, slots, seq, scale):
        """A prompt chunk after cached tokens: gather the whole context, then mask causally."""
        num_kv_heads, head_dim = flat_k.shape[1] // q.shape[-1], q.shape[-1]
        k = torch.index_select(flat_k, 0, slots).view(seq.context_len, num_kv_heads, head_dim)
        v = torch.index_select(flat_v, 0, slots).view(seq.context_len, num_kv_heads, head_dim)
        return chunk_after_context(q, k, v, seq, scale)


def chunk_after_context(q, k, v, seq, scale: float) -> torch.Tensor:
    """q [Q, H, D] of a prompt chunk, k, v [L, KVH, D] of its whole context -> [Q, H, D]: query i
    sits at absolute position context_len - query_len + i and sees keys up to it."""
    offset = seq.context_len - seq.query_len
    rows = torch.arange(seq.query_len, device=q.device)[:, None] + offset
    cols = torch.arange(seq.context_len, device=q.device)[None, :]
    return _attention(q, k, v, scale, mask=cols <= rows)  # mask: [Q, L]


def grouped_decode(q, k, v, context_mask, scale: float) -> torch.Tensor:
    """q [N, H, D], k, v [N, KVH, L, D], context_mask [N, L] -> [N, H, D]: the G query heads that
    share a KV head go in as G query rows of that head."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    qg = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [N, KVH, G, D]
    mask = context_mask[:, None, None, :]  # [N, 1, 1, L]
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # [N, KVH, G, D]
    return o.reshape(num_seqs, num_heads, head_dim)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """q: [Q, H, D], k, v: [L, KVH, D] -> [Q, H, D]; causal when no mask is given (then L == Q).
    K/V are repeated per head and the inputs are 4-d so that PyTorch's CPU build takes its fused
    (flash) kernel: 3-d inputs or enable_gqa send it to the slow unfused math path."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)[None]  # [1, H, L, D]
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)[None]  # [1, H, L, D]
    qh = q.transpose(0, 1)[None]  # [1, H, Q, D]
    o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return o[0].transpose(0, 1)


def _decode_views(meta: AttentionMetadata, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode rows' block table, cut to the longest context, and their context mask."""
    num_decode = meta.num_decode_tokens
    context_lens = meta.context_lens[:num_decode]  # [N]
    num_blocks = -(-meta.max_context_len // block_size)
    block_table = meta.block_table[:num_decode, :num_blocks]  # [N, MB]
    offsets = torch.arange(num_blocks * block_size, device=context_lens.device)  # [L]
    return block_table, offsets[None, :] < context_lens[:, None]  # mask [N, L]


def _context_slots(block_row: torch.Tensor, context_len: int, block_size: int) -> torch.Tensor:
    """block_row [MB] -> cache slots [context_len] of positions 0..context_len-1."""
    offsets = torch.arange(context_len, device=block_row.device)  # [L]
    return block_row.long()[offsets // block_size] * block_size + offsets % block_size


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """cache [B, bs, KVH, D], block_ids [N * MB] -> [N, KVH, MB * bs, D]."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    rows = torch.index_select(cache.view(num_blocks, -1), 0, block_ids)  # [N * MB, bs * KVH * D]
    return rows.view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
