"""Size the paged KV cache from a memory budget."""

from __future__ import annotations

import torch

from adaptserve.config import CacheConfig
from adaptserve.model.config import ModelArchConfig

CPU_DEFAULT_KV_GIB = 2.0  # default KV budget on CPU, where memory is shared with everything else
CUDA_ACTIVATION_RESERVE_GIB = 2.0  # kept free for activations, logits and allocator slack


def num_kv_blocks(cache: CacheConfig, arch: ModelArchConfig, dtype: torch.dtype, device: torch.device) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    bytes_per_block = arch.kv_bytes_per_token(dtype.itemsize) * cache.block_size
    budget = _budget_bytes(cache, device)
    num_blocks = int(budget // bytes_per_block)
    if num_blocks < 1:
        raise ValueError(
            f"the KV-cache budget ({budget / 2**30:.2f} GiB) holds no block of "
            f"{bytes_per_block} bytes; raise cache.kv_cache_memory_gib"
        )
    return num_blocks


def _budget_bytes(cache: CacheConfig, device: torch.device) -> float:
    if cache.kv_cache_memory_gib is not None:
        return cache.kv_cache_memory_gib * 2**30
    if device.type != "cuda":
        return CPU_DEFAULT_KV_GIB * 2**30
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    allowed = cache.gpu_memory_utilization * total - used_by_others - torch.cuda.memory_allocated(device)
    return allowed - CUDA_ACTIVATION_RESERVE_GIB * 2**30
