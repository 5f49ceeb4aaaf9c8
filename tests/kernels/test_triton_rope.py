"""Triton rotary embedding + paged KV write against the model's apply_rope and the reference write.

Tolerances: the kernel rounds cos/sin, each product and the sum to the model dtype exactly where the
model does, and a product of two bfloat16 or float16 values is exact in float32, so q, k and the cache
must be bit-identical to the reference in those dtypes (the kernel is compiled without fused
multiply-adds, which would skip those roundings). float32 does the same operations and is compared with
rtol/atol 1e-6. v is a copy: always bit-exact.
"""

from __future__ import annotations

import pytest
import torch

from adaptserve.kernels.triton_rope import CONFIGS, KERNEL_VERSION, rope_and_write_kv
from adaptserve.model.rope import RotaryEmbedding, apply_rope

BLOCK_SIZE = 16


def _fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, generator, device):
    """q, k, v as the model gets them: strided views of one fused projection output."""
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = torch.randn(num_tokens, sum(sizes), generator=generator)  # [T, (H + 2 * KVH) * D]
    q, k, v = qkv.to(device=device, dtype=dtype).split(sizes, dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)  # [T, H, D]
    k = k.view(num_tokens, num_kv_heads, head_dim)  # [T, KVH, D]
    v = v.view(num_tokens, num_kv_heads, head_dim)  # [T, KVH, D]
    return q, k, v


def _cache_buffers(num_blocks, num_kv_heads, head_dim, dtype, generator, device):
    """Random K and V buffers with a guard block on either side of the caches, so that a write for a
    padded row (slot -1, just before the cache) or past the end shows up."""
    shape = (num_blocks + 2, BLOCK_SIZE, num_kv_heads, head_dim)
    k_buffer = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    v_buffer = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return k_buffer, v_buffer


def _slot_mapping(num_tokens, num_slots, num_padded, generator, device):
    """Distinct slots in shuffled order; the last `num_padded` rows are padding (-1)."""
    slots = torch.randperm(num_slots, generator=generator)[:num_tokens]  # [T]
    slots[num_tokens - num_padded :] = -1
    return slots.to(device)


def _reference(q, k, v, rotary, positions, k_buffer, v_buffer, slots):
    """The model's rotation and the reference cache write: (q, k, k_buffer, v_buffer) expected."""
    cos, sin = rotary.lookup(positions, q.dtype)  # [T, 1, D] each, in the model dtype
    q_ref, k_ref = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [T, H, D], [T, KVH, D]
    k_buffer_ref, v_buffer_ref = k_buffer.clone(), v_buffer.clone()
    written = slots >= 0
    k_buffer_ref[1:-1].view(-1, *k.shape[1:])[slots[written]] = k_ref[written]
    v_buffer_ref[1:-1].view(-1, *v.shape[1:])[slots[written]] = v[written]
    return q_ref, k_ref, k_buffer_ref, v_buffer_ref


def _check(num_tokens, num_heads, num_kv_heads, head_dim, dtype, num_padded=0, seed=0, device="cpu", **kw):
    """Run the kernel on fresh random inputs and compare everything it writes with the reference."""
    g = torch.Generator().manual_seed(seed)
    rotary = RotaryEmbedding(head_dim, max_positions=4096, theta=10000.0, scaling=None, device=device)
    positions = torch.randint(0, 4096, (num_tokens,), generator=g).to(device)  # [T]
    q, k, v = _fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, g, device)
    num_blocks = num_tokens // BLOCK_SIZE + 3
    k_buffer, v_buffer = _cache_buffers(num_blocks, num_kv_heads, head_dim, dtype, g, device)
    slots = _slot_mapping(num_tokens, num_blocks * BLOCK_SIZE, num_padded, g, device)
    v_before = v.clone()
    expected = _reference(q, k, v, rotary, positions, k_buffer, v_buffer, slots)

    k_cache, v_cache = k_buffer[1:-1], v_buffer[1:-1]  # [blocks, block_size, KVH, D]
    rope_and_write_kv(q, k, v, rotary.cos_table, rotary.sin_table, positions, k_cache, v_cache, slots, **kw)

    assert torch.equal(v, v_before)
    for actual, wanted in zip((q, k, k_buffer, v_buffer), expected, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(actual, wanted, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(actual, wanted), (actual.float() - wanted.float()).abs().max()
    assert torch.equal(v_buffer, expected[3])  # a copy: exact in every dtype
    # the rows the model reads back from the cache are this step's rotated keys
    written = slots >= 0
    assert torch.equal(k_cache.view(-1, num_kv_heads, head_dim)[slots[written]], k[written])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    [(9, 3, 64), (32, 8, 128), (4, 2, 80)],  # SmolLM2, Llama-3-8B, a head dim that is no power of 2
)
def test_matches_model_rope_and_cache_write(dtype, num_heads, num_kv_heads, head_dim):
    _check(13, num_heads, num_kv_heads, head_dim, dtype, num_padded=0, seed=head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_rows_leave_the_cache_untouched(dtype):
    # _check compares the whole cache and its guard blocks: slots not written keep their old contents,
    # and nothing lands at slot -1 (just before the cache)
    _check(11, 9, 3, 64, dtype, num_padded=4, seed=1)


def test_no_tokens_and_bad_shapes():
    empty = torch.empty(0, 2, 8)
    table = torch.zeros(4, 8)
    cache = torch.zeros(1, BLOCK_SIZE, 2, 8)
    no_rows = torch.empty(0, dtype=torch.int64)
    rope_and_write_kv(empty, empty, empty, table, table, no_rows, cache, cache, no_rows)
    with pytest.raises(ValueError, match="KV caches"):
        rope_and_write_kv(empty, empty, empty, table, table, no_rows, cache[..., :4], cache, no_rows)


def test_configs_are_keyword_arguments():
    assert KERNEL_VERSION == 1 and CONFIGS
    for config in CONFIGS[:2]:
        _check(3, 9, 3, 64, torch.bfloat16, seed=3, **config)


# ---- real shapes on the GPU ------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("num_tokens", [1, 64, 4096])
def test_cuda_real_shapes(num_tokens):
    _check(num_tokens, 32, 8, 128, torch.bfloat16, num_padded=min(3, num_tokens - 1), device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_cuda_every_config_reports_resources(config):
    resources: dict = {}
    _check(64, 32, 8, 128, torch.bfloat16, num_padded=2, device="cuda", resources=resources, **config)
    assert resources["num_warps"] == config["num_warps"] and resources["regs"] > 0
    assert {"spills", "shared"} <= resources.keys()


@pytest.mark.cuda
def test_cuda_graph_capture():
    g = torch.Generator().manual_seed(4)
    rotary = RotaryEmbedding(128, max_positions=256, theta=500000.0, scaling=None, device="cuda")
    positions = torch.arange(64, device="cuda")  # [T]
    q, k, v = _fused_qkv(64, 32, 8, 128, torch.bfloat16, g, "cuda")
    k_cache = torch.zeros(8, BLOCK_SIZE, 8, 128, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    slots = torch.arange(64, device="cuda")  # [T]
    args = (q, k, v, rotary.cos_table, rotary.sin_table, positions, k_cache, v_cache, slots)
    cos, sin = rotary.lookup(positions, torch.bfloat16)
    q_ref = apply_rope(apply_rope(q, cos, sin), cos, sin)  # captured once, replayed once: two rotations
    rope_and_write_kv(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rope_and_write_kv(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(q, q_ref)
    assert torch.equal(v_cache.view(-1, 8, 128)[:64], v)
