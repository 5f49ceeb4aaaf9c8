"""The same model in Hugging Face transformers: the reference for parity tests (the same weights) and
the baseline in benchmarks (the same weights, or for random presets the same shapes)."""

from __future__ import annotations

import statistics
import time

import torch

from adaptserve.model.config import ModelArchConfig
from adaptserve.model.loaders import LoadedCheckpoint

_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_CONFIGS = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
}


def transformers_config(arch: ModelArchConfig):
    import transformers

    config_cls = getattr(transformers, _CONFIGS[arch.architecture])
    kwargs = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        rms_norm_eps=arch.rms_norm_eps,
        rope_theta=arch.rope_theta,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=arch.bos_token_id,
        eos_token_id=arch.eos_token_ids or None,
    )
    if arch.rope_scaling:
        kwargs["rope_scaling"] = dict(arch.rope_scaling)
    if arch.architecture in ("llama", "qwen3"):
        kwargs["attention_bias"] = arch.attention_bias or arch.o_proj_bias
    return config_cls(**kwargs)


def transformers_model(
    checkpoint: LoadedCheckpoint, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
):
    """A transformers model of the checkpoint's architecture, in `dtype`, on `device` (default: CPU).

    Real checkpoints: exactly the checkpoint's weights. Random presets (state_dict None): transformers'
    own random initialisation, not our values (weight values do not change speed), built directly on
    the device in the dtype, so an 8B model on a GPU takes seconds instead of a CPU init and a copy.
    """
    import transformers

    arch = checkpoint.arch
    model_cls = getattr(transformers, _CLASSES[arch.architecture])
    if checkpoint.state_dict is None:
        with torch.device(device or "cpu"):
            model = model_cls._from_config(transformers_config(arch), dtype=dtype)
        return model.eval()
    model = model_cls(transformers_config(arch))
    state = dict(checkpoint.state_dict)
    if arch.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit transformers' model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model = model.to(dtype)
    return (model if device is None else model.to(device)).eval()


class TransformersGenerator:
    """Times transformers' `generate` (greedy, exactly `new_tokens` new tokens) on one model.

    variant "eager": the default generate with a DynamicCache. variant "static": a static cache
    (`cache_implementation="static"`); on CUDA transformers then compiles the decode forward with
    torch.compile (mode "reduce-overhead", CUDA graphs) on its own, its fast path; on CPU it does not
    compile. The static cache is sized to prompt + 1 + steps for both calls of `decode_step_samples`,
    so they share one compiled graph per batch shape; a warm-up pair of calls per shape pays for the
    compilation before anything is timed, and `num_compiles_while_timing` counts any compilation that
    still happened inside a timed call (0 when all is well).
    """

    VARIANTS = ("eager", "static")

    def __init__(self, model, variant: str = "eager"):
        if variant not in self.VARIANTS:
            raise ValueError(f"unknown transformers variant {variant!r}; known: {', '.join(self.VARIANTS)}")
        self.model, self.variant = model, variant
        self.device = next(model.parameters()).device
        # older transformers lack the option; their static cache keeps the longest length seen instead
        self._has_max_cache_len = hasattr(model.generation_config, "max_cache_len")
        self.num_compiles_while_timing = 0
        self._warm_shapes: set[tuple[int, int, int]] = set()  # (batch size, prompt length, steps)

    @torch.inference_mode()
    def time_generate(
        self, batch: list[list[int]], new_tokens: int, max_cache_len: int | None = None
    ) -> float:
        """Seconds (device synchronized) for greedy generate of exactly `new_tokens` tokens per row.
        Rows of different lengths are left-padded with id 0 and masked out."""
        ids, mask = _left_padded(batch, self.device)  # [B, L] each
        kwargs = {}
        if self.variant == "static":
            kwargs = {"cache_implementation": "static"}
            if max_cache_len is not None and self._has_max_cache_len:
                kwargs["max_cache_len"] = max_cache_len
        _sync(self.device)
        start = time.perf_counter()
        self.model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
        _sync(self.device)
        return time.perf_counter() - start

    def decode_step_samples(self, batch: list[list[int]], steps: int, repeats: int = 3) -> list[float]:
        """`repeats` measurements of one decode step's seconds: (t(1 + steps) - t(1)) / steps, so the
        prefill (and the first token it yields) is left out."""
        cache_len = max(len(row) for row in batch) + 1 + steps
        shape = (len(batch), cache_len - 1 - steps, steps)
        if shape not in self._warm_shapes:
            self.time_generate(batch, 1 + steps, cache_len)
            self.time_generate(batch, 1, cache_len)
            self._warm_shapes.add(shape)
        compiles_before = _num_compiles()
        samples = []
        for _ in range(repeats):
            full = self.time_generate(batch, 1 + steps, cache_len)
            prefill = self.time_generate(batch, 1, cache_len)
            samples.append((full - prefill) / steps)
        self.num_compiles_while_timing += _num_compiles() - compiles_before
        return samples

    def decode_step_time(self, batch: list[list[int]], steps: int, repeats: int = 3) -> float:
        """Median of `decode_step_samples`: seconds per decode step, prefill excluded."""
        return statistics.median(self.decode_step_samples(batch, steps, repeats))


def _left_padded(batch: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(row) for row in batch)
    ids = torch.tensor([[0] * (length - len(row)) + list(row) for row in batch], device=device)  # [B, L]
    mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in batch], device=device)
    return ids, mask


def _num_compiles() -> int:
    """Graphs torch.compile has produced so far in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
