"""/admin/kernels on a live server with SmolLM2: show the registry, pin a variant (bad names are a 400
that names the field), offer one on probation, and requests keep succeeding through every change."""

from __future__ import annotations

import httpx
import pytest

from tests.server.live import live_server

pytestmark = pytest.mark.slow


def _complete(server) -> dict:
    body = {
        "model": "SmolLM2-135M-Instruct",
        "prompt": "The capital of France is",
        "max_tokens": 4,
        "temperature": 0,
    }
    response = httpx.post(f"{server.v1}/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_show_pin_and_offer_kernels_while_serving(smollm2, tmp_path):
    with live_server(smollm2, autotune="online", kernel_cache=str(tmp_path / "k.json")) as server:
        first = _complete(server)["choices"][0]["text"]
        state = httpx.get(f"{server.url}/admin/kernels", timeout=30).json()
        assert "torch_ref" in state["registry"]["variants"]["decode_attention"]
        assert state["autotuner"]["online"] is True
        assert state["cuda_graphs"] is None  # CPU

        bad = httpx.post(
            f"{server.url}/admin/kernels/pin", json={"op": "decode_attention", "variant": "nope"}
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "variant" and "nope" in bad.json()["error"]["message"]

        pinned = httpx.post(
            f"{server.url}/admin/kernels/pin", json={"op": "decode_attention", "variant": "torch_ref"}
        ).json()
        assert pinned["reason"] == "pinned" and pinned["new"] == "torch_ref"
        offered = httpx.post(
            f"{server.url}/admin/kernels/offer", json={"op": "decode_attention", "variant": "torch_ref"}
        ).json()
        assert any(key.startswith("decode_attention|") for key in offered["buckets"])
        assert _complete(server)["choices"][0]["text"] == first  # same greedy text after the changes
        history = httpx.get(f"{server.url}/admin/kernels", timeout=30).json()["registry"]["history"]
        assert [e["reason"] for e in history][:1] == ["pinned"]
