"""Engine configuration: one dataclass per concern, composed into `EngineConfig`.

Every field has a one-line comment. `EngineConfig.from_dict` rejects unknown keys so a typo is an
error instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class ModelConfig:
    model: str | None = None  # HF folder, .gguf file, preset name; None = embedded SmolLM2
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto (float32 on CPU, bfloat16 on CUDA)
    device: str = "auto"  # cpu | cuda | cuda:N | auto
    max_model_len: int | None = None  # context window; None = the model's own
    seed: int = 0  # seed for random-weight presets


DEFAULT_HOT_WINDOW = 1  # blocks the adaptive KV policy keeps bf16 when cache.kv_hot_window is unset


@dataclass
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_memory_gib: float | None = None  # KV budget; None = auto (see runner.memory)
    gpu_memory_utilization: float = 0.85  # share of device memory the engine may use (CUDA)
    num_blocks: int | None = None  # force the number of KV blocks (tests), overrides the budget
    enable_prefix_caching: bool = True  # reuse KV of shared prompt prefixes
    kv_format: str = (
        "bf16"  # KV write format: bf16 (the model's dtype) | fp8 | int8 | int4k | int4 (formats.py)
    )
    kv_policy: str = "static"  # static (kv_format always) | adaptive (the KV policy picks from kv_ladder)
    kv_ladder: tuple[str, ...] = ("bf16", "int8", "int4")  # adaptive: formats under rising memory pressure
    kv_int4_group_size: int = 64  # channels per int4 scale/minimum
    kv_chunk_blocks: int = 16  # bf16 blocks' worth of memory per chunk (a chunk holds one format)
    kv_requantize_blocks: int = 64  # most cold blocks requantized to the write format per step
    kv_keep_recent_blocks: int = 1  # newest blocks of a sequence never requantized (they still fill)
    # >0: new tokens in bf16 at every level, the newest N blocks stay bf16; 0 = off; None = the
    # default: DEFAULT_HOT_WINDOW under the adaptive policy, off for a static format
    kv_hot_window: int | None = None
    kv_error_budget: float = 0.05  # adaptive: most attention-output error before a format is undone
    kv_monitor_rate: float = 0.25  # share of steps whose KV error is sampled (compressed caches)

    @property
    def compressed(self) -> bool:
        """Whether the cache holds quantized formats (chunked memory; see engine/kv_cache/formats.py)."""
        return self.kv_format != "bf16" or self.kv_policy == "adaptive"

    @property
    def hot_window(self) -> int:
        """Blocks of a sequence kept bf16 (0 = off). Unset, the adaptive policy keeps one: on the CPU
        ramp it met the 99 % agreement goal (99.2 %, against 97.6 % without) with fewer preemptions
        and more tokens/s (docs/benchmarks/kv-hot-window-cpu.json). A static format writes what it
        names unless asked."""
        if self.kv_hot_window is not None:
            return self.kv_hot_window
        return DEFAULT_HOT_WINDOW if self.kv_policy == "adaptive" else 0

    @property
    def num_recent_blocks(self) -> int:
        """Newest blocks of a sequence never requantized: the hot window subsumes kv_keep_recent_blocks
        (the wider of the two; with the window on, every block not requantized is bf16)."""
        return max(self.kv_keep_recent_blocks, self.hot_window)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64  # most requests running at once
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill + decode)
    long_prefill_token_threshold: int = 0  # cap on one request's prefill chunk; 0 = token budget
    policy: str = "fcfs"  # fcfs | priority
    async_scheduling: bool | None = None  # schedule step n+1 while step n runs; None = on for CUDA
    batch_wait_s: float = 0.0  # while requests run, hold new prompts until the oldest waited this long


WEIGHT_FORMATS = ("bf16", "fp8", "int4")  # weight formats a model may hold besides its own, high to low


@dataclass
class PrecisionConfig:
    weight_formats: tuple[str, ...] = ()  # extra weight formats held beside the native ones: bf16, fp8, int4
    precision_policy: str = "native"  # native | bf16 | fp8 | int4 (every step) | adaptive (per decode step)
    int4_group_size: int = 128  # weights per int4 scale/zero group (a divisor of each row is used)
    quality_budget: float = 0.99  # adaptive: least top-1 agreement of low-precision steps with native ones
    shadow_rate: float = 0.1  # adaptive: share of low-precision decode steps re-run natively to measure it
    quantize_lm_head: bool = False  # the LM head in the held formats too, as gpt-fast and torchao do

    def formats_needed(self) -> tuple[str, ...]:
        """The formats to build: those asked for, the fixed policy's, and fp8 + int4 for adaptive."""
        formats = list(self.weight_formats)
        if self.precision_policy == "adaptive" and not formats:
            formats = ["fp8", "int4"]
        elif self.precision_policy not in ("native", "adaptive") and self.precision_policy not in formats:
            formats.append(self.precision_policy)
        return tuple(formats)


ATTENTION_BACKENDS = ("auto", "torch_ref", "triton", "flex")
AUTOTUNE_MODES = ("off", "cache", "online")


@dataclass
class KernelConfig:
    attention_backend: str = "auto"  # auto (Triton on CUDA, reference on CPU) | torch_ref | triton | flex
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (CUDA with a graph-safe backend)
    cuda_graph_max_batch: int | None = None  # largest captured decode batch; None = max_num_seqs
    # graphs per decode step, each over a group of layers: the device starts on the first while the
    # host launches the rest (a verify step's launch is not hidden behind an earlier step)
    cuda_graph_pieces: int = 1
    # prompt chunks of at most this many tokens (what a prefix-cache hit leaves) run as one-token rows
    # of a decode graph instead of an eager prefill; 0: prompt chunks always run eagerly
    cuda_graph_prompt_tokens: int = 64
    autotune: str = "cache"  # off | cache (reuse saved choices) | online (also tune while serving)
    kernel_cache: str | None = None  # file of saved kernel choices; None = ~/.cache/adaptserve/kernels.json
    pins: tuple[str, ...] = ()  # "op=variant" forced choices, e.g. "decode_attention=torch_ref"


CONTROLLERS = ("batching", "prewarm")  # controllers the engine can run (adapt/factory.py)


@dataclass
class ControlConfig:
    controllers: tuple[str, ...] = ()  # adaptive controllers to run between steps: batching, prewarm
    tpot_slo_s: float = 0.1  # time-per-output-token objective the controllers keep
    ttft_slo_s: float = 2.0  # time-to-first-token objective the controllers keep
    control_interval_s: float = 0.25  # seconds between two decision rounds
    telemetry_window_s: float = 10.0  # telemetry window the controllers read


# drafters to speculate with (spec/); auto = all of them (the draft model only when one is given)
SPEC_METHODS = ("off", "ngram", "layers", "draft", "auto")


@dataclass
class SpeculativeConfig:
    spec_method: str = "off"  # off | ngram (prompt lookup) | layers (target's first layers) | draft | auto
    num_speculative_tokens: int = 4  # most tokens drafted per sequence and step (k)
    prompt_lookup_min: int = 1  # shortest suffix n-gram the lookup tries
    prompt_lookup_max: int = 4  # longest suffix n-gram the lookup tries (longest match wins)
    spec_adaptive: bool = True  # pick k (0 = off) each step from acceptance and measured step cost
    draft_layers: tuple[
        int, ...
    ] = ()  # layers/auto: depths of the layer drafts; () = 1/2 and 3/4 of the model
    draft_model: str | None = None  # draft/auto: a draft model with the target's tokenizer (a model spec)

    @property
    def uses_draft_model(self) -> bool:
        """Whether a separate draft model drafts: method draft, or auto with a draft model given."""
        return self.spec_method == "draft" or (self.spec_method == "auto" and self.draft_model is not None)


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        c, s, m, p, k = self.cache, self.scheduler, self.model, self.precision, self.kernels
        ctl, spec = self.control, self.speculative
        _require(
            spec.spec_method in SPEC_METHODS,
            "speculative.spec_method",
            spec.spec_method,
            ", ".join(SPEC_METHODS),
        )
        _require(
            isinstance(spec.num_speculative_tokens, int) and 1 <= spec.num_speculative_tokens <= 16,
            "speculative.num_speculative_tokens",
            spec.num_speculative_tokens,
            "an integer in [1, 16]",
        )
        _require(
            1 <= spec.prompt_lookup_min <= spec.prompt_lookup_max <= 16,
            "speculative.prompt_lookup_min/prompt_lookup_max",
            (spec.prompt_lookup_min, spec.prompt_lookup_max),
            "1 <= prompt_lookup_min <= prompt_lookup_max <= 16",
        )
        spec.draft_layers = (
            (spec.draft_layers,) if isinstance(spec.draft_layers, int) else tuple(spec.draft_layers)
        )
        _require(
            all(isinstance(d, int) and d >= 1 for d in spec.draft_layers),
            "speculative.draft_layers",
            spec.draft_layers,
            "integers >= 1 (fewer than the model's layers)",
        )
        _validate_draft_model(spec, c)
        ctl.controllers = tuple(ctl.controllers)
        for name in ctl.controllers:
            _require(name in CONTROLLERS, "control.controllers", name, ", ".join(CONTROLLERS))
        _require(ctl.tpot_slo_s > 0, "control.tpot_slo_s", ctl.tpot_slo_s, "> 0 seconds")
        _require(ctl.ttft_slo_s > 0, "control.ttft_slo_s", ctl.ttft_slo_s, "> 0 seconds")
        _require(
            ctl.control_interval_s >= 0, "control.control_interval_s", ctl.control_interval_s, ">= 0 seconds"
        )
        _require(
            ctl.telemetry_window_s > 0, "control.telemetry_window_s", ctl.telemetry_window_s, "> 0 seconds"
        )
        k.pins = tuple(k.pins)
        _require(
            k.attention_backend in ATTENTION_BACKENDS,
            "kernels.attention_backend",
            k.attention_backend,
            ", ".join(ATTENTION_BACKENDS),
        )
        _require(k.autotune in AUTOTUNE_MODES, "kernels.autotune", k.autotune, ", ".join(AUTOTUNE_MODES))
        _require(
            k.cuda_graph_max_batch is None or k.cuda_graph_max_batch >= 1,
            "kernels.cuda_graph_max_batch",
            k.cuda_graph_max_batch,
            ">= 1",
        )
        _require(1 <= k.cuda_graph_pieces <= 64, "kernels.cuda_graph_pieces", k.cuda_graph_pieces, "1..64")
        _require(
            k.cuda_graph_prompt_tokens >= 0,
            "kernels.cuda_graph_prompt_tokens",
            k.cuda_graph_prompt_tokens,
            ">= 0",
        )
        for pin in k.pins:
            _require(pin.count("=") == 1, "kernels.pins", pin, "entries of the form op=variant")
        p.weight_formats = tuple(p.weight_formats)
        for name in p.weight_formats:
            _require(name in WEIGHT_FORMATS, "precision.weight_formats", name, "bf16, fp8 or int4")
        _require(
            p.precision_policy in ("native", "adaptive", *WEIGHT_FORMATS),
            "precision.precision_policy",
            p.precision_policy,
            "native, bf16, fp8, int4 or adaptive",
        )
        _require(
            p.int4_group_size in (32, 64, 128, 256),
            "precision.int4_group_size",
            p.int4_group_size,
            "32, 64, 128 or 256",
        )
        _require(0 < p.quality_budget <= 1, "precision.quality_budget", p.quality_budget, "(0, 1]")
        _require(0 <= p.shadow_rate <= 1, "precision.shadow_rate", p.shadow_rate, "[0, 1]")
        _require(
            c.block_size in (8, 16, 32, 64, 128), "cache.block_size", c.block_size, "8, 16, 32, 64 or 128"
        )
        _require(
            0 < c.gpu_memory_utilization <= 1,
            "cache.gpu_memory_utilization",
            c.gpu_memory_utilization,
            "(0, 1]",
        )
        _require(c.num_blocks is None or c.num_blocks >= 1, "cache.num_blocks", c.num_blocks, ">= 1")
        _require(
            c.kv_cache_memory_gib is None or c.kv_cache_memory_gib > 0,
            "cache.kv_cache_memory_gib",
            c.kv_cache_memory_gib,
            "> 0",
        )
        _validate_kv_compression(c)
        _require(s.max_num_seqs >= 1, "scheduler.max_num_seqs", s.max_num_seqs, ">= 1")
        _require(
            s.max_num_batched_tokens >= 1,
            "scheduler.max_num_batched_tokens",
            s.max_num_batched_tokens,
            ">= 1",
        )
        _require(
            s.long_prefill_token_threshold >= 0,
            "scheduler.long_prefill_token_threshold",
            s.long_prefill_token_threshold,
            ">= 0",
        )
        _require(0 <= s.batch_wait_s <= 10, "scheduler.batch_wait_s", s.batch_wait_s, "[0, 10] seconds")
        _require(s.policy in ("fcfs", "priority"), "scheduler.policy", s.policy, "'fcfs' or 'priority'")
        _require(
            s.async_scheduling in (None, True, False),
            "scheduler.async_scheduling",
            s.async_scheduling,
            "true, false or null (on for CUDA)",
        )
        _require(
            m.dtype in ("auto", "float32", "bfloat16", "float16"),
            "model.dtype",
            m.dtype,
            "auto, float32, bfloat16 or float16",
        )
        _require(
            m.max_model_len is None or m.max_model_len >= 1, "model.max_model_len", m.max_model_len, ">= 1"
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineConfig:
        """Build from nested dicts, e.g. {"cache": {"block_size": 32}}; unknown keys raise ConfigError."""
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in data.items():
            if name not in sections:
                raise ConfigError(f"unknown config section {name!r}; known: {sorted(sections)}")
            section_cls = _SECTIONS[name]
            kwargs[name] = _section_from_dict(section_cls, name, value)
        return cls(**kwargs)

    @classmethod
    def from_flat(cls, **flat: Any) -> EngineConfig:
        """Build from flat keyword arguments (as `LLM(...)` takes them): each key belongs to one section."""
        owners = {
            f.name: section
            for section, section_cls in _SECTIONS.items()
            for f in dataclasses.fields(section_cls)
        }
        nested: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            if key not in owners:
                raise ConfigError(f"unknown engine option {key!r}; known: {sorted(owners)}")
            nested.setdefault(owners[key], {})[key] = value
        return cls.from_dict(nested)


def _validate_draft_model(spec: SpeculativeConfig, c: CacheConfig) -> None:
    _require(
        spec.spec_method != "draft" or spec.draft_model is not None,
        "speculative.draft_model",
        spec.draft_model,
        "a model spec (.gguf file, Hugging Face folder or preset name) when spec_method is 'draft'",
    )
    _require(
        spec.draft_model is None or spec.spec_method in ("draft", "auto"),
        "speculative.draft_model",
        spec.draft_model,
        f"None unless spec_method is 'draft' or 'auto' (it is {spec.spec_method!r})",
    )
    # the draft's KV cache mirrors the target's block ids; compressed KV moves blocks between chunks
    _require(
        not (spec.uses_draft_model and c.compressed),
        "speculative.draft_model",
        spec.draft_model,
        "None with compressed KV (cache.kv_format other than bf16 or cache.kv_policy 'adaptive')",
    )


def _validate_kv_compression(c: CacheConfig) -> None:
    formats = ("bf16", "fp8", "int8", "int4k", "int4")  # engine/kv_cache/formats.py's KV_FORMATS
    _require(c.kv_format in formats, "cache.kv_format", c.kv_format, "bf16, fp8, int8, int4k or int4")
    _require(c.kv_policy in ("static", "adaptive"), "cache.kv_policy", c.kv_policy, "'static' or 'adaptive'")
    ladder = tuple(c.kv_ladder)
    _require(
        len(ladder) >= 2
        and ladder[0] == "bf16"
        and all(f in formats for f in ladder)
        and list(ladder) == sorted(set(ladder), key=formats.index),
        "cache.kv_ladder",
        ladder,
        "bf16 first, then lower formats among fp8, int8, int4k, int4, each once, high to low",
    )
    _require(
        c.kv_int4_group_size in (16, 32, 64, 128),
        "cache.kv_int4_group_size",
        c.kv_int4_group_size,
        "16, 32, 64 or 128 (and a divisor of the head size)",
    )
    _require(1 <= c.kv_chunk_blocks <= 256, "cache.kv_chunk_blocks", c.kv_chunk_blocks, "[1, 256]")
    _require(c.kv_requantize_blocks >= 0, "cache.kv_requantize_blocks", c.kv_requantize_blocks, ">= 0")
    _require(c.kv_keep_recent_blocks >= 1, "cache.kv_keep_recent_blocks", c.kv_keep_recent_blocks, ">= 1")
    _require(
        c.kv_hot_window is None or (0 <= c.kv_hot_window <= 64 and (c.kv_hot_window == 0 or c.compressed)),
        "cache.kv_hot_window",
        c.kv_hot_window,
        "None (the default) or [0, 64] blocks, and 0 unless the cache is compressed (kv_format other "
        "than bf16 or kv_policy 'adaptive')",
    )
    _require(0 < c.kv_error_budget <= 1, "cache.kv_error_budget", c.kv_error_budget, "(0, 1]")
    _require(0 <= c.kv_monitor_rate <= 1, "cache.kv_monitor_rate", c.kv_monitor_rate, "[0, 1]")


_SECTIONS = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "precision": PrecisionConfig,
    "kernels": KernelConfig,
    "control": ControlConfig,
    "speculative": SpeculativeConfig,
}


def _section_from_dict(section_cls: type, section: str, data: dict[str, Any]) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(section_cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} in config section {section!r}; known: {sorted(known)}"
        )
    return section_cls(**data)


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is out of range; allowed: {allowed}")
