"""KVArena: one layer's KV bytes as chunks of blocks of one format each. Reads after writes per
format, token-at-a-time writes, writes that stay inside their block, migrations between formats, and
how many blocks of each format a chunk holds; int4k (keys per channel) only as whole blocks.

A chunk is 16 blocks of the native dtype. Error bounds (relative Frobenius, unit normal data, see
tests/kernels/test_kv_quant.py): int8 < 0.01, fp8 < 0.04, int4 < 0.12 (groups of 64), int4k < 0.12
(keys < 0.07, values int4's); the native format ("bf16") is exact in the native dtype.
"""

from __future__ import annotations

import pytest
import torch

from adaptserve.engine.kv_cache.formats import FORMAT_CODES, KV_FORMATS, WHOLE_BLOCK_FORMATS, KVLayout
from adaptserve.runner.kv_arena import KVArena

BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 16, 3, 64
NATIVE_BLOCKS_PER_CHUNK = 16
MAX_ERROR = {"fp8": 0.04, "int8": 0.01, "int4k": 0.12, "int4": 0.12}
TOKEN_FORMATS = tuple(f for f in KV_FORMATS if f not in WHOLE_BLOCK_FORMATS)  # written a token at a time
NATIVE_DTYPES = [torch.float32, torch.bfloat16]


def make_arena(
    native_dtype: torch.dtype, chunk_formats: tuple[str, ...] = TOKEN_FORMATS, head_dim: int = HEAD_DIM
):
    """An arena whose chunk i holds format chunk_formats[i]."""
    layout = KVLayout(BLOCK_SIZE, NUM_KV_HEADS, head_dim, native_dtype)
    chunk_bytes = NATIVE_BLOCKS_PER_CHUNK * layout.format("bf16").block_bytes
    max_blocks = max(chunk_bytes // fmt.block_bytes for fmt in layout.formats())
    codes = torch.tensor([FORMAT_CODES[name] for name in chunk_formats], dtype=torch.int8)  # [C]
    return KVArena(layout, len(chunk_formats), chunk_bytes, max_blocks, codes, torch.device("cpu"))


def block_id(arena: KVArena, chunk: int, index: int) -> int:
    return chunk * arena.max_blocks_per_chunk + index


def block_byte_range(arena: KVArena, chunk: int, index: int) -> tuple[int, int]:
    """Where a block's bytes sit in its chunk's row of `arena.bytes`."""
    block_bytes = arena.layout.format(KV_FORMATS[int(arena.chunk_formats[chunk])]).block_bytes
    return index * block_bytes, (index + 1) * block_bytes


def random_kv(num_blocks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)  # each [N, bs, H, D]


def block_slots(block_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor(block_ids)[:, None]  # [N, 1]
    return (ids * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).flatten()  # [N * bs]


def write_blocks(arena: KVArena, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
    """Write whole blocks: k, v [N, bs, H, D] into blocks block_ids [N]."""
    arena.write(block_slots(block_ids), k.flatten(0, 1), v.flatten(0, 1))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def assert_close_in_format(name: str, native_dtype, out: torch.Tensor, expected: torch.Tensor) -> None:
    if name == "bf16":
        assert torch.equal(out, expected.to(native_dtype).float())
    else:
        assert rel_error(out, expected) < MAX_ERROR[name]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_block_counts_per_chunk(head_dim):
    arena = make_arena(torch.bfloat16, KV_FORMATS, head_dim=head_dim)
    counts = {name: views.blocks_per_chunk for name, views in arena.views.items()}
    block_bytes = {fmt.name: fmt.block_bytes for fmt in arena.layout.formats()}
    assert counts == {name: arena.chunk_bytes // block_bytes[name] for name in KV_FORMATS}
    assert counts["bf16"] == NATIVE_BLOCKS_PER_CHUNK
    assert counts["int8"] >= 1.9 * NATIVE_BLOCKS_PER_CHUNK
    assert counts["fp8"] == counts["int8"]
    assert counts["int4"] >= 3.5 * NATIVE_BLOCKS_PER_CHUNK
    assert counts["int8"] < counts["int4k"] < counts["int4"]  # per-channel key scales cost a little
    assert arena.max_blocks_per_chunk == counts["int4"]
    for views in arena.views.values():  # [C, n, bs, H, D'] over the chunk's first n blocks
        assert views.k_data.shape[:4] == (5, views.blocks_per_chunk, BLOCK_SIZE, NUM_KV_HEADS)
    key_scales = arena.views["int4k"].k_scales  # [C, n, H, 2, D]: per block, head and channel
    assert key_scales.shape == (5, counts["int4k"], NUM_KV_HEADS, 2, head_dim)


def test_block_counts_by_hand():
    # head_dim 64, 16 tokens, 3 heads: bf16 2 * 16 * 3 * 64 * 2 = 12288 bytes; int8 (and fp8) adds one
    # fp16 scale per token and head: 2 * (3072 + 96) = 6336; int4: 2 * (1536 + 2 * 96) = 3456; int4k:
    # int4's data and V scales, K scales (scale, min) per head and channel: 2 * 1536 + 3 * 2 * 64 * 2 + 192
    # = 4032
    arena = make_arena(torch.bfloat16)
    assert arena.chunk_bytes == 16 * 12288
    assert arena.layout.format("int4k").block_bytes == 4032
    assert {name: views.blocks_per_chunk for name, views in arena.views.items()} == {
        "bf16": 16,
        "fp8": 31,
        "int8": 31,
        "int4k": 48,
        "int4": 56,
    }
    fp32 = make_arena(torch.float32)  # a native block twice as large: twice as many compressed blocks fit
    assert {name: views.blocks_per_chunk for name, views in fp32.views.items()} == {
        "bf16": 16,
        "fp8": 62,
        "int8": 62,
        "int4k": 97,
        "int4": 113,
    }


@pytest.mark.parametrize("native_dtype", NATIVE_DTYPES)
def test_write_then_read_in_every_format(native_dtype):
    arena = make_arena(native_dtype)
    # the first and last block of each chunk, written in one call across chunks of all formats
    targets = [(c, i) for c in range(4) for i in (0, arena.views[KV_FORMATS[c]].blocks_per_chunk - 1)]
    ids = [block_id(arena, c, i) for c, i in targets]
    k, v = random_kv(len(ids), seed=1)
    order = torch.randperm(len(ids) * BLOCK_SIZE, generator=torch.Generator().manual_seed(0))
    arena.write(block_slots(ids)[order], k.flatten(0, 1)[order], v.flatten(0, 1)[order])
    out_k, out_v = arena.read_blocks(torch.tensor(ids), torch.float32)
    assert out_k.shape == (len(ids), BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM) and out_k.dtype == torch.float32
    for row, (chunk, _) in enumerate(targets):
        name = KV_FORMATS[chunk]
        assert_close_in_format(name, native_dtype, out_k[row], k[row])
        assert_close_in_format(name, native_dtype, out_v[row], v[row])
    # blocks never written read back as zeros in every format (no NaN from zero scales)
    unwritten_k, _ = arena.read_blocks(torch.tensor([block_id(arena, c, 1) for c in range(4)]), torch.float32)
    assert torch.equal(unwritten_k, torch.zeros_like(unwritten_k))


@pytest.mark.parametrize("native_dtype", NATIVE_DTYPES)
def test_read_in_another_dtype(native_dtype):
    arena = make_arena(native_dtype)
    ids = [block_id(arena, c, 2) for c in range(4)]
    k, v = random_kv(4, seed=2)
    write_blocks(arena, ids, k, v)
    as_fp32 = arena.read_blocks(torch.tensor(ids), torch.float32)
    as_bf16 = arena.read_blocks(torch.tensor(ids), torch.bfloat16)
    for fp32, bf16 in zip(as_fp32, as_bf16, strict=True):
        assert bf16.dtype == torch.bfloat16
        assert torch.equal(bf16, fp32.to(torch.bfloat16))


@pytest.mark.parametrize("native_dtype", NATIVE_DTYPES)
@pytest.mark.parametrize("chunk", range(4))
def test_token_at_a_time_equals_a_whole_block_write(native_dtype, chunk):
    arena = make_arena(native_dtype)
    k, v = random_kv(1, seed=3)
    one_by_one, whole = block_id(arena, chunk, 1), block_id(arena, chunk, 2)
    for t in torch.randperm(BLOCK_SIZE, generator=torch.Generator().manual_seed(chunk)).tolist():
        arena.write(torch.tensor([one_by_one * BLOCK_SIZE + t]), k[0, t : t + 1], v[0, t : t + 1])
    write_blocks(arena, [whole], k, v)
    start_a, end_a = block_byte_range(arena, chunk, 1)
    start_b, end_b = block_byte_range(arena, chunk, 2)
    assert arena.bytes[chunk, start_b:end_b].any()
    assert torch.equal(arena.bytes[chunk, start_a:end_a], arena.bytes[chunk, start_b:end_b])


def token_byte_mask(arena: KVArena, chunk: int, index: int, token: int) -> torch.Tensor:
    """[chunk_bytes] True on the bytes of one token of one block: its part of all four regions."""
    fmt = arena.layout.format(KV_FORMATS[int(arena.chunk_formats[chunk])])
    mask = torch.zeros(arena.chunk_bytes, dtype=torch.bool)
    start = index * fmt.block_bytes
    for region, size in (
        (fmt.k_data, fmt.data_bytes),
        (fmt.v_data, fmt.data_bytes),
        (fmt.k_scales, fmt.k_scale_bytes),
        (fmt.v_scales, fmt.v_scale_bytes),
    ):
        per_token = size // BLOCK_SIZE
        mask[start + region + token * per_token : start + region + (token + 1) * per_token] = True
    return mask


def assert_only_chunk_changed(arena: KVArena, before: torch.Tensor, chunk: int) -> None:
    assert torch.equal(arena.bytes[:chunk], before[:chunk])
    assert torch.equal(arena.bytes[chunk + 1 :], before[chunk + 1 :])


@pytest.mark.parametrize("native_dtype", NATIVE_DTYPES)
def test_writes_change_no_byte_outside_their_block(native_dtype):
    arena = make_arena(native_dtype)
    g = torch.Generator().manual_seed(4)
    arena.bytes.copy_(torch.randint(0, 256, arena.bytes.shape, generator=g, dtype=torch.uint8))
    k, v = random_kv(1, seed=4)
    for chunk in range(4):
        last = arena.views[KV_FORMATS[chunk]].blocks_per_chunk - 1
        for index in (0, last):  # a chunk's first and its last block
            before = arena.bytes.clone()
            write_blocks(arena, [block_id(arena, chunk, index)], k, v)
            start, end = block_byte_range(arena, chunk, index)
            assert_only_chunk_changed(arena, before, chunk)
            assert torch.equal(arena.bytes[chunk, :start], before[chunk, :start])
            assert torch.equal(arena.bytes[chunk, end:], before[chunk, end:])
            assert not torch.equal(arena.bytes[chunk, start:end], before[chunk, start:end])
            # one token: only its own K and V data and scales change
            token = index % BLOCK_SIZE
            before = arena.bytes.clone()
            slot = torch.tensor([block_id(arena, chunk, index) * BLOCK_SIZE + token])
            arena.write(slot, -2.0 * k[0, token : token + 1], v[0, token : token + 1] + 1.0)
            assert_only_chunk_changed(arena, before, chunk)
            changed = arena.bytes[chunk] != before[chunk]  # [chunk_bytes]
            assert changed.any()
            assert not (changed & ~token_byte_mask(arena, chunk, index, token)).any()


@pytest.mark.parametrize("native_dtype", NATIVE_DTYPES)
def test_migrate_down_the_formats_and_back(native_dtype):
    arena = make_arena(native_dtype, chunk_formats=("bf16", "int8", "int4", "bf16"))
    k, v = random_kv(3, seed=5)
    src = [block_id(arena, 0, i) for i in range(3)]
    write_blocks(arena, src, k, v)
    in_bf16 = arena.read_blocks(torch.tensor(src), torch.float32)

    in_int8_ids = [block_id(arena, 1, i) for i in (4, 30, 0)]
    arena.migrate(torch.tensor(src), torch.tensor(in_int8_ids))
    in_int8 = arena.read_blocks(torch.tensor(in_int8_ids), torch.float32)
    src_after = arena.read_blocks(torch.tensor(src), torch.float32)  # a migration leaves its source as it was
    assert all(torch.equal(a, b) for a, b in zip(src_after, in_bf16, strict=True))
    for out, expected in zip(in_int8, (k, v), strict=True):
        assert rel_error(out, expected) < MAX_ERROR["int8"]

    in_int4_ids = [block_id(arena, 2, i) for i in (55, 1, 7)]
    arena.migrate(torch.tensor(in_int8_ids), torch.tensor(in_int4_ids))
    in_int4 = arena.read_blocks(torch.tensor(in_int4_ids), torch.float32)
    for out, expected in zip(in_int4, (k, v), strict=True):
        assert rel_error(out, expected) < MAX_ERROR["int4"] + MAX_ERROR["int8"]

    back_ids = [block_id(arena, 3, i) for i in (15, 0, 3)]
    arena.migrate(torch.tensor(in_int4_ids), torch.tensor(back_ids))
    back = arena.read_blocks(torch.tensor(back_ids), torch.float32)
    # bf16 holds the int4 values exactly, up to the native dtype
    for out, int4_values in zip(back, in_int4, strict=True):
        assert torch.equal(out, int4_values.to(native_dtype).float())


@pytest.mark.parametrize("native_dtype", NATIVE_DTYPES)
def test_migrate_reads_every_source_before_writing(native_dtype):
    arena = make_arena(native_dtype, chunk_formats=("bf16", "int8"))
    a, b = block_id(arena, 0, 3), block_id(arena, 1, 3)
    k, v = random_kv(2, seed=6)
    write_blocks(arena, [a, b], k, v)
    k_before, v_before = arena.read_blocks(torch.tensor([a, b]), torch.float32)
    arena.migrate(torch.tensor([a, b]), torch.tensor([b, a]))  # a swap: each destination is a source
    k_after, v_after = arena.read_blocks(torch.tensor([b, a]), torch.float32)
    assert torch.equal(k_after[1], k_before[1].to(native_dtype).float())  # int8 values into bf16: exact
    assert torch.equal(v_after[1], v_before[1].to(native_dtype).float())
    assert rel_error(k_after[0], k[0]) < MAX_ERROR["int8"]
    assert rel_error(v_after[0], v[0]) < MAX_ERROR["int8"]


# ---- int4k: whole blocks only ------------------------------------------------------------------------


@pytest.mark.parametrize("native_dtype", NATIVE_DTYPES)
def test_a_token_write_into_int4k_is_refused(native_dtype):
    arena = make_arena(native_dtype, chunk_formats=("int8", "int4k"))
    k, v = random_kv(1, seed=7)
    before = arena.bytes.clone()
    slots = torch.tensor([0, block_id(arena, 1, 2) * BLOCK_SIZE + 5])  # an int8 slot and an int4k slot
    with pytest.raises(ValueError, match="cannot write single tokens into int4k blocks"):
        arena.write(slots, k[0, :2], v[0, :2])
    assert torch.equal(arena.bytes[1], before[1])


@pytest.mark.parametrize("native_dtype", NATIVE_DTYPES)
def test_write_blocks_equals_token_writes_in_per_token_formats(native_dtype):
    arena, other = make_arena(native_dtype), make_arena(native_dtype)
    ids = [block_id(arena, c, 1) for c in range(len(TOKEN_FORMATS))]
    k, v = random_kv(len(ids), seed=8)
    arena.write_blocks(torch.tensor(ids), k, v)
    write_blocks(other, ids, k, v)  # a token at a time
    assert arena.bytes.any() and torch.equal(arena.bytes, other.bytes)


@pytest.mark.parametrize("native_dtype", NATIVE_DTYPES)
def test_int4k_blocks_round_trip_with_per_channel_keys(native_dtype):
    arena = make_arena(native_dtype, chunk_formats=("int4", "int4k"))
    k, v = random_kv(3, seed=9)
    k[..., [3, 40]] *= 10.0  # outlier key channels
    int4k_ids, int4_ids = (
        [block_id(arena, 1, i) for i in (0, 47, 5)],
        [block_id(arena, 0, i) for i in (0, 1, 2)],
    )
    arena.write_blocks(torch.tensor(int4k_ids + int4_ids), torch.cat([k, k]), torch.cat([v, v]))
    k4k, v4k = arena.read_blocks(torch.tensor(int4k_ids), torch.float32)
    k4, v4 = arena.read_blocks(torch.tensor(int4_ids), torch.float32)
    assert torch.equal(v4k, v4)  # values: int4 per token in both
    assert rel_error(k4k, k) < 0.07 and rel_error(k4, k) > 2 * rel_error(k4k, k)
    packed, scales = arena.views["int4k"].k_data[1, 47], arena.views["int4k"].k_scales[1, 47]  # the 2nd block
    assert torch.equal(scales[:, 1].float(), k[1].amin(dim=0).to(torch.float16).float())  # [H, D] minimums
    assert packed.shape == (BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM // 2)


@pytest.mark.parametrize("native_dtype", NATIVE_DTYPES)
def test_write_blocks_into_int4k_stays_inside_the_block(native_dtype):
    arena = make_arena(native_dtype, chunk_formats=("bf16", "int4k"))
    g = torch.Generator().manual_seed(10)
    arena.bytes.copy_(torch.randint(0, 256, arena.bytes.shape, generator=g, dtype=torch.uint8))
    k, v = random_kv(1, seed=10)
    for index in (0, arena.views["int4k"].blocks_per_chunk - 1):
        before = arena.bytes.clone()
        arena.write_blocks(torch.tensor([block_id(arena, 1, index)]), k, v)
        start, end = block_byte_range(arena, 1, index)
        assert_only_chunk_changed(arena, before, 1)
        assert torch.equal(arena.bytes[1, :start], before[1, :start])
        assert torch.equal(arena.bytes[1, end:], before[1, end:])
        out_k, out_v = arena.read_blocks(torch.tensor([block_id(arena, 1, index)]), torch.float32)
        assert rel_error(out_k, k) < 0.07 and rel_error(out_v, v) < MAX_ERROR["int4"]


@pytest.mark.parametrize("native_dtype", NATIVE_DTYPES)
def test_migrate_full_blocks_into_int4k(native_dtype):
    arena = make_arena(native_dtype, chunk_formats=("bf16", "int8", "int4k"))
    k, v = random_kv(2, seed=11)
    src = [block_id(arena, 0, 2), block_id(arena, 1, 7)]  # a bf16 and an int8 block
    write_blocks(arena, src, k, v)
    dst = [block_id(arena, 2, 9), block_id(arena, 2, 0)]
    arena.migrate(torch.tensor(src), torch.tensor(dst))
    out_k, out_v = arena.read_blocks(torch.tensor(dst), torch.float32)
    for row in range(2):
        assert rel_error(out_k[row], k[row]) < 0.07 + MAX_ERROR["int8"]
        assert rel_error(out_v[row], v[row]) < MAX_ERROR["int4"] + MAX_ERROR["int8"]
