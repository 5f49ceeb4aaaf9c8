"""Where one engine step's time goes: torch.profiler over a few steps, GPU kernels grouped by kind.

The summary says, per step: wall time, GPU busy time (the sum of kernel times, overlap ignored) and
the rest (host work the GPU waited for: scheduling, input preparation, launches, sampling), and the GPU
time of each kernel group with its top kernels.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

# substrings of kernel names -> group; the first match wins
_GROUPS = (
    ("attention", ("_decode_kernel", "_merge_kernel", "prefill", "flash", "attention", "fmha")),
    ("rope_kv_write", ("rope",)),
    ("rms_norm", ("rms_norm", "norm_kernel")),
    ("gemm", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "sm90", "wgmma", "splitk", "matmul")),
    ("sampling", ("argmax", "softmax", "sort", "topk", "multinomial")),
    ("copies", ("memcpy", "memset", "copy", "fill")),
)


def kernel_group(name: str) -> str:
    lowered = name.lower()
    for group, keys in _GROUPS:
        if any(k in lowered for k in keys):
            return group
    return "elementwise_other"


def profile_steps(step: Callable[[], None], device: torch.device, steps: int = 3) -> dict[str, Any]:
    """Run `step` `steps` times under the profiler -> per-step summary (milliseconds)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    by_group: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, tuple[str, float, int]] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if device_us <= 0 or event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        group = kernel_group(event.key)
        by_group[group] += device_us / 1e3 / steps
        by_kernel[event.key] = (group, device_us / 1e3 / steps, event.count // steps)
    busy_ms = sum(by_group.values())
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:12]
    return {
        "wall_ms": round(wall_ms, 3),
        "gpu_busy_ms": round(busy_ms, 3),
        "host_or_idle_ms": round(max(0.0, wall_ms - busy_ms), 3),
        "groups_ms": {g: round(t, 3) for g, t in sorted(by_group.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"name": name[:90], "group": g, "ms": round(ms, 4), "launches": n} for name, (g, ms, n) in top
        ],
    }


def format_profile(batch_size: int, summary: dict[str, Any]) -> str:
    lines = [
        f"batch {batch_size}: step {summary['wall_ms']:.2f} ms = GPU busy {summary['gpu_busy_ms']:.2f} ms "
        f"+ host/idle {summary['host_or_idle_ms']:.2f} ms"
    ]
    lines += [f"  {group:<18} {ms:8.3f} ms" for group, ms in summary["groups_ms"].items()]
    return "\n".join(lines)
