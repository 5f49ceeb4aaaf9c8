"""Join the per-setting `bench decode` results that scripts/kv_decode_gpu.sh wrote under
<dir>/decode-<setting>/ into one `kv-decode` record (<dir>/kv-decode-<device>.json) and draw it.

Usage: python3 scripts/kv_decode_combine.py <dir> [--git-commit SHA]  (a device copy's git metadata
may be stale: give the commit that ran)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adaptserve.bench.plot import plot_after_run

KEEP = ("batch_size", "step_ms", "step_ms_samples", "floor_ms", "tokens_per_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--git-commit")
    args = parser.parse_args()
    runs = {}
    # the plain cache first: the baseline
    paths = sorted(args.dir.glob("decode-*/decode-*.json"), key=lambda p: (p.parent.name != "decode-bf16", p))
    for path in paths:
        runs[path.parent.name.removeprefix("decode-")] = json.loads(path.read_text(encoding="utf-8"))
    if not runs:
        raise SystemExit(f"no decode-*/decode-*.json under {args.dir}")
    first = next(iter(runs.values()))
    record = {
        "benchmark": "kv-decode",
        **{
            key: first[key]
            for key in ("device", "date", "git_commit", "torch", "model", "context_len", "steps")
        },
        "settings": {
            name: {
                "command": run.get("command"),
                "results": [{key: row[key] for key in KEEP} for row in run["results"]],
            }
            for name, run in runs.items()
        },
    }
    if args.git_commit:
        record["git_commit"] = args.git_commit
    tag = next(args.dir.glob("decode-*/decode-*.json")).stem.removeprefix("decode-")  # the device tag
    out = args.dir / f"kv-decode-{tag}.json"
    out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    plot_after_run(out)


if __name__ == "__main__":
    main()
