"""The Triton paged prefill attention kernel against a float64 reference, on CPU (Triton's interpreter)
and, marked `cuda`, at the engine's real shapes on a GPU.

Every batch is drawn fresh: random Q, random caches (slots no sequence owns hold random values too, so a
read past a context or through a wrong block id changes the answer), and block tables that are random
permutations of the cache's blocks. The output is poisoned with NaN first, so a row the kernel forgets
to write fails the comparison.

Error measure: ||out - ref|| / ||ref|| per sequence against a float64 reference. float32 inputs under the
interpreter compute in float32 (about 1e-6); bfloat16 inputs are exact in float64, and the kernel's own
roundings (bf16 probabilities into P @ V on the GPU, the bf16 output) stay under about 1e-2 (2.3e-3
measured on an H100 at the real shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from adaptserve.kernels.attention.metadata import AttentionMetadata, PrefillSequence
from adaptserve.kernels.attention.torch_ref import TorchReferenceAttention
from adaptserve.kernels.attention.triton_prefill import CONFIGS, KERNEL_VERSION, paged_prefill_attention

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2}


@dataclass
class Batch:
    q: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor  # [num_blocks, page_size, KVH, D]
    v_cache: torch.Tensor  # [num_blocks, page_size, KVH, D]
    block_table: torch.Tensor  # [S, max_blocks] int32
    query_start_loc: torch.Tensor  # [S + 1] int32
    context_lens: torch.Tensor  # [S] int32
    query_lens: list[int]
    scale: float

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)


def make_batch(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    device: str = "cpu",
    seed: int = 0,
) -> Batch:
    """seqs: (query_len, context_len) per sequence; each sequence gets its own shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-ctx // page_size) for _, ctx in seqs]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks nobody owns
    block_ids = torch.randperm(num_blocks, generator=g)  # [num_blocks]
    max_blocks = max(max(blocks_per_seq), 1)
    block_table = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)  # 0-padded, as the runner does
    used = 0
    for s, n in enumerate(blocks_per_seq):
        block_table[s, :n] = block_ids[used : used + n]
        used += n
    query_lens = [q_len for q_len, _ in seqs]
    starts = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)  # [S + 1]
    cache_shape = (num_blocks, page_size, num_kv_heads, head_dim)
    return Batch(
        q=torch.randn(sum(query_lens), num_heads, head_dim, generator=g).to(device, dtype),
        k_cache=torch.randn(cache_shape, generator=g).to(device, dtype),
        v_cache=torch.randn(cache_shape, generator=g).to(device, dtype),
        block_table=block_table.to(device),
        query_start_loc=starts.to(device),
        context_lens=torch.tensor([ctx for _, ctx in seqs], dtype=torch.int32, device=device),
        query_lens=query_lens,
        scale=head_dim**-0.5,
    )


def context_slots(batch: Batch, s: int) -> torch.Tensor:
    """[context_len] cache slots of positions 0..context_len-1 of sequence s."""
    page_size = batch.k_cache.shape[1]
    pos = torch.arange(int(batch.context_lens[s]), device=batch.q.device)  # [L]
    return batch.block_table[s, pos // page_size].long() * page_size + pos % page_size


def reference(batch: Batch, s: int) -> torch.Tensor:
    """float64 causal attention of sequence s's queries over its gathered context -> [Q, H, D]."""
    start, q_len, ctx = int(batch.query_start_loc[s]), batch.query_lens[s], int(batch.context_lens[s])
    num_heads, head_dim = batch.q.shape[1:]
    num_kv_heads = batch.k_cache.shape[2]
    slots = context_slots(batch, s)  # [L]
    k = batch.k_cache.reshape(-1, num_kv_heads, head_dim)[slots].double()  # [L, KVH, D]
    v = batch.v_cache.reshape(-1, num_kv_heads, head_dim)[slots].double()  # [L, KVH, D]
    k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [L, H, D]
    v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [L, H, D]
    q = batch.q[start : start + q_len].double()  # [Q, H, D]
    scores = torch.einsum("qhd,khd->hqk", q, k) * batch.scale  # [H, Q, L]
    rows = torch.arange(q_len, device=q.device)[:, None] + (ctx - q_len)  # [Q, 1] absolute positions
    visible = torch.arange(ctx, device=q.device)[None, :] <= rows  # [Q, L]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)  # [Q, H, D]


def run_kernel(batch: Batch, **launch) -> torch.Tensor:
    out = torch.full_like(batch.q, float("nan"))  # [T, H, D] poisoned: unwritten rows fail
    result = paged_prefill_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.query_start_loc,
        batch.context_lens, batch.scale, batch.max_query_len, out=out, **launch,
    )  # fmt: skip
    assert result.data_ptr() == out.data_ptr() and result.dtype == batch.q.dtype
    return result


def relative_errors(batch: Batch, out: torch.Tensor) -> list[float]:
    """||out - ref|| / ||ref|| for every sequence with queries."""
    errors = []
    for s, q_len in enumerate(batch.query_lens):
        if q_len == 0:
            continue
        start = int(batch.query_start_loc[s])
        got = out[start : start + q_len].double()  # [Q, H, D]
        ref = reference(batch, s)  # [Q, H, D]
        errors.append(((got - ref).norm() / ref.norm()).item() if got.isfinite().all() else float("inf"))
    return errors


def assert_matches(batch: Batch, **launch) -> None:
    errors = relative_errors(batch, run_kernel(batch, **launch))
    tolerance = TOLERANCE[batch.q.dtype]
    assert max(errors) < tolerance, f"relative errors per sequence {errors} (tolerance {tolerance})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(2, 2), (6, 2), (4, 1)])
def test_fresh_prompt(dtype, num_heads, num_kv_heads):
    # 75 tokens: not a multiple of block_m, block_n or the page size; GQA groups 1, 3 and 4
    batch = make_batch([(75, 75)], num_heads, num_kv_heads, 32, 16, dtype, seed=1)
    assert_matches(batch, block_m=32, block_n=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_after_cached_prefix(dtype):
    # the chunk's first row sits at position 90: most key tiles are the unmasked cached prefix
    batch = make_batch([(37, 127)], 6, 2, 32, 8, dtype, seed=2)
    assert_matches(batch, block_m=32, block_n=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch(dtype):
    # prompts, chunks, decodes (query_len 1) and a padded sequence (query_len 0, context 0) together
    seqs = [(1, 40), (0, 0), (53, 53), (1, 1), (20, 70), (33, 33), (1, 17)]
    batch = make_batch(seqs, 8, 2, 32, 16, dtype, seed=3)
    assert_matches(batch, block_m=32, block_n=32)


@pytest.mark.parametrize("page_size", [5, 64])
def test_page_size_independent_of_block_n(page_size):
    # pages smaller than block_n and not a power of two, or larger than block_n: rows are gathered one by one
    batch = make_batch([(45, 90), (30, 30)], 4, 4, 16, page_size, torch.float32, seed=4)
    assert_matches(batch, block_m=16, block_n=32)


# The interpreter ignores num_warps and num_stages, so the code paths of CONFIGS on the CPU are their
# tile shapes: every (block_m, block_n) that CONFIGS holds is run here.
TILE_SHAPES = sorted({(c["block_m"], c["block_n"]) for c in CONFIGS})


@pytest.mark.parametrize("block_m, block_n", TILE_SHAPES)
def test_config_tile_shapes(block_m, block_n):
    seqs = [(70, 200), (1, 50), (130, 130)]
    batch = make_batch(seqs, 4, 1, 16, 16, torch.bfloat16, seed=5)
    assert_matches(batch, block_m=block_m, block_n=block_n)


def test_agrees_with_torch_reference_backend():
    """The engine's oracle (TorchReferenceAttention) over the same batch, built as the runner would."""
    seqs = [(24, 24), (9, 50), (2, 19)]
    batch = make_batch(seqs, 4, 2, 32, 8, torch.float32, seed=6)
    all_slots = [context_slots(batch, s) for s in range(len(seqs))]
    prefills = [
        PrefillSequence(int(batch.query_start_loc[s]), q_len, ctx, all_slots[s])
        for s, (q_len, ctx) in enumerate(seqs)
    ]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long),
        num_decode_tokens=0,
        decode_block_table=None,
        decode_context_mask=None,
        prefills=prefills,
    )
    # this step's K/V rows: the last query_len positions of every context (already in the cache)
    step_slots = torch.cat(
        [slots[ctx - q_len :] for (q_len, ctx), slots in zip(seqs, all_slots, strict=True)]
    )
    step_k = batch.k_cache.view(-1, 2, 32)[step_slots]  # [T, KVH, D]
    step_v = batch.v_cache.view(-1, 2, 32)[step_slots]  # [T, KVH, D]
    expected = TorchReferenceAttention().attend(
        batch.q, step_k, step_v, batch.k_cache, batch.v_cache, meta, batch.scale
    )  # [T, H, D]
    assert ((run_kernel(batch) - expected).norm() / expected.norm()).item() < 1e-5


def test_detects_wrong_answers():
    """The comparison can fail: a cache slot of the context changed after the kernel ran shows up."""
    batch = make_batch([(20, 60)], 2, 2, 16, 8, torch.float32, seed=7)
    out = run_kernel(batch, block_m=16, block_n=16)
    assert max(relative_errors(batch, out)) < TOLERANCE[torch.float32]
    batch.v_cache.view(-1, 2, 16)[context_slots(batch, 0)[5]] += 10.0  # position 5, seen by every row
    assert max(relative_errors(batch, out)) > 1e-2


def test_empty_batch_and_shape_errors():
    batch = make_batch([(0, 0), (0, 0)], 2, 2, 16, 8, torch.float32)
    out = paged_prefill_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.query_start_loc,
        batch.context_lens, batch.scale, 0,
    )  # fmt: skip
    assert out.shape == (0, 2, 16)
    batch = make_batch([(4, 4)], 3, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        run_kernel(batch)
    batch = make_batch([(4, 4)], 2, 2, 24, 8, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        run_kernel(batch)


def test_module_metadata():
    assert KERNEL_VERSION == 2
    assert 8 <= len(CONFIGS) <= 12
    assert all(set(c) == {"block_m", "block_n", "num_warps", "num_stages"} for c in CONFIGS)
    assert any(c["block_m"] >= 128 for c in CONFIGS)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: "m{block_m}n{block_n}w{num_warps}s{num_stages}".format(**c)
)
def test_real_shapes_on_gpu(config):
    """32 heads, 8 KV heads, D 128, page 16, bf16: a 4096-token prompt, a 512-token chunk after a 3k
    cached prefix, and a mixed batch."""
    batches = [
        [(4096, 4096)],
        [(512, 3584)],
        [(1, 900), (0, 0), (777, 777), (1, 1), (300, 2345), (1, 4000), (1000, 1500)],
    ]
    for seed, seqs in enumerate(batches):
        batch = make_batch(seqs, 32, 8, 128, 16, torch.bfloat16, device="cuda", seed=seed)
        resources: dict = {}
        assert_matches(batch, resources=resources, **config)
        assert resources["num_warps"] == config["num_warps"] and resources["regs"] > 0


@pytest.mark.cuda
def test_float32_on_gpu_is_full_precision():
    """float32 inputs take IEEE dots: tl.dot's default there is TF32 (10-bit mantissas, ~1e-3 relative
    error), which made a float32 prefill disagree with the decode kernels' rows by up to 1.3e-3 in a
    logprob on the H100. SmolLM2's head shapes: 9 heads, 3 KV heads, D 64, page 16."""
    batch = make_batch([(200, 700), (64, 64), (1, 300)], 9, 3, 64, 16, torch.float32, device="cuda", seed=11)
    out = run_kernel(batch)
    assert max(relative_errors(batch, out)) < 1e-5
