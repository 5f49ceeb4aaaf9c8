"""What a compiled Triton launch costs an SM, for the autotuner's occupancy pruning; and launching a
kernel, or only compiling it, through one call so both see the same arguments."""

from __future__ import annotations

from functools import partial
from typing import Any


def launcher(kernel: Any, grid: tuple[int, ...], compile_only: bool = False) -> Any:
    """`kernel[grid]`; with `compile_only`, a callable taking the same arguments that compiles the
    specialization the launch would run (Triton's JIT warmup: into its in-memory cache) and launches
    nothing. A dtype may stand for a tensor there (a scratch buffer that need not be allocated)."""
    return partial(kernel.warmup, grid=grid) if compile_only else kernel[grid]


def record_resources(compiled: Any, resources: dict | None, num_warps: int) -> None:
    """Fill `resources` with the launch's registers, spills, shared memory and warps (GPU launches
    only: under Triton's interpreter `compiled` carries none of them)."""
    if resources is not None and hasattr(compiled, "n_regs"):
        resources.update(
            regs=compiled.n_regs,
            spills=compiled.n_spills,
            shared=compiled.metadata.shared,
            num_warps=num_warps,
        )
