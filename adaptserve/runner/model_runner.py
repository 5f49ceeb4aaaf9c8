"""Single-process executor: owns the model, the physical KV cache and the sampler."""

from __future__ import annotations

import torch

from adaptserve.config import EngineConfig
from adaptserve.engine.outputs import RunnerOutput, ScheduledSequence, SchedulerOutput
from adaptserve.kernels.attention.registry import get_backend
from adaptserve.model.config import ModelArchConfig
from adaptserve.model.llama import LlamaForCausalLM
from adaptserve.model.loaders import LoadedCheckpoint
from adaptserve.model.projection import quantize_model
from adaptserve.runner.device import resolve_device, resolve_dtype
from adaptserve.runner.inputs import prepare_inputs
from adaptserve.runner.memory import num_kv_blocks
from adaptserve.runner.precision import StepPrecision
from adaptserve.runner.sampler import Sampler, SamplingMetadata


class ModelRunner:
    """execute(SchedulerOutput) -> RunnerOutput, on CPU or one GPU."""

    def __init__(
        self,
        config: EngineConfig,
        checkpoint: LoadedCheckpoint,
        max_model_len: int,
        eos_token_ids: frozenset[int] = frozenset(),
        attention_backend: str = "torch_ref",
    ):
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.arch: ModelArchConfig = checkpoint.arch
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.block_size = config.cache.block_size
        self.model = build_model(checkpoint, max_model_len, self.device, self.dtype, config.model.seed)
        formats = config.precision.formats_needed()
        # bytes held per weight format over the projections (the extra formats cost memory)
        self.format_bytes = quantize_model(self.model, formats, config.precision.int4_group_size)
        self.precision = StepPrecision(config.precision, formats)
        self.backend = get_backend(attention_backend)
        self.num_blocks = num_kv_blocks(config.cache, self.arch, self.dtype, self.device)
        self.kv_caches = self._allocate_kv_caches()
        self.sampler = Sampler()
        self._generators: dict[str, torch.Generator] = {}  # per seeded request

    def _allocate_kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (self.num_blocks, self.block_size, self.arch.num_kv_heads, self.arch.head_dim)
        return [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(self.arch.num_layers)
        ]

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        for request_id in scheduler_output.finished_request_ids:
            self._generators.pop(request_id, None)
        if scheduler_output.is_empty:
            return RunnerOutput([], [], [])
        inputs = prepare_inputs(scheduler_output.sequences, self.block_size, self.device)
        precision, shadow = self.precision.choose(not inputs.attn.prefills)

        def logits_in(step_precision: str) -> torch.Tensor:
            hidden = self.model(
                inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn, self.backend, step_precision
            )  # [T, H]
            return self.model.compute_logits(hidden[inputs.sample_rows])  # [N, V] float32

        shadow_logits = None if shadow is None else logits_in(shadow)  # first: the served run's KV stays
        logits = logits_in(precision)
        if not inputs.sampled_sequences:
            return RunnerOutput([], [], [])
        self.precision.observe(logits, precision, shadow_logits)
        seqs = inputs.sampled_sequences
        metadata = SamplingMetadata(
            params=[s.sampling_params for s in seqs],
            prompt_token_ids=[s.prompt_token_ids for s in seqs],
            output_token_ids=[s.output_token_ids for s in seqs],
            generators=[self._generator(s.request_id, s.sampling_params.seed) for s in seqs],
            blocked_token_ids=[self._blocked_token_ids(s) for s in seqs],
        )
        sampled = self.sampler(logits, metadata)
        return RunnerOutput([s.request_id for s in seqs], sampled.token_ids, sampled.logprobs)

    def _blocked_token_ids(self, seq: ScheduledSequence) -> list[int]:
        """Stop token ids (EOS unless ignored) may not be sampled before min_tokens, as in vLLM."""
        params = seq.sampling_params
        if len(seq.output_token_ids) >= params.min_tokens:
            return []
        eos = [] if params.ignore_eos else sorted(self.eos_token_ids)
        return eos + [t for t in params.stop_token_ids if t not in self.eos_token_ids]

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        generator = self._generators.get(request_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))  # numpy ints too
            self._generators[request_id] = generator
        return generator


def build_model(
    checkpoint: LoadedCheckpoint, max_model_len: int, device: torch.device, dtype: torch.dtype, seed: int
) -> LlamaForCausalLM:
    """Build on the meta device, then allocate once on the target device in the target dtype."""
    with torch.device("meta"):
        model = LlamaForCausalLM(checkpoint.arch, max_model_len)
    model = model.to(dtype).to_empty(device=device)
    model.rebuild_rope(max_model_len, device)
    if checkpoint.state_dict is None:
        model.init_random(seed)
    else:
        model.load_hf_state_dict(checkpoint.state_dict)
    return model.eval()
