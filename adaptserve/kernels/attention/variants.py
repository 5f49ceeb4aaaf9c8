"""The attention variants the registry can choose from, one KernelVariant per (family, launch params).

Each `run(q, k, v, k_cache, v_cache, meta, scale, out, resources)` fills its rows of `out`: the decode
op the first `meta.num_decode_tokens` rows, the prefill op the rest. Triton variants also have a
`warmup` with run's arguments (no resources) that only compiles what run would launch. Triton families
are registered only where Triton imports (CUDA machines, or the interpreter in tests).
"""

from __future__ import annotations

from functools import partial

import torch

from adaptserve.kernels.attention.metadata import AttentionMetadata
from adaptserve.kernels.attention.torch_ref import TorchReferenceAttention
from adaptserve.kernels.availability import triton_available
from adaptserve.kernels.registry import DECODE_ATTENTION, PREFILL_ATTENTION, KernelRegistry, KernelVariant

_REFERENCE = TorchReferenceAttention()


def reference_variants() -> list[KernelVariant]:
    return [
        KernelVariant(DECODE_ATTENTION, "torch_ref", _ref_decode),
        KernelVariant(PREFILL_ATTENTION, "torch_ref", _ref_prefill),
    ]


def triton_variants(slowed: bool = True) -> list[KernelVariant]:
    """Every launch config of the Triton kernels; `slowed` adds a deliberately slow decode variant
    (the default config run `repeat` times), never tuned for, offered to test the rollback guard."""
    from adaptserve.kernels.attention import triton_decode, triton_prefill

    variants = [
        _triton(DECODE_ATTENTION, "triton", _triton_decode, p, triton_decode) for p in triton_decode.CONFIGS
    ]
    variants += [
        _triton(PREFILL_ATTENTION, "triton", _triton_prefill, p, triton_prefill)
        for p in triton_prefill.CONFIGS
    ]
    if slowed:
        params = {**DEFAULT_DECODE_CONFIG, "repeat": 8}
        variants.append(_triton(DECODE_ATTENTION, "triton_slowed", _triton_decode, params, triton_decode))
    return variants


DEFAULT_DECODE_CONFIG = {"tile_n": 64, "num_warps": 4, "num_stages": 2}
DEFAULT_PREFILL_CONFIG = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}


def _triton(op: str, family: str, run, params: dict, module) -> KernelVariant:
    return KernelVariant(
        op,
        family,
        partial(run, params),
        params=tuple(params.items()),
        warmup=partial(run, params, compile_only=True),
        version=module.KERNEL_VERSION,
        graph_safe=True,  # the launch wrappers read no device values
    )


def build_registry(
    device: torch.device, families: tuple[str, ...] = ("torch_ref", "triton")
) -> KernelRegistry:
    """A registry holding the families asked for that run here; defaults: Triton on CUDA when it
    imports, the reference on CPU."""
    registry = KernelRegistry()
    for variant in reference_variants():
        registry.register(variant)
    use_triton = "triton" in families and triton_available() and device.type == "cuda"
    if use_triton:
        for variant in triton_variants():
            registry.register(variant)
        registry.register(_find(registry, DECODE_ATTENTION, DEFAULT_DECODE_CONFIG), default=True)
        registry.register(_find(registry, PREFILL_ATTENTION, DEFAULT_PREFILL_CONFIG), default=True)
    if "flex" in families:
        for variant in flex_variants():
            registry.register(variant)
    return registry


def flex_variants() -> list[KernelVariant]:
    from adaptserve.kernels.attention.flex import FlexAttentionBackend

    backend = FlexAttentionBackend()
    return [
        KernelVariant(DECODE_ATTENTION, "flex", partial(_flex, backend, decode=True)),
        KernelVariant(PREFILL_ATTENTION, "flex", partial(_flex, backend, decode=False)),
    ]


def _find(registry: KernelRegistry, op: str, params: dict) -> KernelVariant:
    for variant in registry.variants(op):
        if variant.family == "triton" and dict(variant.params) == params:
            return variant
    raise ValueError(f"no triton {op} variant with {params}")


# ---- runners ---------------------------------------------------------------------------------------


def _ref_decode(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale, out, resources=None) -> None:
    num_decode = meta.num_decode_tokens
    out[:num_decode] = _REFERENCE._decode(q[:num_decode], k_cache, v_cache, meta, scale)


def _ref_prefill(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale, out, resources=None) -> None:
    _REFERENCE.prefill(q, k, v, k_cache, v_cache, meta, scale, out)


def _triton_decode(
    params, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale, out, resources=None, compile_only=False
):
    from adaptserve.kernels.attention.triton_decode import choose_num_splits, paged_decode_attention

    num_decode = meta.num_decode_tokens
    params = dict(params)
    repeat = params.pop("repeat", 1)
    num_splits = choose_num_splits(
        num_decode, k_cache.shape[2], meta.max_context_len, tile_n=params["tile_n"]
    )
    for _ in range(repeat):
        paged_decode_attention(
            q[:num_decode],
            k_cache,
            v_cache,
            meta.block_table[:num_decode],
            meta.context_lens[:num_decode],
            scale,
            num_splits=num_splits,
            out=out[:num_decode],
            resources=resources,
            compile_only=compile_only,
            **params,
        )


def _triton_prefill(
    params, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale, out, resources=None, compile_only=False
):
    from adaptserve.kernels.attention.triton_prefill import paged_prefill_attention

    first = meta.num_decode_tokens  # prefill sequences follow the decodes, one per decode token
    paged_prefill_attention(
        q,
        k_cache,
        v_cache,
        meta.block_table[first:],
        meta.query_start_loc[first:],
        meta.context_lens[first:],
        scale,
        meta.max_query_len,
        out=out,
        resources=resources,
        compile_only=compile_only,
        **params,
    )


def _flex(backend, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale, out, resources=None, *, decode):
    rows = slice(0, meta.num_decode_tokens) if decode else slice(meta.num_decode_tokens, None)
    out[rows] = backend.attend(q, k, v, k_cache, v_cache, meta, scale)[rows]
