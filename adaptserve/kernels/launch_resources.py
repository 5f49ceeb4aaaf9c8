"""What a compiled Triton launch costs an SM, for the autotuner's occupancy pruning."""

from __future__ import annotations

from typing import Any


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
