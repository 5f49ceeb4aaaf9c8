"""Memory bandwidth a device reaches in practice: the speed of a large device-to-device copy. Decode
reads every weight and the whole KV cache once per step, so bytes / this bandwidth is its floor."""

from __future__ import annotations

import statistics
import time

import torch

CUDA_COPY_BYTES = 1 << 30  # 1 GiB per buffer: far past every cache, long enough to time well
CPU_COPY_BYTES = 256 << 20  # 256 MiB per buffer: past the last-level cache, kind to a small machine


def measure_copy_bandwidth(
    device: torch.device | str, num_bytes: int | None = None, repeats: int = 10
) -> float:
    """Bytes per second of `dst.copy_(src)` between two buffers of `num_bytes` on `device`.

    Each copy counts 2 * num_bytes (it reads src and writes dst), the same way the decode floor counts
    the bytes a step reads and writes. One warm-up copy first; then `repeats` copies, each timed alone
    (CUDA: events around the copy; CPU: perf_counter), and the median time is reported.
    Default sizes: 1 GiB on CUDA, 256 MiB on CPU.
    """
    device = torch.device(device)
    if num_bytes is None:
        num_bytes = CUDA_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES
    src = torch.ones(num_bytes, dtype=torch.uint8, device=device)  # touched: pages are mapped before timing
    dst = torch.zeros_like(src)
    dst.copy_(src)  # warm-up
    timer = _cuda_copy_time if device.type == "cuda" else _cpu_copy_time
    seconds = statistics.median(timer(dst, src) for _ in range(max(1, repeats)))
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * num_bytes / seconds


def _cuda_copy_time(dst: torch.Tensor, src: torch.Tensor) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(src.device)
    start.record()
    dst.copy_(src)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def _cpu_copy_time(dst: torch.Tensor, src: torch.Tensor) -> float:
    start = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - start
