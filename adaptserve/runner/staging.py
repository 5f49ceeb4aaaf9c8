"""Pinned host mirrors of a device buffer: a step writes its small inputs into the mirror with numpy
and sends them with one copy, instead of one pinned allocation and one copy per tensor.

A verify step's host work is not hidden behind the device (the next step needs its accepted tokens),
so every CUDA call before the launch is time the device sits idle. Two mirrors take turns: the host
may fill the next one while the device has not yet run the copy out of the last; before a mirror is
reused, the copy that last read it is waited for (long done, in practice).
"""

from __future__ import annotations

import numpy as np
import torch


class PinnedStaging:
    def __init__(self, device_buffer: torch.Tensor, num_mirrors: int = 2):
        """`device_buffer`: a contiguous 1-D device tensor (views of it are what the device reads)."""
        if device_buffer.dim() != 1 or not device_buffer.is_contiguous():
            raise ValueError("the staged device buffer must be one contiguous dimension")
        self.device_buffer = device_buffer
        pinned = device_buffer.device.type == "cuda"
        self._mirrors = [torch.zeros_like(device_buffer, device="cpu") for _ in range(num_mirrors)]
        if pinned:
            self._mirrors = [m.pin_memory() for m in self._mirrors]
        self._arrays = [m.numpy() for m in self._mirrors]  # share memory with the mirrors
        self._copied: list[torch.cuda.Event | None] = [None] * num_mirrors
        self._turn = 0

    def host(self) -> np.ndarray:
        """The mirror to fill for this step (its earlier contents are stale, not cleared)."""
        copied = self._copied[self._turn]
        if copied is not None:
            copied.synchronize()
        return self._arrays[self._turn]

    def send(self, num_elements: int) -> None:
        """Copy the first `num_elements` of this step's mirror to the device buffer (stream-ordered,
        without waiting), and pass the turn to the next mirror."""
        mirror = self._mirrors[self._turn]
        self.device_buffer[:num_elements].copy_(mirror[:num_elements], non_blocking=True)
        if self.device_buffer.device.type == "cuda":
            event = self._copied[self._turn] or torch.cuda.Event()
            event.record()
            self._copied[self._turn] = event
        self._turn = (self._turn + 1) % len(self._mirrors)
