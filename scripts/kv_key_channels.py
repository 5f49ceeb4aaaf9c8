"""Offline check for issue 8's KIVI option: how much of int4 KV's error comes from the keys, and how
much per-channel key scales (over blocks of 16 tokens, as KIVI quantizes keys) would remove.

Runs SmolLM2 (CPU) over one input-grounded prompt, keeps each layer's prefill q/k/v, and compares
causal attention over exact K/V with attention over K/V quantized in several ways (relative error
of the attention output, mean and max over the 30 layers). Prints a table; writes nothing.

    python scripts/kv_key_channels.py
"""

from __future__ import annotations

import torch

from adaptserve import LLM, SamplingParams
from adaptserve.bench.spec import grounded_conversations
from adaptserve.kernels import kv_quant
from adaptserve.model.loaders import load_checkpoint


def capture_prefill(llm: LLM, conversation) -> list[tuple]:
    """(q [T, H, D], k [T, KVH, D], v, scale) of every layer's prefill of `conversation`."""
    backend = llm.engine.runner.attention
    captured, attend = [], backend.attend

    def keep(q, k, v, k_cache, v_cache, meta, scale):
        if q.shape[0] > 1:
            captured.append((q.clone(), k.clone(), v.clone(), scale))
        return attend(q, k, v, k_cache, v_cache, meta, scale)

    backend.attend = keep
    llm.chat([conversation], SamplingParams(max_tokens=1), use_tqdm=False)
    backend.attend = attend
    return captured


def causal_attention(q, k, v, scale) -> torch.Tensor:
    """q [T, H, D], k and v [T, KVH, D] -> [T, H, D] in float32."""
    num_tokens, num_heads, _ = q.shape
    repeat = num_heads // k.shape[1]
    k, v = k.repeat_interleave(repeat, 1).float(), v.repeat_interleave(repeat, 1).float()
    scores = torch.einsum("thd,shd->hts", q.float(), k) * scale  # [H, T, T]
    future = torch.triu(torch.ones(num_tokens, num_tokens, dtype=torch.bool), 1)
    return torch.einsum("hts,shd->thd", scores.masked_fill(future, float("-inf")).softmax(-1), v)


def round_trip(x, name: str, group_size: int = 64) -> torch.Tensor:
    """x through the engine's own quantizer (per token) and back."""
    data, scales = kv_quant.quantize(x, name, group_size, torch.float32)
    return kv_quant.dequantize(data, scales, name, group_size, torch.float32)


def per_channel_int4(x, block: int = 16) -> torch.Tensor:
    """Asymmetric int4 with an fp16 scale and minimum per channel over each block of tokens."""
    out = torch.empty_like(x, dtype=torch.float32)
    for start in range(0, x.shape[0], block):
        tokens = x[start : start + block].float()  # [b, KVH, D]
        low = tokens.amin(0, keepdim=True).half().float()
        scale = ((tokens.amax(0, keepdim=True) - low) / 15).clamp(min=1e-6).half().float()
        out[start : start + block] = ((tokens - low) / scale).round().clamp(0, 15) * scale + low
    return out


def round_trip_int4(x) -> torch.Tensor:
    return round_trip(x, "int4")


VARIANTS = {
    "K int8, V int8 (per token)": (lambda k: round_trip(k, "int8"), lambda v: round_trip(v, "int8")),
    "K int4 g64, V int4 g64 (the engine's int4)": (round_trip_int4, round_trip_int4),
    "K int4 g32, V int4 g32": (lambda k: round_trip(k, "int4", 32), lambda v: round_trip(v, "int4", 32)),
    "K int4 per channel (16 tokens), V int4 g64": (per_channel_int4, round_trip_int4),
    "K int4 per channel (16 tokens), V int8": (per_channel_int4, lambda v: round_trip(v, "int8")),
    "K int8, V int4 g64": (lambda k: round_trip(k, "int8"), round_trip_int4),
    "K int4 g64, V int8": (round_trip_int4, lambda v: round_trip(v, "int8")),
}


def main() -> None:
    torch.set_num_threads(1)
    llm = LLM.from_checkpoint(load_checkpoint(None, progress=False), max_num_seqs=4)
    layers = capture_prefill(llm, grounded_conversations(1)[0])
    print(f"{len(layers)} layers, {layers[0][0].shape[0]} prompt tokens")
    for name, (keys, values) in VARIANTS.items():
        errors = []
        for q, k, v, scale in layers:
            exact = causal_attention(q, k, v, scale)
            approx = causal_attention(q, keys(k), values(v), scale)
            errors.append(float((approx - exact).norm() / exact.norm()))
        print(f"{name:46s} attention error mean {sum(errors) / len(errors):.4f}  max {max(errors):.4f}")


if __name__ == "__main__":
    main()
