"""Compressed-KV Triton kernels (write and paged decode) against the torch reference, KVArena.

The write kernel must produce KVArena.write's bytes exactly, in every format, fp8 included: the kernel
builds e4m3 codes from the float32 bits rather than trusting a cast, so ties and subnormals round to
even as torch does, in the interpreter and on the GPU alike. The reference arena is always written on
the CPU: CUDA's torch turns `amax / 127.0` into a multiplication by the reciprocal, which can land one
float32 ulp away from the division (the CPU's and the kernel's) and so round a scale the other way.

int4k blocks (keys per channel) are only ever written whole (KVArena.write_blocks, the runner's
requantization moves): the write kernel must leave them untouched, and decode reads them like the rest.

Decode is compared with torch_ref's decode over KVArena.read_blocks within 1e-3 (float32) / 2e-2
(bfloat16). Every byte of the arena that no sequence may read starts as 0xFF, which dequantizes to NaN
in every format (the fp16 scales are NaN), and the output starts as NaN: reading past a context or
leaving a row unwritten fails. Without CUDA the kernels run under Triton's interpreter
(tests/conftest.py); with CUDA the same tests run on the GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from adaptserve.engine.kv_cache.formats import FORMAT_CODES, KV_FORMATS, KVLayout
from adaptserve.kernels.attention.torch_ref import TorchReferenceAttention
from adaptserve.kernels.attention.triton_kv_compressed import (
    decode_attention_compressed,
    supports,
    write_kv_compressed,
)
from adaptserve.runner.kv_arena import KVArena

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_ABS_ERROR = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
BLOCK_SIZE = 16


def _arena(layout: KVLayout, chunk_formats: list[str], device=DEVICE, fill: int = 0xFF) -> KVArena:
    """Chunks of two native blocks each, in the given formats; every byte starts as `fill`."""
    chunk_bytes = 2 * layout.format("bf16").block_bytes
    max_blocks_per_chunk = max(chunk_bytes // f.block_bytes for f in layout.formats())
    codes = torch.tensor([FORMAT_CODES[name] for name in chunk_formats], dtype=torch.int8, device=device)
    arena = KVArena(
        layout, len(chunk_formats), chunk_bytes, max_blocks_per_chunk, codes, torch.device(device)
    )
    arena.bytes.fill_(fill)
    return arena


def _block_ids(arena: KVArena) -> list[int]:
    """Every real block id of the arena, chunk by chunk."""
    ids = []
    for chunk, code in enumerate(arena.chunk_formats.tolist()):
        count = arena.views[KV_FORMATS[code]].blocks_per_chunk
        ids += [chunk * arena.max_blocks_per_chunk + index for index in range(count)]
    return ids


def _slots(arena: KVArena) -> torch.Tensor:
    """Every slot of every real block of the arena."""
    offsets = torch.arange(BLOCK_SIZE)
    return (torch.tensor(_block_ids(arena))[:, None] * BLOCK_SIZE + offsets).flatten()


def _head_vectors(num_tokens, num_kv_heads, head_dim, generator, spread: float = 2.0) -> torch.Tensor:
    """[T, KVH, D] with magnitudes from 10**-spread to 10**spread per token and head, one all-zero head
    vector (the scale floor) and a few tiny channels (fp8 subnormals)."""
    x = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator)
    x *= 10.0 ** torch.empty(num_tokens, num_kv_heads, 1).uniform_(-spread, spread, generator=generator)
    x[torch.rand(x.shape, generator=generator) < 0.1] *= 2.0**-12
    x[0, 0] = 0.0
    return x


def _compare_writes(layout, chunk_formats, slots, k, v) -> None:
    """The kernel's bytes equal KVArena.write's (on the CPU) everywhere; negative slots, and slots in
    int4k blocks (whole blocks only), write nothing."""
    expected = _arena(layout, chunk_formats, device="cpu")
    codes = expected.chunk_formats[(slots // BLOCK_SIZE // expected.max_blocks_per_chunk).clamp(min=0)]
    keep = (slots >= 0) & (codes != FORMAT_CODES["int4k"])
    expected.write(slots[keep], k[keep].cpu(), v[keep].cpu())
    arena = _arena(layout, chunk_formats)
    write_kv_compressed(arena, slots.to(DEVICE), k.to(DEVICE), v.to(DEVICE))
    for chunk, name in enumerate(chunk_formats):
        differ = (arena.bytes[chunk].cpu() != expected.bytes[chunk]).sum().item()
        assert differ == 0, f"chunk {chunk} ({name}): {differ} bytes differ from KVArena.write"


@pytest.mark.parametrize(
    "native_dtype, input_dtype, num_kv_heads, head_dim, int4_group",
    [
        (torch.float32, torch.float32, 3, 64, 32),
        (torch.bfloat16, torch.bfloat16, 2, 32, 16),
        (torch.bfloat16, torch.float32, 2, 64, 64),  # float32 K/V rounded to the bf16 cache (ties to even)
    ],
    ids=["fp32-H3-D64", "bf16-H2-D32", "fp32-into-bf16"],
)
def test_write_matches_arena_bytes(native_dtype, input_dtype, num_kv_heads, head_dim, int4_group):
    g = torch.Generator().manual_seed(head_dim + num_kv_heads)
    layout = KVLayout(BLOCK_SIZE, num_kv_heads, head_dim, native_dtype, int4_group_size=int4_group)
    chunk_formats = ["int4", "bf16", "fp8", "int8", "int4"]
    all_slots = _slots(_arena(layout, chunk_formats, "cpu"))
    slots = all_slots[torch.randperm(all_slots.shape[0], generator=g)[:24]]  # [T] scattered over the chunks
    slots[[3, 11]] = -1  # padded rows
    k = _head_vectors(24, num_kv_heads, head_dim, g).to(input_dtype)  # [T, KVH, D]
    v = _head_vectors(24, num_kv_heads, head_dim, g).to(input_dtype)  # [T, KVH, D]
    _compare_writes(layout, chunk_formats, slots, k, v)


def test_write_strided_inputs():
    """k and v as views of a fused qkv output (token stride > KVH * D)."""
    g = torch.Generator().manual_seed(7)
    layout = KVLayout(BLOCK_SIZE, 2, 32, torch.float32, int4_group_size=32)
    qkv = _head_vectors(7, 8, 32, g)  # [T, (H + 2 * KVH), D] with H = 4
    slots = torch.tensor(
        [0, 5, 12 * 16 + 3, 13 * 16, 24 * 16 + 7, 25 * 16 + 15, 36 * 16 + 1]
    )  # 12 blocks a chunk
    _compare_writes(layout, ["fp8", "int4", "bf16", "int8"], slots, qkv[:, 4:6], qkv[:, 6:8])


def _tie_vectors(name: str, num_vectors: int, head_dim: int, group: int) -> torch.Tensor:
    """[num_vectors, D] head vectors whose scale is exactly 1 (and int4 minimum 0), so that the stored
    codes are the rounding of the values themselves: every value sits on a rounding tie or on a grid
    point (fp8: each finite e4m3 value, the midpoints between neighbours, subnormals included)."""
    if name == "fp8":
        grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
        values = torch.cat([grid, (grid[1:] + grid[:-1]) / 2])
        values = torch.cat([values, -values])
        anchors = [448.0]  # amax / 448 = 1
    elif name == "int8":
        values = torch.arange(-127, 127) + 0.5
        anchors = [127.0]
    else:
        values = torch.arange(0, 15) + 0.5
        anchors = [0.0, 15.0]  # every int4 group: minimum 0, (max - min) / 15 = 1
    vectors = values.repeat(-(-num_vectors * head_dim // values.numel()))[: num_vectors * head_dim]
    vectors = vectors.view(num_vectors, head_dim // group, group).clone()
    for i, anchor in enumerate(anchors):
        vectors[:, :, i] = anchor
    return vectors.view(num_vectors, head_dim)


def test_write_skips_int4k_blocks():
    """A token in an int4k block (which the block pool never hands to a write) leaves every byte of
    that chunk as it was; the tokens around it are written as usual."""
    g = torch.Generator().manual_seed(8)
    layout = KVLayout(BLOCK_SIZE, 2, 32, torch.float32, int4_group_size=16)
    chunk_formats = ["int8", "int4k", "int4"]
    all_slots = _slots(_arena(layout, chunk_formats, "cpu"))
    slots = all_slots[torch.randperm(all_slots.shape[0], generator=g)[:24]]  # [T] over the three chunks
    int4k_chunk = slots // BLOCK_SIZE // _arena(layout, chunk_formats, "cpu").max_blocks_per_chunk == 1
    assert 0 < int4k_chunk.sum() < 24
    _compare_writes(layout, chunk_formats, slots, _head_vectors(24, 2, 32, g), _head_vectors(24, 2, 32, g))
    arena = _arena(layout, chunk_formats)
    write_kv_compressed(arena, slots.to(DEVICE), *[_head_vectors(24, 2, 32, g).to(DEVICE)] * 2)
    assert (arena.bytes[1] == 0xFF).all()


@pytest.mark.parametrize("name", ["fp8", "int8", "int4"])
def test_write_rounds_ties_to_even(name):
    layout = KVLayout(BLOCK_SIZE, 2, 64, torch.float32, int4_group_size=16)
    group = layout.int4_group_size if name == "int4" else layout.head_dim
    ties = _tie_vectors(name, 16, layout.head_dim, group).view(8, 2, 64)  # [T, KVH, D]
    _compare_writes(layout, [name], torch.arange(8), ties, ties.flip(0))


# ---- decode -----------------------------------------------------------------------------------------


def _decode_inputs(layout, chunk_formats, lens, group, seed):
    """An arena whose sequences' context slots hold random K/V (written by KVArena.write; an int4k
    block whole, by KVArena.write_blocks, its rows past the context too) and whose every other byte
    is 0xFF; a block table of shuffled blocks from chunks of every format; q."""
    g = torch.Generator().manual_seed(seed)
    arena = _arena(layout, chunk_formats)
    block_ids = torch.tensor(_block_ids(arena))
    block_ids = block_ids[torch.randperm(block_ids.shape[0], generator=g)]
    max_blocks = max(1, -(-max(lens) // BLOCK_SIZE))
    block_table = torch.zeros(len(lens), max_blocks, dtype=torch.int32)  # [N, MB]; 0-padded
    used = 0
    for n, length in enumerate(lens):
        num_blocks = -(-length // BLOCK_SIZE)
        block_table[n, :num_blocks] = block_ids[used : used + num_blocks]
        used += num_blocks
        positions = torch.arange(num_blocks * BLOCK_SIZE)  # [L rounded up to whole blocks]
        slots = block_table[n, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
        shape = (positions.shape[0], layout.num_kv_heads, layout.head_dim)
        k = _head_vectors(max(shape[0], 1), *shape[1:], g, spread=0.5)[: shape[0]]  # softmax not one-hot
        v = torch.randn(shape, generator=g)
        codes = arena.chunk_formats.cpu()[slots // BLOCK_SIZE // arena.max_blocks_per_chunk]  # [L]
        whole = codes == FORMAT_CODES["int4k"]
        tokens = ~whole & (positions < length)
        arena.write(slots[tokens].to(DEVICE), k[tokens].to(DEVICE), v[tokens].to(DEVICE))
        blocks = whole.view(-1, BLOCK_SIZE)[:, 0]  # [num_blocks] the int4k blocks
        if blocks.any():
            k_blocks, v_blocks = (x.view(num_blocks, BLOCK_SIZE, *shape[1:])[blocks] for x in (k, v))
            ids = block_table[n, :num_blocks][blocks]
            arena.write_blocks(ids.to(DEVICE), k_blocks.to(DEVICE), v_blocks.to(DEVICE))
    assert used < block_ids.shape[0], "the arena is too small for these contexts"
    q = torch.randn(len(lens), layout.num_kv_heads * group, layout.head_dim, generator=g)  # [N, H, D]
    context_lens = torch.tensor(lens, dtype=torch.int32)
    return arena, q.to(DEVICE, layout.native_dtype), block_table.to(DEVICE), context_lens.to(DEVICE)


def _reference(q, arena, block_table, context_lens, scale) -> torch.Tensor:
    """torch_ref's decode over the arena's dequantized blocks (read_blocks in q's dtype), computed in
    float32 so that only the kernel's roundings count; unreadable rows (NaN) are zeroed first, as the
    mask alone leaves 0 * NaN in the weighted sum."""
    num_ids = arena.bytes.shape[0] * arena.max_blocks_per_chunk
    k, v = arena.read_blocks(torch.arange(num_ids, device=q.device), q.dtype)  # [B, bs, KVH, D] each
    positions = torch.arange(block_table.shape[1] * BLOCK_SIZE, device=q.device)
    meta = SimpleNamespace(
        decode_block_table=block_table, decode_context_mask=positions[None, :] < context_lens[:, None]
    )
    k, v = k.float().nan_to_num(0.0), v.float().nan_to_num(0.0)
    out = TorchReferenceAttention()._decode(q.float(), k, v, meta, scale)  # [N, H, D]
    return torch.where(context_lens[:, None, None] > 0, out, 0.0)  # an all-masked row: zeros, not NaN


@pytest.mark.parametrize(
    "native_dtype, num_kv_heads, head_dim, int4_group, num_splits, lens",
    [
        (torch.float32, 2, 64, 32, 1, [37, 16, 1, 0, 70]),
        (torch.bfloat16, 3, 32, 16, 1, [50, 9, 33]),
        (torch.float32, 3, 32, 32, 3, [81, 5, 0]),  # splits, some of them empty
        (torch.bfloat16, 2, 64, 64, 2, [47, 64, 17]),
    ],
    ids=["fp32-H2-D64", "bf16-H3-D32", "fp32-split3", "bf16-split2"],
)
def test_decode_matches_reference(native_dtype, num_kv_heads, head_dim, int4_group, num_splits, lens):
    layout = KVLayout(BLOCK_SIZE, num_kv_heads, head_dim, native_dtype, int4_group_size=int4_group)
    chunk_formats = ["bf16", "int4", "int4k", "fp8", "int8", "int4", "fp8", "int4k", "int8", "bf16"]
    arena, q, block_table, context_lens = _decode_inputs(layout, chunk_formats, lens, 3, seed=head_dim)
    assert (arena.chunk_formats[block_table.long() // arena.max_blocks_per_chunk] == 3).any()
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))  # [N, H, D]
    result = decode_attention_compressed(
        q, arena, block_table, context_lens, scale, out, num_splits=num_splits
    )
    assert result is out and not out.isnan().any(), "NaN: a row left unwritten or a read past a context"
    expected = _reference(q, arena, block_table, context_lens, scale)
    error = (out.float() - expected).abs().max().item()
    assert error <= MAX_ABS_ERROR[native_dtype], f"max abs error {error:.3g}"
    assert (out[context_lens == 0] == 0).all(), "a padded row must be zeros"


def test_unsupported_shapes_raise():
    odd_head = _arena(KVLayout(BLOCK_SIZE, 2, 48, torch.float32, int4_group_size=16), ["bf16"])
    small_block = _arena(KVLayout(8, 2, 32, torch.float32, int4_group_size=16), ["bf16"])
    assert not supports(odd_head) and not supports(small_block)
    empty = torch.zeros(1, 2, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim=48 must be a power of two"):
        write_kv_compressed(odd_head, torch.zeros(1, dtype=torch.long, device=DEVICE), empty, empty)
    table = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)  # [N, MB]
    lens = torch.ones(1, dtype=torch.int32, device=DEVICE)  # [N]
    with pytest.raises(ValueError, match="block_size=8"):
        decode_attention_compressed(torch.zeros(1, 2, 32, device=DEVICE), small_block, table, lens, 1.0)
    good = _arena(KVLayout(BLOCK_SIZE, 2, 32, torch.float32, int4_group_size=16), ["bf16"])
    assert supports(good)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        decode_attention_compressed(torch.zeros(1, 3, 32, device=DEVICE), good, table, lens, 1.0)


# ---- real shapes on the GPU ------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_real_shapes_and_graph_replay():
    """Llama-8B-like layer (32 heads over 8 KV heads, D 128, bf16; chunks of every format, int4k
    included): the write is byte-exact, and decode
    captured once in a CUDA graph follows new block tables and context lengths on replay."""
    layout = KVLayout(BLOCK_SIZE, 8, 128, torch.bfloat16, int4_group_size=64)
    chunk_formats = ["bf16", "fp8", "int8", "int4", "int4k"] * 13
    g = torch.Generator().manual_seed(5)
    all_slots = _slots(_arena(layout, chunk_formats, "cpu"))
    slots = all_slots[torch.randperm(all_slots.shape[0], generator=g)[:512]]  # [T]
    k = _head_vectors(512, 8, 128, g).bfloat16()
    _compare_writes(layout, chunk_formats, slots, k, torch.randn(512, 8, 128, generator=g).bfloat16())

    lens = [300, 17, 0, 700]
    arena, q, block_table, context_lens = _decode_inputs(layout, chunk_formats, lens, 4, seed=6)
    out = torch.empty_like(q)
    decode_attention_compressed(q, arena, block_table, context_lens, 0.1, out, num_splits=4)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention_compressed(q, arena, block_table, context_lens, 0.1, out, num_splits=4)
    context_lens.copy_(torch.tensor([700, 0, 5, 64], dtype=torch.int32))
    block_table.copy_(block_table[torch.tensor([3, 2, 1, 0])])  # row 0 gets the 700-token blocks
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    expected = _reference(q, arena, block_table, context_lens, 0.1)
    assert (out.float() - expected).abs().max().item() <= MAX_ABS_ERROR[torch.bfloat16]


@pytest.mark.parametrize("num_decodes", [0, 2], ids=["prompts", "with-decodes"])
@pytest.mark.parametrize("native_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefills_in_one_launch_match_the_reference_loop(native_dtype, num_decodes):
    """CompressedKVAttention with the Triton path runs a step's prompt chunks in one paged-prefill
    launch (fresh prompts on their exact K/V, a chunk after cached tokens on its dequantized
    context); the torch reference loops over them. Same outputs, in every format of the arena, also
    behind a mixed step's decode rows (which come first and shift the prompts' table rows)."""
    from adaptserve.kernels.attention.compressed import CompressedKVAttention
    from adaptserve.kernels.attention.metadata import AttentionMetadata, PrefillSequence

    layout = KVLayout(BLOCK_SIZE, 2, 32, native_dtype, int4_group_size=16)
    chunk_formats = ["bf16", "int4", "int4k", "fp8", "int8", "int4", "fp8", "int4k", "int8", "bf16"]
    # decodes, then: fresh, chunk after 27, fresh, 1 after 49
    lens = [33, 12][:num_decodes] + [20, 37, 5, 50]
    query_lens = [1] * num_decodes + [20, 10, 5, 1]
    arena, _, block_table, context_lens = _decode_inputs(layout, chunk_formats, lens, 2, seed=7)
    g = torch.Generator().manual_seed(8)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, 4, 32, generator=g).to(DEVICE, native_dtype)  # [T, H, D]
    k, v = (torch.randn(num_tokens, 2, 32, generator=g).to(DEVICE, native_dtype) for _ in range(2))
    starts = [sum(query_lens[:i]) for i in range(len(lens))]
    prompts = zip(starts[num_decodes:], query_lens[num_decodes:], lens[num_decodes:], strict=True)
    meta = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, device=DEVICE),
        num_decode_tokens=num_decodes,
        prefills=[PrefillSequence(s, n, c) for s, n, c in prompts],
        block_table=block_table,
        context_lens=context_lens,
        query_start_loc=torch.tensor([*starts, num_tokens], dtype=torch.int32, device=DEVICE),
        max_query_len=max(query_lens),
        max_context_len=max(lens),
    )
    scale = 32**-0.5
    outputs = []
    for use_triton in (False, True):
        attention = CompressedKVAttention(2, (4, 2, 32), use_triton=use_triton)
        outputs.append(attention.attend(q, k, v, arena, None, meta, scale).float())
    reference, launched = outputs
    assert not launched.isnan().any(), "NaN: a read past a context"
    # the prompt rows; the reference's decode rows read the 0xFF (NaN) bytes past their contexts
    # under the mask (test_decode_matches_reference covers the decode kernel)
    error = (launched[num_decodes:] - reference[num_decodes:]).abs().max().item()
    assert error <= MAX_ABS_ERROR[native_dtype], f"max abs error {error:.3g}"
