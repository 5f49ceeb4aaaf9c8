"""A client that goes away mid-request: its request is aborted and its KV blocks return to the pool."""

import time

import httpx

MODEL = "SmolLM2-135M-Instruct"
LONG = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 1500, "ignore_eos": True}


def _kv(server):
    kv_cache = server.state.engine.engine.kv_cache
    return kv_cache.num_free_blocks, kv_cache.block_pool.num_blocks


def _seconds_until_all_blocks_free(server, limit: float = 5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        free, total = _kv(server)
        if free == total and not server.state.engine.num_in_flight:
            return time.monotonic() - start
        time.sleep(0.01)
    return float("inf")


def _metric(server, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_stream_disconnect_frees_blocks_within_a_second(server):
    with httpx.stream("POST", f"{server.v1}/completions", json={**LONG, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: ")
            if chunks == 3:
                break
        free, total = _kv(server)
        assert free < total  # the request holds blocks while it runs
    # leaving the block closed the connection mid-stream
    assert _seconds_until_all_blocks_free(server) < 1.0
    assert _metric(server, "adaptserve:kv_cache_usage_perc") == 0.0
    assert _metric(server, "adaptserve:num_requests_running") == 0.0


def test_non_stream_disconnect_frees_blocks_within_a_second(server):
    try:
        httpx.post(f"{server.v1}/completions", json=LONG, timeout=1.0)
        raise AssertionError("1500 tokens on a CPU should take longer than the 1 s client timeout")
    except httpx.ReadTimeout:
        pass
    assert _seconds_until_all_blocks_free(server) < 1.0


def test_server_serves_after_disconnects(server):
    response = httpx.post(f"{server.v1}/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] <= 2
