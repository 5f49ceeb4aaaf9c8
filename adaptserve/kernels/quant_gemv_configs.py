"""Launch configs of the quantized small-batch GEMV (triton_quant_gemv.py): the variants, which suit
how many rows, and the one to launch, measured on an H200 (docs/benchmarks/quant_gemv-h200.json)."""

from __future__ import annotations

import triton

FMA_MAX_ROWS = 4  # CUDA-core tiles hold [rows, BLOCK_N, BLOCK_K] products; more rows go to the dot
DOT_MIN_ROWS = 16  # tl.dot's smallest M tile
DOT_MAX_ROWS = 32  # rows one tensor-core program handles; more rows take more programs
H100_SMS = 132


CONFIG_KEYS = ("block_n", "block_k", "split_k", "num_warps", "num_stages", "use_dot")


def _configs(*rows: tuple) -> list[dict]:
    return [dict(zip(CONFIG_KEYS, row, strict=True)) for row in rows]


def _folded(*rows: tuple) -> list[dict]:
    """int4 configs of the folded kernel (triton_int4_gemv.py), CUDA cores: "folded" is True."""
    return [dict(_configs(row + (False,))[0], folded=True) for row in rows]


# launch variants to time on an H100, in order of preference; each is a `config` of fp8_gemv / int4_gemv.
# Tiles are sized by weight bytes: an fp8 tile of BLOCK_K columns is BLOCK_K bytes per row, an int4 one
# BLOCK_K / 2, so int4 tiles are twice as long to read as much per load.
CONFIGS: dict[str, list[dict]] = {
    "fp8": _configs(
        # CUDA cores: narrow, long tiles, like triton_gemv's measured best for bfloat16 (n2 k2048)
        (2, 4096, 1, 4, 1, False),
        (2, 2048, 1, 4, 1, False),
        (4, 1024, 1, 4, 2, False),
        # more bytes in flight per thread at M = 1 (n2 k4096 was the best at 1.8-2.5 TB/s)
        (1, 8192, 1, 4, 1, False),
        (2, 8192, 1, 8, 1, False),
        (4, 4096, 1, 8, 1, False),
        (2, 4096, 1, 2, 1, False),
        (2, 4096, 1, 4, 2, False),
        (4, 2048, 1, 4, 2, False),
        (2, 4096, 2, 4, 1, False),  # split-K for the long K of "down"
        # tensor cores, any row count
        (16, 512, 1, 4, 3, True),
        (32, 256, 1, 4, 3, True),
        (64, 256, 1, 4, 3, True),
        (32, 512, 4, 4, 3, True),
    ),
    "int4": _configs(
        # the byte kernel on the CUDA cores (n4 k2048: the best measured at M = 1, 0.72-0.9x bfloat16)
        (4, 2048, 1, 4, 1, False),
        (2, 2048, 1, 2, 1, False),
        # tensor cores; n16/n32 k1024 spilled hundreds of registers at M = 32 (10-100x slower): dropped
        (32, 512, 1, 4, 3, True),
        (64, 256, 1, 4, 3, True),
        (64, 128, 1, 4, 3, True),
        (32, 256, 2, 4, 3, True),
    )
    + _folded(
        # triton_int4_gemv.py: int32 words, zero point and scale out of the inner loop (M <= 4)
        (4, 2048, 1, 4, 1),
        (8, 1024, 1, 4, 1),
        (2, 4096, 1, 4, 1),
        (4, 4096, 1, 8, 1),
        (8, 2048, 1, 8, 1),
        (16, 1024, 1, 8, 1),
        (4, 1024, 1, 4, 2),
        (8, 1024, 1, 4, 2),
        (4, 2048, 2, 4, 1),
        (16, 512, 1, 4, 1),
    ),
}


def configs_for(kind: str, num_rows: int) -> list[dict]:
    """The CONFIGS of `kind` ("fp8" or "int4") that suit `num_rows` rows (all are correct for any)."""
    return [c for c in CONFIGS[kind] if c["use_dot"] or num_rows <= FMA_MAX_ROWS]


def block_rows(config: dict, num_rows: int) -> int:
    """Rows per program: the batch rounded up to a power of two, within the config's limits."""
    rows = triton.next_power_of_2(max(num_rows, 1))
    if config["use_dot"]:
        return min(max(rows, DOT_MIN_ROWS), DOT_MAX_ROWS)
    return min(rows, FMA_MAX_ROWS)


def num_programs(config: dict, num_rows: int, out_features: int) -> int:
    """Programs of the main kernel's grid."""
    row_blocks = triton.cdiv(num_rows, block_rows(config, num_rows))
    return triton.cdiv(out_features, config["block_n"]) * config["split_k"] * row_blocks


def pick_config(kind: str, num_rows: int, out_features: int, in_features: int, num_sms=H100_SMS) -> dict:
    """A config for x [num_rows, in_features] @ a `kind` weight [out_features, in_features]^T: the
    fastest measured on an H200 (docs/benchmarks/quant_gemv-h200.json, every config at the four
    Llama-3.1-8B projections, M = 1 and 32), else the first suitable config whose grid gives every SM
    at least two programs. Measured: at M = 1 fp8 n2 k4096 (1.21-1.28x the bfloat16 GEMV) and int4
    n4 k2048 (0.72-0.9x: the kernel is not yet bound by memory); at M = 32 the tensor-core tiles
    n64 k256 (n16 k512 for fp8 at N = 4096), 3-5x faster than the first guesses."""
    measured = _MEASURED_BEST.get((kind, num_rows <= FMA_MAX_ROWS, out_features >= 6144))
    if measured is not None:
        return measured
    candidates = configs_for(kind, num_rows)  # in_features: unused until a measured table keys on it
    candidates = [c for c in candidates if not c.get("folded")]  # not yet measured on a GPU
    for config in candidates:
        if num_programs(config, num_rows, out_features) >= 2 * num_sms:
            return config
    return max(candidates, key=lambda c: num_programs(c, num_rows, out_features))


def _config(kind: str, block_n: int, block_k: int, split_k: int = 1, num_warps: int = 4) -> dict:
    """The config of CONFIGS[kind] with these tile sizes, not folded (a KeyError if it is not there)."""
    for config in CONFIGS[kind]:
        if config.get("folded"):
            continue
        if (config["block_n"], config["block_k"], config["split_k"], config["num_warps"]) == (
            block_n,
            block_k,
            split_k,
            num_warps,
        ):
            return config
    raise KeyError(f"no {kind} config n{block_n} k{block_k} s{split_k} w{num_warps}")


# (kind, rows fit the CUDA-core path, out_features >= 6144) -> the config measured fastest there
_MEASURED_BEST = {
    ("fp8", True, True): _config("fp8", 2, 4096),
    ("fp8", True, False): _config("fp8", 2, 4096),
    ("fp8", False, True): _config("fp8", 64, 256),
    ("fp8", False, False): _config("fp8", 16, 512),
    ("int4", True, True): _config("int4", 4, 2048),
    ("int4", True, False): _config("int4", 4, 2048),
    ("int4", False, True): _config("int4", 64, 256),
    ("int4", False, False): _config("int4", 64, 256),
}
