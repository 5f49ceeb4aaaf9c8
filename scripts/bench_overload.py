"""Overload benchmark for a GPU: `adaptserve serve` (a random-weight preset) with admission on, then off;
Poisson stream of token-id prompts at mixed priorities; per-tier completions, 429s, TTFT p50/p99."""

import asyncio
import json
import os
import random
import subprocess
import sys
import time

import httpx

MODEL = sys.argv[1] if len(sys.argv) > 1 else "llama-3.1-8b"
N, RATE, MAX_TOKENS = int(os.environ.get("N", 300)), float(os.environ.get("RATE", 40)), 128
TIERS = {"high": (-1, 0.5), "normal": (0, 2.0), "low": (1, 5.0)}
OUT = os.environ.get("OUT", "/tmp")


def workload(seed=0):
    rng = random.Random(seed)
    at = 0.0
    items = []
    for _ in range(N):
        at += rng.expovariate(RATE)
        tier = rng.choices(list(TIERS), weights=[1, 2, 1])[0]
        prompt = [rng.randrange(1000, 100000) for _ in range(rng.randint(100, 400))]
        items.append((at, tier, prompt))
    return items


async def one(client, url, start, at, tier, prompt):
    await asyncio.sleep(max(0, start + at - time.monotonic()))
    sent = time.monotonic()
    r = {"tier": tier, "status": None, "ttft": None, "tokens": 0}
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
        "priority": TIERS[tier][0],
    }
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            r["status"] = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                return r
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    if r["ttft"] is None:
                        r["ttft"] = time.monotonic() - sent
                    r["tokens"] += 1
            r["e2e"] = time.monotonic() - sent
    except httpx.HTTPError as e:
        r["status"] = repr(e)
    return r


async def load(url):
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=N + 10)) as c:
        start = time.monotonic()
        res = await asyncio.gather(*[one(c, url, start, *w) for w in workload()])
        return res, time.monotonic() - start


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else None


def summary(res, duration):
    out = {"duration_s": round(duration, 2)}
    for tier, (_, slo) in TIERS.items():
        mine = [r for r in res if r["tier"] == tier]
        ok = [r for r in mine if r["status"] == 200]
        t = [r["ttft"] for r in ok if r["ttft"] is not None]
        out[tier] = {
            "slo_s": slo,
            "sent": len(mine),
            "completed": len(ok),
            "rejected_429": sum(r["status"] == 429 for r in mine),
            "other": sum(r["status"] not in (200, 429) for r in mine),
            "ttft_p50_s": pct(t, 0.5),
            "ttft_p99_s": pct(t, 0.99),
            "met_slo": sum(x <= slo for x in t),
        }
    out["output_tokens_per_s"] = round(sum(r["tokens"] for r in res) / duration, 1)
    return out


def serve(admission, port):
    slo = ",".join(f"{k}={v[1]}" for k, v in TIERS.items())
    cmd = [
        sys.executable,
        "-m",
        "adaptserve.cli",
        "serve",
        "--model",
        MODEL,
        "--device",
        "cuda",
        "--port",
        str(port),
        "--admission",
        admission,
        "--ttft-slo",
        slo,
        "--max-model-len",
        "4096",
        "--log-level",
        "warning",
        "--max-num-batched-tokens",
        os.environ.get("BUDGET", "2048"),
    ]
    p = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    t = time.monotonic()
    while True:
        assert p.poll() is None, "server died"
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return p, url, time.monotonic() - t


def main():
    results = {
        "model": MODEL,
        "num_requests": N,
        "rate_per_s": RATE,
        "max_tokens": MAX_TOKENS,
        "max_num_batched_tokens": int(os.environ.get("BUDGET", "2048")),
        "tiers": TIERS,
    }
    for i, admission in enumerate(["slo", "off"]):
        p, url, ready_s = serve(admission, 8300 + i)
        res, duration = asyncio.run(load(url))
        s = summary(res, duration)
        s["ready_s"] = round(ready_s, 1)
        s["metrics"] = [
            line
            for line in httpx.get(f"{url}/metrics").text.splitlines()
            if line.startswith(("adaptserve:request_rejected_total", "adaptserve:requests_total"))
        ]
        results[f"admission_{admission}"] = s
        print(json.dumps(s, indent=1), flush=True)
        p.terminate()
        print("exit", p.wait(60), flush=True)
    json.dump(results, open(os.path.join(OUT, "gpu_overload.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
