#!/usr/bin/env bash
# On the GPU machine: serve the llama-3.1-8b preset with the online autotuner, drive it with a
# ShareGPT-shaped load, and while it runs offer a deliberately slowed decode kernel (the default Triton
# config run 8 times). Saves the kernel state (swaps, rollbacks) and the benchmark JSON into $1.
set -uo pipefail
out="${1:-docs/benchmarks}"
cache=/tmp/adaptserve-kernels.json; rm -f "$cache"
python3 -m adaptserve.cli serve --model llama-3.1-8b --port 8011 --max-num-seqs 64 --autotune online \
  --kernel-cache "$cache" --log-level warning >/tmp/serve.log 2>&1 &
server=$!
for _ in $(seq 240); do curl -sf localhost:8011/health >/dev/null && break; sleep 0.5; done
python3 -m adaptserve.cli bench serve --base-url http://127.0.0.1:8011 --dataset-name sharegpt-synth \
  --num-prompts 400 --request-rate 8 --tokenizer llama-3.1-8b --result-dir "$out" --save-detailed >/tmp/bench.log 2>&1 &
bench=$!
sleep 25
curl -s localhost:8011/admin/kernels > "$out/kernels-before-offer.json"
curl -s -XPOST localhost:8011/admin/kernels/offer -H 'content-type: application/json' \
  -d '{"op":"decode_attention","variant":"triton_slowed[tile_n=64,num_warps=4,num_stages=2,repeat=8]"}'; echo
wait $bench; tail -30 /tmp/bench.log
curl -s localhost:8011/admin/kernels > "$out/kernels-after.json"
python3 - "$out/kernels-after.json" <<'PY'
import json, sys
state = json.load(open(sys.argv[1]))
for e in state["registry"]["history"]:
    print(f"{e['reason']:<40} {e['bucket']:<45} {e['old']} -> {e['new']}")
print({k: len(v) for k, v in state["autotuner"].items() if isinstance(v, (dict, list))})
PY
kill $server; wait $server 2>/dev/null; tail -5 /tmp/serve.log
