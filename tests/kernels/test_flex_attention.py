"""FlexAttentionBackend against the torch reference on fresh random batches, and its block mask against its
mask_mod.

On the CPU flex_attention runs eagerly, which evaluates the mask_mod over the whole cache and ignores the
block mask; so the block mask (what the compiled CUDA kernels follow) is checked on its own, element by
element, and the CUDA test covers both together.

Every cache slot starts as random data, so a key read from a wrong page, a padded block-table entry, the
unwritten tail of a last page or a position after the query changes the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from adaptserve.kernels.attention import flex
from adaptserve.kernels.attention.flex import FlexAttentionBackend
from adaptserve.kernels.attention.metadata import AttentionMetadata, PrefillSequence
from adaptserve.kernels.attention.torch_ref import TorchReferenceAttention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # atol = rtol


@dataclass
class Batch:
    q: torch.Tensor  # [T, H, D]
    k: torch.Tensor  # [T, KVH, D] this step's keys
    v: torch.Tensor  # [T, KVH, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor  # [num_blocks, block_size, KVH, D]
    meta: AttentionMetadata
    scale: float


def make_batch(
    specs: list[tuple[int, int]],
    *,
    heads: tuple[int, int] = (4, 2),
    head_dim: int = 16,
    block_size: int = 4,
    num_blocks: int = 64,
    dtype: torch.dtype = torch.float32,
    shared_prefix_blocks: int = 0,
    spare_page_zero: bool = False,
    device: str = "cpu",
    seed: int = 0,
) -> Batch:
    """specs: (cached tokens, new tokens) per sequence, decodes (1 new token) first. Pages are drawn in a
    shuffled order; with shared_prefix_blocks, every sequence whose context covers them starts with the
    same pages (a prefix-cache hit); with spare_page_zero, no sequence owns page 0, which still pads the
    block table. This step's K/V go in through the backend's write_kv."""
    g = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads = heads
    pages = torch.randperm(num_blocks, generator=g)  # [num_blocks]
    pages = pages[pages != 0] if spare_page_zero else pages
    tables = _block_tables(specs, block_size, pages.tolist(), shared_prefix_blocks)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(cache_shape, generator=g), torch.randn(cache_shape, generator=g)
    num_tokens = sum(new for _, new in specs)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=g)  # [T, H, D]
    k, v = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=g) for _ in range(2))  # [T, KVH, D]
    meta = _metadata(specs, tables, block_size)
    batch = Batch(q, k, v, k_cache, v_cache, meta, head_dim**-0.5)
    batch = _to(batch, dtype, device)
    FlexAttentionBackend().write_kv(batch.k_cache, batch.v_cache, batch.k, batch.v, batch.meta.slot_mapping)
    return batch


def _block_tables(specs, block_size, pages, shared_prefix_blocks) -> list[list[int]]:
    shared, free = pages[:shared_prefix_blocks], pages[shared_prefix_blocks:]
    tables = []
    for cached, new in specs:
        needed = -(-(cached + new) // block_size)
        prefix = shared[:needed] if cached >= len(shared) * block_size else []
        rest = needed - len(prefix)
        assert rest <= len(free), "make_batch: not enough cache blocks for these specs"
        tables.append(prefix + free[:rest])
        free = free[rest:]
    return tables


def _metadata(specs, tables, block_size) -> AttentionMetadata:
    """Both the reference's per-sequence fields and the dense ones, as the runner lays them out."""
    num_decodes = sum(1 for _, new in specs if new == 1)
    assert all(new == 1 for _, new in specs[:num_decodes]), "decodes come first"
    width = max(len(t) for t in tables)
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)  # [S, MB]
    context_lens = torch.tensor([c + n for c, n in specs], dtype=torch.int32)  # [S]
    query_lens = torch.tensor([n for _, n in specs])  # [S]
    query_start_loc = torch.cat([torch.zeros(1), query_lens.cumsum(0)]).int()  # [S + 1]

    def slots(s: int, positions: range) -> torch.Tensor:
        p = torch.tensor(list(positions), dtype=torch.int64)
        return block_table[s, p // block_size].long() * block_size + p % block_size

    slot_mapping = torch.cat([slots(s, range(c, c + n)) for s, (c, n) in enumerate(specs)])  # [T]
    decode_table = decode_mask = None
    if num_decodes:
        decode_pages = -(-int(context_lens[:num_decodes].max()) // block_size)
        decode_table = block_table[:num_decodes, :decode_pages].long()  # [N, MB']
        decode_mask = torch.arange(decode_pages * block_size)[None] < context_lens[:num_decodes, None]
    prefills = [
        PrefillSequence(int(query_start_loc[s]), n, c + n, slots(s, range(c + n)))
        for s, (c, n) in enumerate(specs)
        if s >= num_decodes
    ]
    return AttentionMetadata(
        slot_mapping=slot_mapping,
        num_decode_tokens=num_decodes,
        decode_block_table=decode_table,
        decode_context_mask=decode_mask,
        prefills=prefills,
        block_table=block_table,
        context_lens=context_lens,
        query_start_loc=query_start_loc,
        max_query_len=int(query_lens.max()),
        max_context_len=int(context_lens.max()),
    )


def _to(batch: Batch, dtype: torch.dtype, device: str) -> Batch:
    m = batch.meta
    moved = AttentionMetadata(
        slot_mapping=m.slot_mapping.to(device),
        num_decode_tokens=m.num_decode_tokens,
        decode_block_table=None if m.decode_block_table is None else m.decode_block_table.to(device),
        decode_context_mask=None if m.decode_context_mask is None else m.decode_context_mask.to(device),
        prefills=[
            PrefillSequence(p.query_start, p.query_len, p.context_len, p.context_slots.to(device))
            for p in m.prefills
        ],
        block_table=m.block_table.to(device),
        context_lens=m.context_lens.to(device),
        query_start_loc=m.query_start_loc.to(device),
        max_query_len=m.max_query_len,
        max_context_len=m.max_context_len,
    )
    tensors = (batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache)
    return Batch(*(t.to(device, dtype) for t in tensors), moved, batch.scale)


def assert_matches_reference(batch: Batch, backend: FlexAttentionBackend | None = None) -> torch.Tensor:
    args = (batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    expected = TorchReferenceAttention().attend(*args)  # [T, H, D]
    got = (backend or FlexAttentionBackend()).attend(*args)  # [T, H, D]
    assert got.shape == expected.shape and got.dtype == expected.dtype
    tol = TOLERANCE[batch.q.dtype]
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    return got


GQA = [((4, 2), 16), ((6, 2), 32)]


@pytest.mark.parametrize(("heads", "head_dim"), GQA)
def test_decodes_only(heads, head_dim):
    # contexts that end mid-page, on a page boundary and inside the first page
    batch = make_batch([(6, 1), (11, 1), (0, 1), (3, 1), (20, 1)], heads=heads, head_dim=head_dim)
    assert_matches_reference(batch)


@pytest.mark.parametrize(("heads", "head_dim"), GQA)
def test_fresh_prompt(heads, head_dim):
    assert_matches_reference(make_batch([(0, 23)], heads=heads, head_dim=head_dim))


@pytest.mark.parametrize(("heads", "head_dim"), GQA)
def test_chunk_after_cached_prefix(heads, head_dim):
    # the chunk starts mid-page (offset 13), so the causal diagonal cuts through its pages
    assert_matches_reference(make_batch([(13, 9)], heads=heads, head_dim=head_dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "head_dim"), GQA)
def test_mixed_batch(heads, head_dim, dtype):
    specs = [(9, 1), (16, 1), (2, 1), (0, 17), (12, 6), (31, 3), (8, 2)]
    batch = make_batch(specs, heads=heads, head_dim=head_dim, dtype=dtype, shared_prefix_blocks=2)
    table = batch.meta.block_table
    assert table[0, 0] == table[4, 0], "sequences 0 and 4 share their first pages (a prefix-cache hit)"
    assert_matches_reference(batch)


@pytest.mark.parametrize("specs", [[(2, 1)], [(0, 3)], [(1, 1), (0, 2)]], ids=["decode", "prompt", "both"])
def test_lone_short_sequences(specs):
    """One sequence per group and one page per table: the backend pads both to two (see _at_least_two)."""
    assert_matches_reference(make_batch(specs, block_size=4, num_blocks=8))


def test_prefill_longer_than_a_query_block():
    """More query rows than one block-mask row (Q_BLOCK) next to a short prefill that is padded to it."""
    specs = [(5, 1), (40, flex.Q_BLOCK + 30), (0, 7)]
    batch = make_batch(specs, block_size=16, num_blocks=24, head_dim=16)
    assert_matches_reference(batch)


def test_attention_reads_only_its_own_pages():
    """Changing every page no sequence owns, page 0 that pads the block table among them, changes nothing."""
    batch = make_batch([(6, 1), (30, 1), (0, 9), (5, 4)], num_blocks=24, spare_page_zero=True)
    args = (batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    before = FlexAttentionBackend().attend(*args)
    table, ctx = batch.meta.block_table, batch.meta.context_lens
    owned = {int(table[s, i]) for s in range(len(ctx)) for i in range(-(-int(ctx[s]) // 4))}
    unowned = [p for p in range(24) if p not in owned]
    assert 0 in unowned and (table == 0).any(), "page 0 is unowned and pads the table"
    batch.k_cache[unowned] = 1e3
    batch.v_cache[unowned] = 1e3
    after = FlexAttentionBackend().attend(*args)
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_plan_is_built_once_per_step():
    batch = make_batch([(3, 1), (0, 5)])
    backend = FlexAttentionBackend()
    args = (batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    backend.attend(*args)
    plan = backend._plan
    backend.attend(*args)  # the next layer of the same step
    assert backend._plan is plan
    next_step = make_batch([(3, 1), (0, 5)], seed=1)
    backend.attend(next_step.q, next_step.k, next_step.v, *args[3:5], next_step.meta, next_step.scale)
    assert backend._plan is not plan


def test_missing_dense_fields_are_an_error():
    batch = make_batch([(3, 1)])
    batch.meta.block_table = None
    with pytest.raises(ValueError, match="block_table"):
        FlexAttentionBackend().attend(
            batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta, batch.scale
        )


@pytest.mark.parametrize("block_size", [4, 16])
def test_block_mask_agrees_with_mask_mod(block_size):
    """What the compiled kernels compute: full blocks whole, partial blocks through the mask_mod, the rest
    skipped. For every real query row that must equal the mask_mod alone, and a full block must be one the
    mask_mod keeps whole (padding rows included, since the kernel does not mask them there)."""
    specs = [(200, 1), (0, 300), (37, 150), (130, 2), (5, 129)]
    num_blocks = sum(-(-(c + n) // block_size) for c, n in specs) + 3
    meta = make_batch(specs, block_size=block_size, num_blocks=num_blocks, heads=(2, 1)).meta
    starts = meta.query_start_loc.long()
    mask = flex._paged_block_mask(
        meta.block_table,
        meta.context_lens,
        (starts[1:] - starts[:-1]).int(),
        meta.max_query_len,
        num_blocks,
        block_size,
    )
    assert mask.kv_indices.shape == mask.full_kv_indices.shape, "the kernels read both with one stride"
    exact = _dense_mask_mod(mask, meta.max_query_len, num_blocks * block_size)  # [B, L, slots]
    full = _dense_blocks(mask.full_kv_num_blocks, mask.full_kv_indices, num_blocks, block_size)
    partial = _dense_blocks(mask.kv_num_blocks, mask.kv_indices, num_blocks, block_size)
    full, partial = full[:, : exact.shape[1]], partial[:, : exact.shape[1]]
    assert not (full & partial).any(), "a page is listed as both full and partial"
    assert (exact[full]).all(), "a full block holds keys the mask_mod rejects"
    computed = full | (partial & exact)
    query_lens = (starts[1:] - starts[:-1]).tolist()
    for s, n in enumerate(query_lens):
        assert torch.equal(computed[s, :n], exact[s, :n]), f"sequence {s}"
        cached = specs[s][0]
        assert exact[s, :n].sum() == sum(cached + i + 1 for i in range(n)), "row i sees cached + i + 1 keys"


def _dense_mask_mod(mask, query_len: int, num_slots: int) -> torch.Tensor:
    """The mask_mod evaluated at every (sequence, query row, cache slot): [B, L, slots] bool."""
    b = torch.arange(mask.kv_num_blocks.shape[0])[:, None, None]
    q_idx = torch.arange(query_len)[None, :, None]
    kv_idx = torch.arange(num_slots)[None, None, :]
    return mask.mask_mod(b, 0, q_idx, kv_idx)


def _dense_blocks(num: torch.Tensor, indices: torch.Tensor, num_blocks: int, block_size: int) -> torch.Tensor:
    """Block lists [B, 1, QB] and [B, 1, QB, W] -> [B, QB * Q_BLOCK, slots] bool, True inside listed pages."""
    listed = torch.arange(indices.shape[-1]) < num[..., None]  # [B, 1, QB, W]
    pages = torch.zeros(*num.shape, num_blocks + 1, dtype=torch.bool)  # [B, 1, QB, pages + 1]
    pages.scatter_(-1, torch.where(listed, indices.long(), num_blocks), True)
    pages = pages[..., :num_blocks, None].expand(-1, -1, -1, -1, block_size).flatten(-2)  # [B, 1, QB, slots]
    return pages[:, 0].repeat_interleave(flex.Q_BLOCK, dim=1)


@pytest.mark.cuda
def test_cuda_compiled_mixed_batch():
    """The compiled kernels (split-KV decoding and the prefill kernel) on a real shape, two steps in a row."""
    torch.manual_seed(0)
    first = [(37, 1), (500, 1), (1023, 1), (128, 1), (0, 300), (500, 200), (47, 129)]
    second = [(38, 1), (501, 1), (1024, 1), (129, 1), (0, 61), (300, 1000)]
    backend = FlexAttentionBackend()
    for specs in (first, second):
        batch = make_batch(
            specs,
            heads=(32, 8),
            head_dim=128,
            block_size=16,
            num_blocks=512,
            dtype=torch.bfloat16,
            shared_prefix_blocks=4,
            device="cuda",
        )
        assert_matches_reference(batch, backend)
