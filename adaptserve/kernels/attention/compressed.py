"""Attention over a compressed KV cache (KVArena): every block is read in its own format and
dequantized on the fly; no full-precision copy of the cache exists.

New K/V are quantized as they are written, in the format of the chunk their block lives in. A prompt
chunk with nothing cached before it attends to its own exact K/V (as every engine's prefill does);
everything else reads the cache. The torch path is the reference and runs everywhere; on CUDA the
Triton kernels (triton_kv_compressed.py) write and read the same bytes.

The error monitor (KVErrorMonitor) samples steps; on a sampled step it takes one layer's fresh prompt
K/V, whose exact values are at hand, and measures for each format what storing them would cost:
the relative reconstruction error of K and V, and the relative error of the prompt's attention
output (same queries, exact K/V against the format's round trip): a bf16 shadow of exactly the
tokens being measured. int4k's round trip is the cache's settled state: full blocks in int4k (keys
per channel), the partial last block in its per-token stand-in.

int4k blocks are read like any other (read_blocks dequantizes keys with their per-channel scales);
they are never written here: new tokens land in per-token formats, and the runner's requantization
moves whole full blocks into int4k (KVArena.write_blocks).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from adaptserve.engine.kv_cache.formats import WHOLE_BLOCK_FORMATS, token_format
from adaptserve.kernels.attention.metadata import AttentionMetadata
from adaptserve.kernels.attention.torch_ref import (
    _attention,
    _context_slots,
    _decode_views,
    chunk_after_context,
    grouped_decode,
)
from adaptserve.kernels.kv_quant import (
    dequantize,
    dequantize_key_blocks,
    quantize,
    quantize_key_blocks,
    value_format,
)
from adaptserve.kernels.registry import DECODE_ATTENTION, FixedKernelChoice, KernelVariant
from adaptserve.model.rope import apply_rope
from adaptserve.runner.kv_arena import KVArena


class KVErrorMonitor:
    """Decayed per-format errors of compressed K/V, measured on sampled prompt chunks."""

    def __init__(self, formats: tuple[str, ...], rate: float, decay: float = 0.8, seed: int = 0):
        self.formats = tuple(f for f in formats if f != "bf16")
        self.rate = rate
        self.decay = decay
        self.attention_error: dict[str, float] = {}  # format -> decayed relative attention-output error
        self.reconstruction_error: dict[str, float] = {}  # format -> decayed relative K/V error
        self.num_samples = 0
        self._random = random.Random(seed)
        self._armed_layer: int | None = None

    def begin_step(self, num_layers: int) -> None:
        """Arm one random layer of this step for measuring, with probability `rate`."""
        sampled = self.formats and self._random.random() < self.rate
        self._armed_layer = self._random.randrange(num_layers) if sampled else None

    def wants(self, layer: int) -> bool:
        return self._armed_layer == layer

    def measure(self, q, k, v, scale: float, layout) -> None:
        """q [Q, H, D], k, v [Q, KVH, D]: one fresh prompt chunk's exact values (causal)."""
        self._armed_layer = None
        exact = _attention(q, k, v, scale).float()  # [Q, H, D]
        for name in self.formats:
            k_hat = _round_trip(k, name, layout, is_key=True)
            v_hat = _round_trip(v, name, layout, is_key=False)
            approx = _attention(q, k_hat, v_hat, scale).float()
            self._update(self.attention_error, name, _relative(approx, exact))
            self._update(self.reconstruction_error, name, (_relative(k_hat, k) + _relative(v_hat, v)) / 2)
        self.num_samples += 1

    def error(self, name: str) -> float | None:
        """The attention-output error of format `name` (0 for bf16; None before any sample)."""
        return 0.0 if name == "bf16" else self.attention_error.get(name)

    def _update(self, table: dict[str, float], name: str, value: float) -> None:
        old = table.get(name)
        table[name] = value if old is None else self.decay * old + (1 - self.decay) * value


class CompressedKVAttention:
    name = "compressed_kv"

    def __init__(
        self,
        num_layers: int,
        layout: tuple[int, int, int],
        monitor: KVErrorMonitor | None = None,
        use_triton: bool = False,
    ):
        """`layout`: (num_heads, num_kv_heads, head_dim), as TunedAttention.layout."""
        self.num_layers = num_layers
        self.layout = layout
        self.monitor = monitor
        self.use_triton = use_triton
        self._layer = 0  # counts layers within a step (the monitor samples one)
        self._plan_meta: AttentionMetadata | None = None  # the step _plan was worked out for
        self._plan: _PrefillPlan | None = None

    def decode_kernel(self) -> FixedKernelChoice:
        """What the decode graph pool captures: this attention's own decode for every bucket. Only
        the Triton path is graph-safe (the reference gathers blocks through host-sized indexing and
        `nonzero`); the chunk-format table is read on the device, so block moves and format
        hand-overs between steps reach replayed graphs."""
        family = f"{self.name}_{'triton' if self.use_triton else 'torch'}"
        return FixedKernelChoice(
            KernelVariant(DECODE_ATTENTION, family, _runs_in_attend, graph_safe=self.use_triton)
        )

    def begin_step(self, meta: AttentionMetadata, decode=None) -> None:
        self._layer = 0
        if self.monitor is not None:
            self.monitor.begin_step(self.num_layers)

    def rope_and_write_kv(self, q, k, v, rope, arena: KVArena, _v_cache, meta: AttentionMetadata):
        cos, sin = rope.lookup()
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        slots = meta.slot_mapping
        if self.use_triton:
            from adaptserve.kernels.attention.triton_kv_compressed import write_kv_compressed

            write_kv_compressed(arena, slots, k, v)
        else:
            keep = (slots >= 0).nonzero().squeeze(1)  # [t] (-1 = a padded row: nothing to write)
            arena.write(slots[keep], k[keep], v[keep])
        return q, k

    def attend(self, q, k, v, arena: KVArena, _v_cache, meta: AttentionMetadata, scale: float):
        """q: [T, H, D]; k, v: this step's [T, KVH, D] (already in the cache) -> [T, H, D]."""
        layer, self._layer = self._layer, self._layer + 1
        out = torch.empty_like(q)
        num_decode = meta.num_decode_tokens
        if num_decode:
            out[:num_decode] = self._decode(q[:num_decode], arena, meta, scale)
        if self.use_triton and meta.prefills:
            self._prefills_at_once(q, k, v, arena, meta, scale, out)
        else:
            for index, seq in enumerate(meta.prefills, start=num_decode):
                rows = slice(seq.query_start, seq.query_start + seq.query_len)
                if seq.context_len == seq.query_len:  # a fresh prompt: its own exact K/V
                    out[rows] = _attention(q[rows], k[rows], v[rows], scale)
                    continue
                slots = seq.context_slots
                if slots is None:
                    slots = _context_slots(meta.block_table[index], seq.context_len, arena.layout.block_size)
                out[rows] = self._prefill(q[rows], arena, slots, seq, scale)
        if self.monitor is not None and self.monitor.wants(layer):
            for seq in meta.prefills:
                if seq.context_len == seq.query_len:  # fresh prompts: their exact K/V are at hand
                    rows = slice(seq.query_start, seq.query_start + seq.query_len)
                    self.monitor.measure(q[rows], k[rows], v[rows], scale, arena.layout)
        return out

    def _decode(self, q, arena: KVArena, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if self.use_triton:
            from adaptserve.kernels.attention.triton_decode import choose_num_splits
            from adaptserve.kernels.attention.triton_kv_compressed import decode_attention_compressed

            out = torch.empty_like(q)
            num, layout = q.shape[0], arena.layout
            # split long contexts while the grid is small (max_context_len is host data; in a graph,
            # the bucket's, so each captured graph keeps its split count)
            kv_heads, tile = layout.num_kv_heads, layout.block_size
            splits = choose_num_splits(num, kv_heads, meta.max_context_len, tile_n=tile)
            decode_attention_compressed(
                q, arena, meta.block_table[:num], meta.context_lens[:num], scale, out, num_splits=splits
            )
            return out
        block_table, context_mask = meta.decode_block_table, meta.decode_context_mask
        if context_mask is None:
            block_table, context_mask = _decode_views(meta, arena.layout.block_size)
        num_seqs, _, head_dim = q.shape
        k, v = arena.read_blocks(block_table.flatten(), q.dtype)  # [N * MB, bs, KVH, D]
        num_kv_heads = k.shape[2]
        k = k.view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)  # [N, KVH, L, D]
        v = v.view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)  # [N, KVH, L, D]
        return grouped_decode(q, k, v, context_mask, scale)

    def _prefills_at_once(self, q, k, v, arena: KVArena, meta: AttentionMetadata, scale: float, out) -> None:
        """Every prompt chunk of the step in one launch of the paged prefill kernel, over a transient
        cache of one-token pages: a fresh prompt's pages are this step's exact K/V rows, a chunk
        after cached tokens reads its context from the blocks, dequantized once for all such chunks
        (the reference loop ran several kernels and a host sync per chunk and layer: 32 layers of
        the 8B preset made a step with a few prompts eager Python).
        q, k, v: [T, *, D]; writes the prefill rows of out [T, H, D]."""
        from adaptserve.kernels.attention.triton_prefill import paged_prefill_attention

        if self._plan_meta is not meta:  # worked out once per step, for every layer
            self._plan_meta, self._plan = meta, _PrefillPlan.of(meta, arena, k.shape[0])
        plan = self._plan
        keys, values = [k], [v]
        if plan.context_blocks is not None:
            context_k, context_v = arena.read_blocks(
                plan.context_blocks, q.dtype, plan.groups
            )  # [NB, bs, KVH, D]
            keys.append(context_k.flatten(0, 1))
            values.append(context_v.flatten(0, 1))
        pages_k = torch.cat(keys).unsqueeze(1)  # [N, 1, KVH, D]
        pages_v = torch.cat(values).unsqueeze(1)  # [N, 1, KVH, D]
        first = meta.num_decode_tokens
        paged_prefill_attention(
            q, pages_k, pages_v, plan.table, meta.query_start_loc[first:], meta.context_lens[first:], scale,
            meta.max_query_len, out=out,
        )  # fmt: skip

    def _prefill(self, q, arena: KVArena, slots: torch.Tensor, seq, scale: float) -> torch.Tensor:
        """A prompt chunk after cached tokens: the whole context read from the cache, masked causally."""
        block_size = arena.layout.block_size
        block_ids = slots[::block_size] // block_size  # [MB] the context's blocks in order
        k, v = arena.read_blocks(block_ids, q.dtype)  # [MB, bs, KVH, D]
        k = k.flatten(0, 1)[: seq.context_len]  # [L, KVH, D]
        v = v.flatten(0, 1)[: seq.context_len]  # [L, KVH, D]
        return chunk_after_context(q, k, v, seq, scale)


@dataclass
class _PrefillPlan:
    """Where a step's prompt chunks find their keys in the transient cache of one-token pages: this
    step's K/V rows first, then the dequantized context blocks of chunks after cached tokens."""

    table: torch.Tensor  # [S, W] int32: row of each position of each prefill sequence
    context_blocks: torch.Tensor | None  # [NB] block ids of the chunks' contexts, in order
    groups: list | None  # context_blocks' format groups (the same in every layer)

    @classmethod
    def of(cls, meta: AttentionMetadata, arena: KVArena, num_rows: int) -> _PrefillPlan:
        """`num_rows`: this step's K/V rows, the transient cache's first pages."""
        first, block_size = meta.num_decode_tokens, arena.layout.block_size
        starts, context_blocks = [], []  # each sequence's first row in the transient cache
        for index, seq in enumerate(meta.prefills, start=first):
            if seq.context_len == seq.query_len:  # a fresh prompt: its own exact K/V
                starts.append(seq.query_start)
                continue
            slots = seq.context_slots
            if slots is None:
                slots = _context_slots(meta.block_table[index], seq.context_len, block_size)
            block_ids = slots[::block_size] // block_size  # [MB] the context's blocks in order
            context_blocks.append(block_ids)
            starts.append(num_rows)
            num_rows += block_ids.shape[0] * block_size
        device = meta.slot_mapping.device
        width = max(seq.context_len for seq in meta.prefills)
        row_starts = torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True)  # [S]
        table = row_starts[:, None] + torch.arange(width, dtype=torch.int32, device=device)[None, :]  # [S, W]
        if not context_blocks:
            return cls(table, None, None)
        blocks = torch.cat(context_blocks)
        return cls(table, blocks, arena.format_groups(blocks))


def _runs_in_attend(*args, **kwargs) -> None:
    raise RuntimeError("the compressed cache's decode runs inside CompressedKVAttention.attend")


def _round_trip(x: torch.Tensor, name: str, layout, is_key: bool) -> torch.Tensor:
    """x [Q, KVH, D] as the cache would hold it in format `name`. For int4k, as it settles: the full
    blocks' worth of tokens requantized (keys per channel over each run of block_size tokens, values
    int4), the partial tail in the per-token stand-in (int8)."""
    group = layout.int4_group_size
    if name not in WHOLE_BLOCK_FORMATS:
        data, scales = quantize(x, name, group, layout.native_dtype)
        return dequantize(data, scales, name, group, x.dtype)
    num_full = x.shape[0] // layout.block_size * layout.block_size
    full = x[:num_full].unflatten(0, (-1, layout.block_size))  # [B, bs, KVH, D]
    if is_key:
        full_hat = dequantize_key_blocks(*quantize_key_blocks(full), x.dtype).flatten(0, 1)
    else:
        full_hat = _round_trip(full.flatten(0, 1), value_format(name), layout, is_key)
    tail_hat = _round_trip(x[num_full:], token_format(name), layout, is_key)
    return torch.cat([full_hat, tail_hat])  # [Q, KVH, D]


def _relative(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).norm() / exact.float().norm().clamp(min=1e-12))
