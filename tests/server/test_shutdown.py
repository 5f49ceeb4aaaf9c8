"""SIGTERM on `adaptserve serve`: new requests get 503 at once, in-flight ones finish (or, past the
drain timeout, end with a clean error), and the process exits 0."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def serve_process():
    processes = []

    def start(*extra: str):
        port = _free_port()
        options = ["--port", str(port), "--max-model-len", "2048", "--kv-cache-memory-gib", "0.25"]
        command = [sys.executable, "-m", "adaptserve.cli", "serve", *options, "--log-level=warning", *extra]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return process, url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def _stream_in_background(url: str, max_tokens: int) -> tuple[threading.Thread, list[str], threading.Event]:
    events: list[str] = []
    first = threading.Event()
    body = {
        "model": MODEL,
        "prompt": "Write a story.",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }

    def run():
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line:
                    events.append(line)
                    first.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, events, first


def test_sigterm_drains_then_exits(serve_process):
    """One process (start-up is the slow part): a short stream finishes within the drain timeout, a
    long one is failed cleanly when it expires, new requests get 503 meanwhile, and the exit code is 0."""
    process, url = serve_process("--drain-timeout", "4")
    short, short_events, short_started = _stream_in_background(url, max_tokens=24)
    long, long_events, long_started = _stream_in_background(url, max_tokens=1500)
    assert short_started.wait(60) and long_started.wait(60)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    refused = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert refused.status_code == 503
    assert "shutting down" in refused.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 503

    short.join(60)
    assert short_events[-1] == "data: [DONE]"
    last = json.loads(short_events[-2][len("data: ") :])
    assert last["choices"][0]["finish_reason"] == "length"  # it ran to its max_tokens

    long.join(60)
    assert not long.is_alive()
    assert long_events[-1] == "data: [DONE]"
    error = json.loads(long_events[-2][len("data: ") :])["error"]
    assert "shut down" in error["message"] and error["code"] == 500
    assert process.wait(30) == 0
