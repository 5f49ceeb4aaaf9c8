"""Size the paged KV cache from a memory budget, after measuring what a forward pass needs."""

from __future__ import annotations

import torch

from adaptserve.config import CacheConfig, EngineConfig
from adaptserve.model.config import ModelArchConfig

CPU_DEFAULT_KV_GIB = 2.0  # default KV budget on CPU, where memory is shared with everything else
CUDA_SLACK_GIB = 0.5  # beyond the profiled peak: CUDA graphs' pool, allocator fragmentation, NCCL


def num_kv_blocks(
    cache: CacheConfig,
    arch: ModelArchConfig,
    dtype: torch.dtype,
    device: torch.device,
    activation_bytes: int = 0,
    draft_kv_bytes_per_token: int = 0,
) -> int:
    """Blocks that fit the budget: the explicit one, or on CUDA gpu_memory_utilization of the device
    minus other processes, the weights already allocated (a draft model's too) and the profiled
    activation peak. A draft model's KV cache holds a block for each of the target's: its bytes per
    token count in every block."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    bytes_per_token = arch.kv_bytes_per_token(dtype.itemsize) + draft_kv_bytes_per_token
    bytes_per_block = bytes_per_token * cache.block_size
    budget = _budget_bytes(cache, device, activation_bytes)
    num_blocks = int(budget // bytes_per_block)
    if num_blocks < 1:
        raise ValueError(
            f"the KV-cache budget ({budget / 2**30:.2f} GiB) holds no block of "
            f"{bytes_per_block} bytes; raise cache.kv_cache_memory_gib or cache.gpu_memory_utilization"
        )
    return num_blocks


def _budget_bytes(cache: CacheConfig, device: torch.device, activation_bytes: int) -> float:
    if cache.kv_cache_memory_gib is not None:
        return cache.kv_cache_memory_gib * 2**30
    if device.type != "cuda":
        return CPU_DEFAULT_KV_GIB * 2**30
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    allowed = cache.gpu_memory_utilization * total - used_by_others - torch.cuda.memory_allocated(device)
    return allowed - activation_bytes - CUDA_SLACK_GIB * 2**30


@torch.inference_mode()
def profile_activation_bytes(runner) -> int:
    """Peak memory of the largest step the scheduler may send (a full token budget of prompt, then
    logits for every row a step may sample), measured by running it on throw-away KV caches."""
    from adaptserve.engine.outputs import ScheduledSequence
    from adaptserve.engine.request import SamplingParams
    from adaptserve.runner.inputs import prepare_inputs

    config = runner.config
    num_tokens = min(config.scheduler.max_num_batched_tokens, runner.max_model_len)
    num_blocks = -(-num_tokens // runner.block_size)
    device = runner.device
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    kv_caches = runner._allocate_kv_caches(num_blocks)
    kv_bytes = torch.cuda.memory_allocated(device) - base
    seq = ScheduledSequence(
        "profile", [0] * num_tokens, 0, list(range(num_blocks)), True, SamplingParams(), [], []
    )
    inputs = prepare_inputs([seq], runner.block_size, device)
    runner.attention.begin_step(inputs.attn)
    hidden = runner.model(inputs.input_ids, inputs.positions, kv_caches, inputs.attn, runner.attention)
    rows = hidden[-1:].expand(max_sampled_rows(config), -1)  # [N, hidden]
    logits = runner.model.compute_logits(rows)  # [N, V] float32
    torch.softmax(logits, dim=-1)  # the sampler's largest temporary
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base - kv_bytes
    del kv_caches, hidden, logits, inputs
    torch.cuda.empty_cache()
    return int(peak)


def max_sampled_rows(config: EngineConfig) -> int:
    """Rows of logits one step may sample: one per sequence, or with speculation the k + 1 rows of
    each verifying sequence, within the step's token budget."""
    max_num_seqs = config.scheduler.max_num_seqs
    if config.speculative.spec_method == "off":
        return max_num_seqs
    rows = max_num_seqs * (1 + config.speculative.num_speculative_tokens)
    return max(max_num_seqs, min(rows, config.scheduler.max_num_batched_tokens))


def allocate_paged_kv(
    arch: ModelArchConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, zeroed (K, V) caches [num_blocks, block_size, kv_heads, head_dim] (the target's,
    and a draft model's that mirrors its block ids)."""
    shape = (num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(arch.num_layers)
    ]
