"""SiLU of the gate times the up projection, in one Triton kernel: [T, 2I] -> [T, I].

The MLP's `F.silu(gate) * up` is two elementwise kernels in PyTorch (and a [T, I] tensor written and
read back between them); this reads gate and up once and writes the product once.

Numerics follow PyTorch's CUDA kernels step by step. `F.silu` computes `x / (1 + expf(-x))` in float32
and rounds to the model dtype; the multiply takes the two model-dtype values to float32, where their
product is exact, and rounds once. On the GPU the kernel does the same operations with the same
functions: libdevice's `expf` (Triton's `tl.exp` is a faster approximation) and an IEEE division
(`div_rn`; Triton's `/` is an approximate division), so bfloat16 and float16 results are
bit-identical to PyTorch's on CUDA. The exception is the subnormal range: `div_rn` is
`div.rn.ftz.f32`, so a gate with |gate| < 2**-125 gives 0 where PyTorch keeps a subnormal; activations
do not sit there. float32 inputs get the same formula without the roundings.

Triton's interpreter cannot call libdevice, so on the CPU the exponential is `tl.exp` (numpy's float32
exp): an output can then be one rounding step (1 ulp of the model dtype) away from PyTorch's where
silu(gate) sits next to a rounding boundary. Rounding to bfloat16 goes through `round_to_dtype`
(see triton_norm.py: the interpreter truncates).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from adaptserve.kernels.launch_resources import record_resources
from adaptserve.kernels.triton_norm import round_to_dtype

KERNEL_VERSION = 1

# launch variants worth timing on an H100; each dict is keyword arguments of `silu_and_mul`
CONFIGS: list[dict] = [
    {"block": block, "num_warps": num_warps} for block in (512, 1024, 2048) for num_warps in (2, 4, 8)
]


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    intermediate,
    stride_x,
    stride_out,
    IS_FP32: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = cols < intermediate
    dtype = x_ptr.dtype.element_ty
    gate_ptrs = x_ptr + row * stride_x + cols  # [BLOCK]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    up = tl.load(gate_ptrs + intermediate, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    if PRECISE_EXP:
        exp_neg = libdevice.exp(-gate)  # CUDA's expf, as PyTorch's kernel calls it
    else:
        exp_neg = tl.exp(-gate)  # the interpreter has no libdevice
    silu = tl.math.div_rn(gate, 1.0 + exp_neg)  # [BLOCK]
    if IS_FP32:
        out = silu * up
    else:
        # silu is rounded to the model dtype; the product of two model-dtype values is exact in float32
        out = round_to_dtype(round_to_dtype(silu, dtype) * up, dtype)
    tl.store(out_ptr + row * stride_out + cols, out.to(dtype), mask=mask)


def silu_and_mul(
    x: torch.Tensor,
    *,
    block: int = 1024,
    num_warps: int = 4,
    out: torch.Tensor | None = None,
    resources: dict | None = None,
) -> torch.Tensor:
    """x: [T, 2I] (gate then up along the last dim, unit stride) -> silu(gate) * up: [T, I] in x.dtype.

    `out` ([T, I], unit stride along I) receives the result when given. `resources`, when a dict,
    receives the compiled kernel's registers, spills, shared memory and warps. No host syncs: safe
    inside CUDA-graph capture.
    """
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [T, 2 * intermediate] with unit stride along it, got {tuple(x.shape)}")
    num_rows, intermediate = x.shape[0], x.shape[1] // 2
    out = x.new_empty(num_rows, intermediate) if out is None else out
    if out.shape != (num_rows, intermediate) or out.stride(1) != 1 or out.dtype != x.dtype:
        raise ValueError(f"out must be [{num_rows}, {intermediate}] {x.dtype} with unit stride along it")
    if num_rows == 0 or intermediate == 0:
        return out
    grid = (num_rows, triton.cdiv(intermediate, block))
    compiled = _silu_and_mul_kernel[grid](
        x,
        out,
        intermediate,
        x.stride(0),
        out.stride(0),
        IS_FP32=x.dtype == torch.float32,
        PRECISE_EXP=x.is_cuda,  # CPU tensors mean Triton's interpreter
        BLOCK=block,
        num_warps=num_warps,
    )
    record_resources(compiled, resources, num_warps)
    return out
