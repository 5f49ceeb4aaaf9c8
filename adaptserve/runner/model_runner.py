"""Single-process executor: owns the model, the physical KV cache and the sampler."""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import torch

from adaptserve.config import EngineConfig
from adaptserve.engine.outputs import RunnerOutput, ScheduledSequence, SchedulerOutput
from adaptserve.kernels.attention.dispatch import TunedAttention
from adaptserve.kernels.attention.metadata import AttentionMetadata
from adaptserve.kernels.attention.variants import build_registry
from adaptserve.kernels.autotune import Autotuner
from adaptserve.kernels.availability import triton_available
from adaptserve.kernels.choice_cache import ChoiceCache
from adaptserve.kernels.registry import OPS
from adaptserve.model.build import build_model
from adaptserve.model.config import ModelArchConfig
from adaptserve.model.loaders import LoadedCheckpoint
from adaptserve.model.projection import quantize_model
from adaptserve.runner.cuda_graphs import DecodeGraphPool, graph_rows_default
from adaptserve.runner.device import resolve_device, resolve_dtype
from adaptserve.runner.inputs import (
    HostBatch,
    ModelInputs,
    build_host_batch,
    host_tensor,
    order_for_batch,
    prompt_chunks_as_decode_rows,
    to_device,
    verify_as_decode_rows,
)
from adaptserve.runner.kv_compression import CompressedKVCache, KVGeometry, compressed_attention
from adaptserve.runner.launched_step import LaunchedStep
from adaptserve.runner.memory import allocate_paged_kv, num_kv_blocks, profile_activation_bytes
from adaptserve.runner.precision import StepPrecision
from adaptserve.runner.sampler import Sampler, SamplingMetadata
from adaptserve.spec.draft_model import DRAFTER_NAME, DraftModelDrafter, load_draft_checkpoint
from adaptserve.spec.layer_drafter import LayerDrafter
from adaptserve.spec.verify import verify_drafts

logger = logging.getLogger(__name__)
DEFAULT_KERNEL_CACHE = "~/.cache/adaptserve/kernels.json"


class ModelRunner:
    """execute(SchedulerOutput) -> RunnerOutput, on CPU or one GPU."""

    def __init__(
        self,
        config: EngineConfig,
        checkpoint: LoadedCheckpoint,
        max_model_len: int,
        eos_token_ids: frozenset[int] = frozenset(),
    ):
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.arch: ModelArchConfig = checkpoint.arch
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.block_size = config.cache.block_size
        self.max_model_len = max_model_len
        self.startup_seconds: dict[str, float] = {}  # phase -> seconds (bench startup reports them)
        with self._phase("weights"):
            self.model = build_model(checkpoint, max_model_len, self.device, self.dtype, config.model.seed)
            formats = config.precision.formats_needed()
            # bytes held per weight format over the projections (the extra formats cost memory)
            self.format_bytes = quantize_model(
                self.model, formats, config.precision.int4_group_size, config.precision.quantize_lm_head
            )
        self.precision = StepPrecision(config.precision, formats)
        self.registry, self.attention = self._build_attention(config.kernels)
        with self._phase("draft_model"):  # before the KV cache is sized: the draft's weights take memory
            self.draft_model_drafter = self._build_draft_model_drafter(config, checkpoint)
        with self._phase("memory_profile"):
            activation_bytes = profile_activation_bytes(self) if self.device.type == "cuda" else 0
        with self._phase("kv_cache"):
            draft_kv_bytes = self.draft_model_drafter.kv_bytes_per_token() if self.draft_model_drafter else 0
            self.num_blocks = num_kv_blocks(
                config.cache, self.arch, self.dtype, self.device, activation_bytes, draft_kv_bytes
            )
            self.compressed_kv = self._build_compressed_kv(config.cache)
            if self.compressed_kv is None:
                # the last block is the padded rows' slot
                self.kv_caches = self._allocate_kv_caches(self.num_blocks + 1)
            if self.draft_model_drafter is not None:
                self.draft_model_drafter.allocate_kv_caches(self.num_blocks + 1)
        self.pad_slot = self.num_blocks * self.block_size
        # a compressed cache runs its own attention kernels (no autotuning); its decodes replay graphs
        self.graphs = self._build_graph_pool(config)
        self.autotuner = self._build_autotuner(config.kernels) if self.compressed_kv is None else None
        self.sampler = Sampler()
        self.layer_drafter = self._build_layer_drafter(config.speculative)
        # with speculation, verify and plain steps alternate at batch sizes that come and go with the
        # policy's choices: they replay what is captured (a capture on demand costs tens of steps; on
        # the H100 they made adaptive passes at batch 32 slower than every fixed setting)
        self._capture_graphs_on_demand = config.speculative.spec_method == "off"
        self.graph_prompt_tokens = config.kernels.cuda_graph_prompt_tokens
        self._generators: dict[str, torch.Generator] = {}  # per seeded request
        # the last step's sampled ids [N] on the device and each request's row in them
        self._last_sampled: tuple[torch.Tensor | None, dict[str, int]] = (None, {})

    def _build_compressed_kv(self, cache) -> CompressedKVCache | None:
        """Chunked KV memory of several formats (cache.kv_format / kv_policy), or None for plain bf16."""
        if not cache.compressed:
            return None
        geometry = KVGeometry.plan(cache, self.arch, self.dtype, self.num_blocks)
        compressed = CompressedKVCache(geometry, self.arch.num_layers, self.device)
        self.num_blocks = geometry.num_block_ids
        self.kv_caches = compressed.layer_caches()
        self.attention = compressed_attention(cache, self.arch, compressed)
        return compressed

    def _build_layer_drafter(self, spec) -> LayerDrafter | None:
        if spec.spec_method not in ("layers", "auto"):
            return None
        return LayerDrafter(self.model, self.kv_caches, self.attention, self.block_size, self.device)

    def _build_draft_model_drafter(
        self, config: EngineConfig, target: LoadedCheckpoint
    ) -> DraftModelDrafter | None:
        """The separate draft model (speculative.draft_model) on the target's device, in its dtype."""
        if not config.speculative.uses_draft_model:
            return None
        draft = load_draft_checkpoint(config.speculative.draft_model, target)
        model = build_model(draft, self.max_model_len, self.device, self.dtype, config.model.seed)
        arch = draft.arch
        attention = TunedAttention(
            self.registry, arch.num_heads, arch.num_kv_heads, arch.head_dim, self.attention.fused_rope
        )
        max_tokens = config.scheduler.max_num_batched_tokens
        return DraftModelDrafter(model, attention, self.block_size, self.device, max_tokens)

    def _build_attention(self, kernels) -> tuple:
        backend = kernels.attention_backend
        use_triton = self.device.type == "cuda" and triton_available() and backend in ("auto", "triton")
        if backend == "triton" and not use_triton:
            raise ValueError("kernels.attention_backend='triton' needs CUDA and the triton package")
        families = ("torch_ref", "triton") if use_triton else ("torch_ref",)
        registry = build_registry(self.device, families + (("flex",) if backend == "flex" else ()))
        if backend in ("torch_ref", "flex"):
            for op in OPS:
                registry.pin(op, backend)
        for pin in kernels.pins:
            op, name = pin.split("=")
            registry.pin(op.strip(), name.strip())
        arch = self.arch
        attention = TunedAttention(registry, arch.num_heads, arch.num_kv_heads, arch.head_dim, use_triton)
        return registry, attention

    def _build_autotuner(self, kernels) -> Autotuner | None:
        if kernels.autotune == "off":
            return None
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        cache = ChoiceCache(kernels.kernel_cache or DEFAULT_KERNEL_CACHE, device_name)
        cache.load_into(self.registry)
        reference = {op: self.registry.get(op, "torch_ref") for op in OPS}
        return Autotuner(self.registry, reference, cache=cache, online=kernels.autotune == "online")

    def _tune_after(self, batch: HostBatch, meta: AttentionMetadata | None) -> None:
        """Hand this step's shapes to the autotuner and give it its slot (eager steps pass their
        metadata; graph steps build an unpadded one only when a bucket wants a sample)."""
        num_prefill_tokens = batch.num_tokens - batch.num_decodes
        for bucket in self.attention.buckets(
            batch.num_decodes, num_prefill_tokens, int(batch.context_lens.max())
        ):
            if bucket is None:
                continue
            self.autotuner.saw(bucket)
            if self.autotuner.wants(bucket):
                meta = meta or to_device(batch, self.device).attn
                k_cache, v_cache = self.kv_caches[0]
                self.autotuner.observe(bucket, meta, k_cache, v_cache, self.arch.num_heads)
        self.autotuner.run_slot()

    def _build_graph_pool(self, config: EngineConfig) -> DecodeGraphPool | None:
        if self.device.type != "cuda" or not config.kernels.cuda_graphs:
            return None
        registry = self.registry
        if self.compressed_kv is not None:
            if not self.attention.use_triton:  # the reference compressed attention is not graph-safe
                return None
            registry = self.attention.decode_kernel()
        max_batch = config.kernels.cuda_graph_max_batch or graph_rows_default(config)
        max_blocks = -(-self.max_model_len // self.block_size)
        return DecodeGraphPool(
            self.model,
            self.kv_caches,
            self.attention,
            registry,
            max_batch,
            max_blocks,
            self.pad_slot,
            self.device,
            num_pieces=config.kernels.cuda_graph_pieces,
        )

    def warm_up(self, context_len: int = 1024) -> None:
        """Capture the decode graphs (in the precision every step starts in) before serving."""
        if self.graphs is not None:
            precision = self.precision.peek()
            try:
                with self._phase("cuda_graphs"):
                    self.graphs.capture_all(precision, context_len)
            except RuntimeError:
                logger.exception("CUDA-graph capture failed; decode steps run eagerly")
                self.graphs = None

    @contextlib.contextmanager
    def _phase(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.startup_seconds[name] = time.perf_counter() - start

    def _allocate_kv_caches(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return allocate_paged_kv(self.arch, num_blocks, self.block_size, self.dtype, self.device)

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """Run one step and wait for its sampled tokens."""
        return self.launch(scheduler_output).result()

    @torch.inference_mode()
    def launch(self, scheduler_output: SchedulerOutput) -> LaunchedStep:
        """Run one step on the device and start copying its sampled tokens to the host; nothing here
        waits on the device unless a row asks for logprobs (the adaptive precision policy reads its
        confidence once the copy lands: runner/precision.py)."""
        for request_id in scheduler_output.finished_request_ids:
            self._generators.pop(request_id, None)
        if self.draft_model_drafter is not None:  # their draft KV is gone or will be overwritten
            self.draft_model_drafter.forget(
                scheduler_output.finished_request_ids + scheduler_output.preempted_request_ids
            )
        if self.compressed_kv is not None:
            self.compressed_kv.apply(scheduler_output.kv_chunk_formats, scheduler_output.kv_migrations)
        if scheduler_output.is_empty:
            return LaunchedStep.done(RunnerOutput([], [], []))
        ordered = order_for_batch(scheduler_output.sequences)
        draft_probs: dict[str, torch.Tensor] = {}
        if scheduler_output.draft_layers and self.layer_drafter is not None:
            ordered, draft_probs = self.layer_drafter.draft(
                ordered,
                scheduler_output.draft_layers,
                lambda s: self._generator(s.request_id, s.sampling_params.seed),
            )
        elif scheduler_output.drafter == DRAFTER_NAME and self.draft_model_drafter is not None:
            ordered, draft_probs = self.draft_model_drafter.draft(
                ordered, lambda s: self._generator(s.request_id, s.sampling_params.seed)
            )
        verifies_drafts = scheduler_output.num_draft_tokens > 0
        has_prompt = any(s.computes_prompt for s in ordered)
        batch = self._prompt_rows(ordered) if has_prompt else None  # drafts may ride along
        if batch is None:
            rows = verify_as_decode_rows(ordered) if verifies_drafts else None
            batch = build_host_batch(ordered if rows is None else rows, self.block_size)
        pending = self._pending_inputs(batch)
        precision, shadow = self.precision.choose(not has_prompt)
        inputs = None
        if self._can_replay(batch):
            # prompt rows come in many sizes: replay what is captured rather than capture each
            capture = self._capture_graphs_on_demand and not has_prompt
            logits_in = self._graph_logits(batch, pending, capture=capture)
        else:
            inputs = to_device(batch, self.device)
            if pending is not None:
                inputs.input_ids.index_copy_(0, *pending)
            logits_in = self._eager_logits(inputs)
        shadow_logits = None if shadow is None else logits_in(shadow)  # first: the served run's KV stays
        logits = logits_in(precision)
        if verifies_drafts:  # logits: k + 1 rows per drafting sequence, in `ordered`
            return LaunchedStep.done(self._verify(logits, [s for s in ordered if s.sample], draft_probs))
        seqs = [s for s in batch.sequences if s.sample]
        if not seqs:
            return LaunchedStep.done(RunnerOutput([], [], []))
        self.precision.observe(logits, precision, shadow_logits)
        metadata = self._sampling_metadata(seqs)
        request_ids = [s.request_id for s in seqs]
        if metadata.needs_logprobs:  # the logprobs are gathered on the host now
            sampled = self.sampler(logits, metadata)
            token_ids = torch.tensor(sampled.token_ids, device=self.device)  # [N]
            step = LaunchedStep.done(RunnerOutput(request_ids, sampled.token_ids, sampled.logprobs))
        else:
            token_ids = self.sampler.sample_ids(logits, metadata)  # [N] on the device
            step = LaunchedStep.copying(request_ids, token_ids)
        self._last_sampled = token_ids, {request_id: row for row, request_id in enumerate(request_ids)}
        if self.autotuner is not None:
            self._tune_after(batch, None if inputs is None else inputs.attn)
        return step

    def _verify(
        self, logits: torch.Tensor, seqs: list[ScheduledSequence], draft_probs: dict[str, torch.Tensor]
    ) -> RunnerOutput:
        """A step with drafts: `logits` [R, V] has k + 1 rows per sequence with k drafts. Drafting
        sequences are verified (spec/verify.py); the others are sampled as usual. Waits on the device."""
        counts = [s.num_draft_tokens + 1 for s in seqs]
        starts = np.cumsum([0, *counts[:-1]])
        drafting = [i for i, s in enumerate(seqs) if s.num_draft_tokens]
        plain = [i for i, s in enumerate(seqs) if not s.num_draft_tokens]
        accepted: list[list[int]] = [[] for _ in seqs]
        token_ids: list[int] = [0] * len(seqs)
        logprobs: list[dict[int, float] | None] = [None] * len(seqs)
        rows = [r for i in drafting for r in range(starts[i], starts[i] + counts[i])]
        verified = verify_drafts(
            logits if not plain else logits[torch.tensor(rows, device=logits.device)],  # [sum(k + 1), V]
            [s.token_ids[-s.num_draft_tokens :] for s in (seqs[i] for i in drafting)],
            [seqs[i].sampling_params for i in drafting],
            [self._generator(seqs[i].request_id, seqs[i].sampling_params.seed) for i in drafting],
            [draft_probs.get(seqs[i].request_id) for i in drafting],
        )
        for j, i in enumerate(drafting):
            accepted[i], token_ids[i] = verified.accepted_token_ids[j], verified.next_token_ids[j]
        if plain:
            sampled = self.sampler(
                logits[torch.tensor([int(starts[i]) for i in plain], device=logits.device)],  # [P, V]
                self._sampling_metadata([seqs[i] for i in plain]),
            )
            for j, i in enumerate(plain):
                token_ids[i], logprobs[i] = sampled.token_ids[j], sampled.logprobs[j]
        self._last_sampled = None, {}  # nothing is pending after a verify step: the host has every token
        return RunnerOutput([s.request_id for s in seqs], token_ids, logprobs, accepted)

    def _sampling_metadata(self, seqs: list[ScheduledSequence]) -> SamplingMetadata:
        """What the sampler needs for one row per sequence in `seqs`."""
        return SamplingMetadata(
            params=[s.sampling_params for s in seqs],
            prompt_token_ids=[s.prompt_token_ids for s in seqs],
            output_token_ids=[s.output_token_ids for s in seqs],
            generators=[self._generator(s.request_id, s.sampling_params.seed) for s in seqs],
            blocked_token_ids=[self._blocked_token_ids(s) for s in seqs],
        )

    def _pending_inputs(self, batch: HostBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows [P], ids [P]) on the device: the input tokens that the previous step sampled and
        the host has not read yet, taken from that step's sampled ids."""
        pending = [(i, s) for i, s in enumerate(batch.sequences) if s.num_pending_tokens]
        if not pending:
            return None
        if any(s.num_pending_tokens != 1 for _, s in pending):
            raise RuntimeError("a sequence waits for more than one token from the device")
        rows = np.fromiter((batch.query_start_loc[i + 1] - 1 for i, _ in pending), np.int64)  # [P]
        last_token_ids, last_rows = self._last_sampled
        request_ids = [s.request_id for _, s in pending]
        missing = [r for r in request_ids if r not in last_rows]
        if missing:
            raise RuntimeError(f"requests {missing} wait for tokens the previous step did not sample")
        source = np.fromiter((last_rows[r] for r in request_ids), np.int64, len(request_ids))  # [P]
        source_rows = host_tensor(source, self.device).to(self.device, non_blocking=True)
        ids = last_token_ids.index_select(0, source_rows)  # [P]
        return host_tensor(rows, self.device).to(self.device, non_blocking=True), ids

    def _prompt_rows(self, ordered: list[ScheduledSequence]) -> HostBatch | None:
        """A step with short prompt chunks as one decode batch of one-token rows, when a graph
        replays it (kernels.cuda_graph_prompt_tokens); else None (it runs eagerly as it is)."""
        if self.graphs is None or not self.graph_prompt_tokens:
            return None
        fresh = self.compressed_kv is None  # see prompt_chunks_as_decode_rows
        rows = prompt_chunks_as_decode_rows(ordered, self.graph_prompt_tokens, fresh_prompts=fresh)
        if rows is None or self.graphs.bucket(len(rows)) is None:
            return None
        batch = build_host_batch(rows, self.block_size)
        return batch if self._can_replay(batch) else None

    def _can_replay(self, batch: HostBatch) -> bool:
        return self.graphs is not None and self.graphs.can_replay(batch)

    def _graph_logits(
        self, batch: HostBatch, pending: tuple[torch.Tensor, torch.Tensor] | None, capture: bool = True
    ):
        # a decode step samples every row unless a sequence is mid-way through something else
        every_row = len(batch.sample_rows) == batch.num_tokens
        sample_rows = None if every_row else host_tensor(batch.sample_rows, self.device).to(self.device)

        def logits_in(step_precision: str) -> torch.Tensor:
            hidden = self.graphs.run(batch, step_precision, pending, capture)  # [N, H]
            rows = hidden if every_row else hidden[sample_rows]  # [N, H]
            return self.model.compute_logits(rows, step_precision)  # [N, V]

        return logits_in

    def _eager_logits(self, inputs: ModelInputs):
        self.attention.begin_step(inputs.attn)

        def logits_in(step_precision: str) -> torch.Tensor:
            hidden = self.model(
                inputs.input_ids,
                inputs.positions,
                self.kv_caches,
                inputs.attn,
                self.attention,
                step_precision,
            )  # [T, H]
            return self.model.compute_logits(hidden[inputs.sample_rows], step_precision)  # [N, V] float32

        return logits_in

    def _blocked_token_ids(self, seq: ScheduledSequence) -> list[int]:
        """Stop token ids (EOS unless ignored) may not be sampled before min_tokens, as in vLLM."""
        params = seq.sampling_params
        num_outputs = len(seq.output_token_ids) + seq.num_pending_tokens
        if num_outputs >= params.min_tokens:
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
