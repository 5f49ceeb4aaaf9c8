"""Times the Triton paged decode kernel per split count and launch config at small batches (CUDA).

Usage: python3 scripts/decode_split_bench.py [--out FILE]. Llama-3.1-8B heads (32 query, 8 KV, D 128),
bf16, pages of 16, 1k-token contexts; each launch checked against the torch reference first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys

import torch
import triton.testing

from adaptserve.bench.results import git_commit
from adaptserve.kernels.attention.triton_decode import CONFIGS, paged_decode_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def reference(q, k_cache, v_cache, block_table, context_len, scale):
    """[N, H, D] attention of each query over its first context_len cached tokens, in float32."""
    keys = k_cache[block_table.long()].flatten(1, 2)[:, :context_len].float()  # [N, L, KVH, D]
    values = v_cache[block_table.long()].flatten(1, 2)[:, :context_len].float()  # [N, L, KVH, D]
    keys = keys.repeat_interleave(HEADS // KV_HEADS, dim=2)  # [N, L, H, D]
    values = values.repeat_interleave(HEADS // KV_HEADS, dim=2)  # [N, L, H, D]
    scores = torch.einsum("nhd,nlhd->nhl", q.float(), keys) * scale  # [N, H, L]
    return torch.einsum("nhl,nlhd->nhd", scores.softmax(-1), values)  # [N, H, D]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--context-len", type=int, default=1024)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    records = []
    for batch in (int(b) for b in args.batches.split(",")):
        blocks = -(-args.context_len // BLOCK)
        k_cache = torch.randn(batch * blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        block_table = torch.randperm(batch * blocks, device="cuda", dtype=torch.int32).view(batch, blocks)
        context_lens = torch.full((batch,), args.context_len, device="cuda", dtype=torch.int32)
        q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        scale = HEAD_DIM**-0.5
        expected = reference(q, k_cache, v_cache, block_table, args.context_len, scale)
        for config in CONFIGS:
            for splits in (1, 2, 4, 8, 16, 32):
                if args.context_len < splits * config["tile_n"]:
                    continue

                inputs = (q, k_cache, v_cache, block_table, context_lens, scale)

                def run(inputs=inputs, config=config, splits=splits):
                    return paged_decode_attention(*inputs, num_splits=splits, **config)

                error = (run().float() - expected).abs().max().item()
                us = triton.testing.do_bench_cudagraph(run, rep=30) * 1e3
                records.append(
                    {"batch": batch, **config, "splits": splits, "us": round(us, 2), "error": error}
                )
        best = sorted((r for r in records if r["batch"] == batch), key=lambda r: r["us"])[:5]
        print(
            f"batch {batch}: "
            + "; ".join(
                f"{r['us']} us t{r['tile_n']} w{r['num_warps']} s{r['num_stages']} x{r['splits']}"
                for r in best
            ),
            flush=True,
        )
        for splits in (1, 2, 4, 8, 16, 32):
            mine = [r for r in records if r["batch"] == batch and r["splits"] == splits]
            if mine:
                print(f"  splits {splits:2}: best {min(r['us'] for r in mine)} us", flush=True)
    bad = [r for r in records if r["error"] > 2e-2]
    print(f"{len(records)} launches checked, {len(bad)} over 2e-2 error")
    if args.out:
        with open(args.out, "w") as f:
            meta = {
                "benchmark": "decode_split",
                "device": torch.cuda.get_device_name(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "git_commit": git_commit(),
                "command": "python3 scripts/decode_split_bench.py " + shlex.join(sys.argv[1:]),
            }
            json.dump({**meta, "context_len": args.context_len, "records": records}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
