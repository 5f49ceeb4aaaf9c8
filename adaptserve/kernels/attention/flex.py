"""Paged attention on PyTorch's FlexAttention: the KV cache is read in place, page by page, via a block mask.

Layout. Each layer's cache [num_blocks, block_size, KVH, D] is viewed, without a copy, as one flex "batch"
of keys [1, KVH, num_blocks * block_size, D]: a key's index is its cache slot. The queries go in one
batch row per sequence, [B, H, L, D], and flex broadcasts the single KV row over them. A step runs two
flex calls: the decodes (L = 1, which compiles to flex's split-KV decoding kernel, G query heads per KV
head packed together) and the prefills (L = the longest prefill query, shorter ones padded).

Block mask. BLOCK_SIZE is (Q_BLOCK, block_size), so one KV block of the mask is one cache page and
kv_indices name physical pages straight from the block table. For query block j of sequence s, whose
rows sit at positions p0 .. p1 (p = context_len - query_len + row):
  - pages wholly at or before p0 are full blocks: every row of the block sees all of them;
  - the pages from there up to p1's page (the causal diagonal and a half-filled last page) are partial,
    and the mask_mod decides element by element;
  - later pages are left out, and so are query blocks made only of padding rows.
No page outside the sequence's block table is visited and the context is never gathered or copied; only
the prefill queries are copied, into their padded batch.

mask_mod. It receives a physical key index, so it needs the page's logical index in that sequence: a
per-step table page_to_logical [B, num_blocks + 1] (-1 = not this sequence's page), as in PyTorch's
experimental PagedAttention. A key is seen when its page belongs to the sequence, its logical position
is below the context length, and it is not after the query (causal, with the sequence's offset). The
mask_mod is exact on its own; the block mask only saves work. That matters on the CPU, where eager
flex ignores the block mask and evaluates the mask_mod over the whole cache.

Costs. Per step, not per layer (the plan is built once per metadata object and reused by every layer):
some forty small tensor ops, 0.4-1.5 ms on an H100 (one group or two); page_to_logical, B * (num_blocks
+ 1) int32 (about 30 MB for 256 decodes over 30k pages); kv_indices and full_kv_indices, B * Q blocks *
max_blocks int32 each. On CUDA flex_attention runs under one torch.compile(dynamic=True): about four
graphs per model (decode; prefill of one or of several query blocks), the first compiled in about 10 s,
each later one in 2-3 s. Sizes 0 and 1 are padded away (_at_least_two) so that batch sizes do not
multiply graphs toward dynamo's recompile limit; fullgraph=True turns hitting that limit into an error
instead of a silent fall back to eager flex, which would materialize scores against the whole cache. On
the CPU flex runs eagerly, and does exactly that: fine for tests, not for serving.

Speed (H100, bf16, 32/8 heads, D 128, pages of 16): prefill chunks about 3x faster than the reference;
decodes about 1.7x slower than the reference's gather + SDPA, because the decoding kernel's key tile is
one page (16 keys); pages of 32 close part of that gap.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from adaptserve.kernels.attention.metadata import AttentionMetadata
from adaptserve.kernels.attention.torch_ref import TorchReferenceAttention

Q_BLOCK = 128  # query rows per block-mask row; flex's Triton tiles (BLOCK_M) divide it
MIN_CUDA_PAGE = 16  # the kernels' key tile is at most one page and tl.dot needs tiles of >= 16
MAX_KV_TILE = 64  # the widest key tile asked of the kernels when pages are larger than that


@dataclass(slots=True)
class _PagedGroup:
    """The sequences of one flex call: their block mask and where their query tokens sit in it."""

    block_mask: BlockMask
    query_len: int  # L of the query batch [B, H, L, D]
    seq_of_token: torch.Tensor | None  # [T_g] batch row of each query token; None: token i is row i (L = 1)
    pos_of_token: torch.Tensor | None  # [T_g] its index among its sequence's query rows


@dataclass(slots=True)
class _StepPlan:
    """What attend() derives from one step's metadata, shared by every layer of the step."""

    num_decodes: int  # the first rows of the batch, one per decode sequence
    decode: _PagedGroup | None
    prefill: _PagedGroup | None


class FlexAttentionBackend:
    """AttentionBackend on flex_attention that pages through its block mask (see the module docstring)."""

    name = "flex"

    def __init__(self) -> None:
        self._meta: AttentionMetadata | None = None  # the metadata the cached plan was built from
        self._geometry: tuple | None = None  # (num_blocks, block_size, device) of that plan
        self._plan: _StepPlan | None = None

    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """k, v: [T, KVH, D] into the caches [num_blocks, block_size, KVH, D], as the reference does."""
        TorchReferenceAttention.write_kv(self, k_cache, v_cache, k, v, slot_mapping)

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
        """q: [T, H, D] -> [T, H, D]. This step's k, v are already in the cache and are read from there."""
        plan = self._plan_for(meta, k_cache)
        keys, values = _as_flex_kv(k_cache), _as_flex_kv(v_cache)  # [1, KVH, num_slots, D] views
        block_size = k_cache.shape[1]
        out = torch.empty_like(q)  # [T, H, D]
        n = plan.num_decodes
        if plan.decode is not None:
            out[:n] = _attend_group(q[:n], keys, values, plan.decode, scale, block_size)
        if plan.prefill is not None:
            out[n:] = _attend_group(q[n:], keys, values, plan.prefill, scale, block_size)
        return out

    def _plan_for(self, meta: AttentionMetadata, k_cache: torch.Tensor) -> _StepPlan:
        """Block masks are built once per step: the runner makes a new AttentionMetadata every step, so the
        object is the key (held here, so that its id cannot be reused while the plan is cached)."""
        geometry = (k_cache.shape[0], k_cache.shape[1], k_cache.device)
        if self._plan is None or self._meta is not meta or self._geometry != geometry:
            self._plan = _build_plan(meta, num_blocks=k_cache.shape[0], block_size=k_cache.shape[1])
            self._meta, self._geometry = meta, geometry
        return self._plan


def _as_flex_kv(cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size, KVH, D] -> [1, KVH, num_blocks * block_size, D], a view: key index = slot."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    return cache.view(1, num_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)


def _attend_group(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    group: _PagedGroup,
    scale: float,
    block_size: int,
) -> torch.Tensor:
    """q: [T_g, H, D] of one group -> [T_g, H, D] through one flex call over the whole cache."""
    q_batch = _batch_queries(q, group)  # [B, H, L, D]
    if q.is_cuda:
        o = _compiled_flex()(
            q_batch,
            keys,
            values,
            block_mask=group.block_mask,
            scale=scale,
            enable_gqa=True,
            kernel_options=_kernel_options(block_size, decode=group.seq_of_token is None),
        )  # [B, H, L, D]
    else:
        o = flex_attention(q_batch, keys, values, block_mask=group.block_mask, scale=scale, enable_gqa=True)
    if group.seq_of_token is None:
        return o[: q.shape[0], :, 0]
    return o[group.seq_of_token, :, group.pos_of_token]  # [T_g, H, D]


def _batch_queries(q: torch.Tensor, group: _PagedGroup) -> torch.Tensor:
    """[T_g, H, D] -> [B, H, L, D], with zero rows for padding; the decodes' own rows are a view."""
    num_rows = group.block_mask.kv_num_blocks.shape[0]
    if group.seq_of_token is None and num_rows == q.shape[0]:
        return q.unsqueeze(2)  # [N, H, 1, D]
    q_batch = q.new_zeros(num_rows, q.shape[1], group.query_len, q.shape[2])  # [B, H, L, D]
    if group.seq_of_token is None:
        q_batch[: q.shape[0], :, 0] = q
    else:
        q_batch[group.seq_of_token, :, group.pos_of_token] = q
    return q_batch


def _kernel_options(block_size: int, decode: bool) -> dict:
    """Triton settings: the key tile must divide the page, one block-mask column. For the decoding kernel,
    3 stages of 4 warps ran 20-25% faster than flex's defaults on an H100 (bf16, D 128, pages of 16, 32)."""
    options = {"BLOCK_N": min(block_size, MAX_KV_TILE)}
    if decode:
        options |= {"num_stages": 3, "num_warps": 4}
    return options


@functools.cache
def _compiled_flex():
    """One compiled flex_attention for the process. dynamic=True: batch size, query length and block-table
    width change every step and must not each cost a recompile."""
    return torch.compile(flex_attention, dynamic=True, fullgraph=True)


def _build_plan(meta: AttentionMetadata, num_blocks: int, block_size: int) -> _StepPlan:
    """Decodes (rows 0..N-1, one per sequence) and prefills (the rest) get a block mask each."""
    if meta.block_table is None or meta.context_lens is None or meta.query_start_loc is None:
        raise ValueError(
            "the flex attention backend reads AttentionMetadata.block_table, context_lens and "
            "query_start_loc, but they are None"
        )
    if meta.block_table.is_cuda and block_size < MIN_CUDA_PAGE:
        raise ValueError(f"the flex attention backend needs cache.block_size >= {MIN_CUDA_PAGE} on CUDA")
    block_table = meta.block_table.int()  # [S, MB]
    context_lens = meta.context_lens.int()  # [S]
    starts = meta.query_start_loc.long()  # [S + 1]
    query_lens = (starts[1:] - starts[:-1]).int()  # [S]
    n, num_seqs = meta.num_decode_tokens, block_table.shape[0]
    decode = prefill = None
    if n:
        seqs = _at_least_two(block_table[:n], context_lens[:n], query_lens[:n])
        decode = _PagedGroup(_paged_block_mask(*seqs, 1, num_blocks, block_size), 1, None, None)
    if num_seqs > n:
        num_tokens = meta.slot_mapping.shape[0] - n
        seqs = _at_least_two(block_table[n:], context_lens[n:], query_lens[n:])
        mask = _paged_block_mask(*seqs, meta.max_query_len, num_blocks, block_size)
        prefill = _PagedGroup(mask, meta.max_query_len, *_token_rows(starts[n:], num_tokens))
    return _StepPlan(n, decode, prefill)


def _at_least_two(
    block_table: torch.Tensor, context_lens: torch.Tensor, query_lens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to at least two sequences and two table columns with empty ones (no context, no query: their
    query blocks list no page). torch.compile specializes sizes 0 and 1, so a lone sequence or a one-page
    table would each cost another compiled graph and bring its recompile limit nearer."""
    rows, cols = max(0, 2 - block_table.shape[0]), max(0, 2 - block_table.shape[1])
    if rows == 0 and cols == 0:
        return block_table, context_lens, query_lens
    return (
        F.pad(block_table, (0, cols, 0, rows)),
        F.pad(context_lens, (0, rows)),
        F.pad(query_lens, (0, rows)),
    )


def _token_rows(starts: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """starts [P + 1] -> (sequence, index within its query) of each of the num_tokens query tokens.
    output_size keeps repeat_interleave from reading the total back from the device."""
    device = starts.device
    seqs = torch.arange(starts.shape[0] - 1, device=device)  # [P]
    seq_of_token = torch.repeat_interleave(seqs, starts[1:] - starts[:-1], output_size=num_tokens)  # [T_p]
    tokens = torch.arange(num_tokens, device=device)  # [T_p]
    return seq_of_token, tokens - (starts[seq_of_token] - starts[0])


def _paged_block_mask(
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    query_lens: torch.Tensor,
    query_len: int,
    num_blocks: int,
    block_size: int,
) -> BlockMask:
    """block_table [B, MB], context_lens [B], query_lens [B] (all int32) -> a block mask over the physical
    pages for queries [B, H, query_len, D] against the cache as keys [1, KVH, num_blocks * block_size, D].

    Query block j of sequence b holds positions first .. first + Q_BLOCK - 1 (first = context - query +
    j * Q_BLOCK). Its full pages are the table's first (first + 1) // block_size entries, its partial pages
    the next ones up to the page of its last visible key; kv_indices are the table entries themselves.
    """
    device = block_table.device
    num_seqs, max_blocks = block_table.shape
    num_q_blocks = -(-query_len // Q_BLOCK)
    offsets = context_lens - query_lens  # [B] position of each sequence's first query row
    block_rows = torch.arange(num_q_blocks, device=device, dtype=torch.int32) * Q_BLOCK  # [QB]
    first = offsets[:, None] + block_rows  # [B, QB] position of each query block's first row
    last = torch.minimum(first + Q_BLOCK - 1, context_lens[:, None] - 1)  # [B, QB] its last visible key
    live = block_rows < query_lens[:, None]  # [B, QB] query blocks with at least one real row
    num_full = torch.where(live, (first + 1) // block_size, 0)  # [B, QB] pages wholly before `first`
    num_seen = torch.where(live, last // block_size + 1, 0)  # [B, QB] pages up to the last visible key
    # partial pages follow the full ones in the table. Both lists get the table's width: the Triton
    # kernels index kv_indices and full_kv_indices with one set of strides
    table = block_table[:, None, :].expand(num_seqs, num_q_blocks, max_blocks)  # [B, QB, MB]
    cols = (num_full[..., None] + torch.arange(max_blocks, device=device)).clamp_(max=max_blocks - 1)
    partial = torch.gather(table, 2, cols.long())  # [B, QB, MB]
    mask_mod = _paged_causal_mask(
        _page_to_logical(block_table, context_lens, num_blocks, block_size), offsets, context_lens, block_size
    )
    return BlockMask.from_kv_blocks(
        (num_seen - num_full)[:, None].int(),  # [B, 1, QB]
        partial[:, None],  # [B, 1, QB, MB]
        num_full[:, None].int(),  # [B, 1, QB]
        table[:, None].contiguous(),  # [B, 1, QB, MB]: full pages are a prefix of the table
        BLOCK_SIZE=(Q_BLOCK, block_size),
        mask_mod=mask_mod,
        seq_lengths=(query_len, num_blocks * block_size),
        compute_q_blocks=False,  # only the backward pass reads the transposed (q-major) lists
    )


def _page_to_logical(
    block_table: torch.Tensor, context_lens: torch.Tensor, num_blocks: int, block_size: int
) -> torch.Tensor:
    """block_table [B, MB] -> [B, num_blocks + 1] int32: the logical index of each physical page in each
    sequence, -1 where the page is not the sequence's. Per sequence: a prefix-cached page is shared."""
    num_seqs, max_blocks = block_table.shape
    cols = torch.arange(max_blocks, device=block_table.device, dtype=torch.int32)  # [MB]
    owned = cols < (context_lens[:, None] + block_size - 1) // block_size  # [B, MB]
    # the table's 0-padding names page 0: send it to a spill column that no key index reaches
    pages = torch.where(owned, block_table, num_blocks).long()  # [B, MB]
    table = torch.full((num_seqs, num_blocks + 1), -1, dtype=torch.int32, device=block_table.device)
    return table.scatter_(1, pages, cols.expand(num_seqs, max_blocks))


def _paged_causal_mask(
    page_to_logical: torch.Tensor, offsets: torch.Tensor, context_lens: torch.Tensor, block_size: int
):
    """The exact mask over physical key indices: key slot kv_idx is seen by query row q_idx of sequence b
    when its page is b's, its logical position is inside b's context and not after the query's position."""

    def mask_mod(b, h, q_idx, kv_idx):
        logical_page = page_to_logical[b, kv_idx // block_size]
        position = logical_page * block_size + kv_idx % block_size
        owned = (logical_page >= 0) & (position < context_lens[b])
        return owned & (position <= offsets[b] + q_idx)

    return mask_mod
