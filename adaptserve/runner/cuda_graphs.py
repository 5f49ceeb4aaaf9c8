"""CUDA graphs of the decode forward pass, one per (batch size bucket, split count, precision, variant).

A decode step of a big model is hundreds of small kernels; launched from Python they cost more than
the GPU work at small batches. A graph replays them with one launch. Graphs read static input buffers
that `run` refills each step: the batch is padded up to its bucket with rows whose context length is 0
(they attend to nothing) and whose K/V goes to a scratch slot outside the allocator's blocks.

Graphs are captured at start for every bucket and on demand for new keys; a kernel swap in the
registry drops the graphs that captured the old variant (they are re-captured on next use). A
compressed KV cache's attention runs its own kernels: the pool then asks its FixedKernelChoice. The
prewarmer (adapt/prewarm.py) may also `capture` sizes ahead of need and `release` sizes nobody uses;
`last_used` tells when each size was last replayed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from adaptserve.config import EngineConfig
from adaptserve.kernels.attention.dispatch import TunedAttention
from adaptserve.kernels.attention.metadata import AttentionMetadata
from adaptserve.kernels.registry import (
    DECODE_ATTENTION,
    FixedKernelChoice,
    KernelRegistry,
    KernelVariant,
    ShapeBucket,
    SwapEvent,
)
from adaptserve.runner.inputs import HostBatch
from adaptserve.runner.memory import max_sampled_rows
from adaptserve.runner.staging import PinnedStaging


def batch_buckets(max_batch: int) -> list[int]:
    """1 to 8, 12, then steps of 8 to 64, of 16 to 128, of 32 to 256, of 64 beyond; up to max_batch.

    Every size to 8: a verify step at batch 1 has k + 1 rows, and padding 5 rows to 8 costs the
    float32 projections about a fifth more (gemv-smollm2-float32-h100.json)."""
    sizes = [1, 2, 3, 4, 5, 6, 7, 8, 12]
    step_for = ((64, 8), (128, 16), (256, 32), (1 << 30, 64))
    size = 16
    while size < max_batch:
        sizes.append(size)
        size += next(step for limit, step in step_for if size < limit)
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


def layer_pieces(num_layers: int, num_pieces: int) -> list[tuple[int, int]]:
    """Layer ranges [start, end) of `num_pieces` graphs (at most one per layer), as even as can be,
    the longer ones first."""
    pieces = max(1, min(num_pieces, num_layers))
    size, extra = divmod(num_layers, pieces)
    bounds = [0]
    for i in range(pieces):
        bounds.append(bounds[-1] + size + (i < extra))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@dataclass
class _Graph:
    pieces: list[torch.cuda.CUDAGraph]  # one per group of layers, replayed in order
    hidden: torch.Tensor  # [size, hidden] the last piece's output
    variant: str
    # the tensors one piece hands the next (hidden, residual, rotary context): kept alive, since the
    # next piece's kernels read them at the addresses they had at capture
    handoffs: list = field(default_factory=list)

    def replay(self) -> None:
        for piece in self.pieces:
            piece.replay()

    def reset(self) -> None:
        for piece in self.pieces:
            piece.reset()


class DecodeGraphPool:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attention: TunedAttention,
        registry: KernelRegistry | FixedKernelChoice,
        max_batch: int,
        max_blocks: int,
        pad_slot: int,
        device: torch.device,
        clock: Callable[[], float] = time.monotonic,
        num_pieces: int = 1,
    ):
        """`clock`: the time source of `last_used` (the engine's clock). `num_pieces`: graphs per
        step, each over a group of layers (kernels.cuda_graph_pieces)."""
        self.model, self.kv_caches, self.attention, self.registry = model, kv_caches, attention, registry
        self.sizes = batch_buckets(max_batch)
        self.max_batch, self.max_blocks, self.pad_slot = self.sizes[-1], max_blocks, pad_slot
        self.device = device
        self.pieces = layer_pieces(len(model.layers), num_pieces)  # [(first layer, end)] per graph
        batch = self.max_batch
        # the static inputs, as views of one buffer per dtype so a step sends each in one copy
        longs = torch.zeros(3 * batch, dtype=torch.int64, device=device)  # [3B]
        self.input_ids, self.positions, self.slot_mapping = longs.view(3, batch)  # each [B]
        self.slot_mapping.fill_(pad_slot)
        ints = torch.zeros(batch * (1 + max_blocks), dtype=torch.int32, device=device)  # [B + B * MB]
        self.context_lens = ints[:batch]  # [B]
        self.block_table = ints[batch:].view(batch, max_blocks)  # [B, MB]
        self._long_staging, self._int_staging = PinnedStaging(longs), PinnedStaging(ints)
        self.query_start_loc = torch.arange(self.max_batch + 1, dtype=torch.int32, device=device)  # [B + 1]
        self.graphs: dict[tuple, _Graph] = {}
        self.num_captures = 0
        self.capture_seconds = 0.0
        self.clock = clock
        self.last_used: dict[int, float] = {}  # batch bucket -> clock at its last replay
        registry.on_swap(self._forget_swapped)

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest captured size that holds num_seqs, or None when the batch is too big."""
        for size in self.sizes:
            if size >= num_seqs:
                return size
        return None

    def can_replay(self, batch: HostBatch) -> bool:
        """A decode-only batch that fits a bucket, whose chosen variant may be captured."""
        size = self.bucket(len(batch.sequences))
        return (
            batch.is_decode_only
            and size is not None
            and batch.block_table.shape[1] <= self.max_blocks
            and self._variant(size, int(batch.context_lens.max())).graph_safe
        )

    def capture_all(self, precision: str, context_len: int) -> None:
        """Capture every batch bucket for contexts around `context_len` (at start)."""
        for size in reversed(self.sizes):
            if self._variant(size, context_len).graph_safe:
                self._graph(size, precision, context_len)

    def captured_sizes(self) -> list[int]:
        """The batch buckets that hold at least one graph, ascending."""
        return sorted({key[0] for key in self.graphs})

    def capture(self, sizes: Iterable[int], precision: str, context_len: int) -> list[int]:
        """Capture these batch buckets for contexts around `context_len` ahead of need (a size that
        already has its graph costs nothing); returns the sizes that now hold one."""
        done = []
        for size in sizes:
            if size not in self.sizes:
                raise ValueError(f"batch size {size} is not a graph bucket; buckets: {self.sizes}")
            if self._variant(size, context_len).graph_safe:
                self._graph(size, precision, context_len)
                done.append(size)
        return done

    def release(self, sizes: Iterable[int]) -> None:
        """Drop every graph of these batch buckets and its memory; the next replay of such a size
        captures it again on demand."""
        drop = set(sizes)
        if not any(key[0] in drop for key in self.graphs):
            return
        torch.cuda.synchronize(self.device)  # a launched step may still be replaying one of them
        for key in [k for k in self.graphs if k[0] in drop]:
            self.graphs.pop(key).reset()
        for size in drop:
            self.last_used.pop(size, None)

    def run(
        self,
        batch: HostBatch,
        precision: str,
        pending: tuple[torch.Tensor, torch.Tensor] | None = None,
        capture: bool = True,
    ) -> torch.Tensor:
        """Replay the graph for this decode-only batch -> hidden states [N, hidden]. `pending`:
        (rows [P], ids [P]) on the device, input ids that only the device knows yet. `capture`
        False: replay a graph of this size captured for longer contexts (every size has one from
        start) rather than capture one for this context bucket; for shapes that come and go, such
        as verify steps, whose one-off capture would cost tens of steps."""
        num_seqs = len(batch.sequences)
        size = self.bucket(num_seqs)
        width = batch.block_table.shape[1]
        if width > self.max_blocks:
            raise ValueError(f"block table of {width} blocks exceeds the graph pool's {self.max_blocks}")
        context_len = int(batch.context_lens.max())
        graph = None if capture else self._longer_context_graph(size, precision, context_len)
        graph = graph or self._graph(size, precision, context_len)
        self.last_used[size] = self.clock()
        self._fill(batch, num_seqs, size, width)
        if pending is not None:
            self.input_ids.index_copy_(0, *pending)
        graph.replay()
        return graph.hidden[:num_seqs]

    def _fill(self, batch: HostBatch, num_seqs: int, size: int, width: int) -> None:
        """Copy this step's inputs into the static buffers, one copy per dtype; every other row,
        padded or past the bucket, reads token 0 at position 0, attends to nothing and writes to the
        scratch slot. Block-table columns past `width` keep stale ids that no kernel reads (they lie
        past every row's context)."""
        max_batch = self.max_batch
        longs = self._long_staging.host().reshape(3, max_batch)  # [3, B]
        longs[0, :num_seqs] = batch.input_ids
        longs[1, :num_seqs] = batch.positions
        longs[2, :num_seqs] = batch.slot_mapping
        # every row past the batch, not only the bucket's: the whole mirror is sent, and a row whose
        # token was pending holds PENDING_TOKEN_ID (-1) in it (the device got the real id by
        # index_copy). A padded row, or the warm-up of a larger graph's capture, that read it looked
        # up embedding row -1: a device-side assert
        longs[:2, num_seqs:] = 0
        longs[2, num_seqs:] = self.pad_slot
        self._long_staging.send(3 * max_batch)
        ints = self._int_staging.host()  # [B + B * MB]
        ints[:num_seqs] = batch.context_lens
        ints[num_seqs:max_batch] = 0
        table = ints[max_batch:].reshape(max_batch, self.max_blocks)  # [B, MB]
        table[:num_seqs, :width] = batch.block_table
        self._int_staging.send(max_batch + size * self.max_blocks)

    def _bucket(self, size: int, context_len: int) -> ShapeBucket:
        return ShapeBucket.of(DECODE_ATTENTION, size, context_len, *self.attention.layout)

    def _variant(self, size: int, context_len: int) -> KernelVariant:
        return self.registry.choose(self._bucket(size, context_len))

    def _graph(self, size: int, precision: str, context_len: int) -> _Graph:
        bucket = self._bucket(size, context_len)
        variant = self.registry.choose(bucket)
        key = (size, bucket.context, precision, variant.name)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(size, bucket.context, precision, variant)
        return graph

    def _longer_context_graph(self, size: int, precision: str, context_len: int) -> _Graph | None:
        """A captured graph of this size and precision whose context bucket holds `context_len`: the
        exact bucket's, else the smallest longer one. Its kernels read the real context lengths; the
        longer bucket only sized their split count."""
        context = self._bucket(size, context_len).context
        fits = [key for key in self.graphs if key[0] == size and key[2] == precision and key[1] >= context]
        return self.graphs[min(fits, key=lambda key: key[1])] if fits else None

    def _metadata(self, size: int, context_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            num_decode_tokens=size,
            block_table=self.block_table[:size],
            context_lens=self.context_lens[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            max_query_len=1,
            max_context_len=context_len,  # sizes the split count; the kernels read the real lengths
        )

    @torch.inference_mode()
    def _capture(self, size: int, context_len: int, precision: str, variant: KernelVariant) -> _Graph:
        start = time.perf_counter()
        meta = self._metadata(size, context_len)
        # the warm-up runs eagerly on the buffers: every input it reads is set here (token 0 at
        # position 0 into the scratch slot, with a real length), so it never depends on what earlier
        # steps left (a stale slot would overwrite a live sequence's KV); replays overwrite them all
        self.input_ids[:size].zero_()
        self.positions[:size].zero_()
        self.slot_mapping[:size].fill_(self.pad_slot)
        self.context_lens[:size].fill_(1)

        model, last = self.model, len(self.pieces) - 1

        def forward_piece(i: int, state: tuple):
            """Piece i of the forward pass: (x, residual, rope) in, and out, or hidden [size, hidden]."""
            start, end = self.pieces[i]
            if i == 0:
                self.attention.begin_step(meta, decode=variant)
                x, rope = model.embed(self.input_ids[:size], self.positions[:size])
                residual = None
            else:
                x, residual, rope = state
            x, residual = model.run_layers(
                x, residual, rope, self.kv_caches, meta, self.attention, precision, start, end
            )
            return model.final_norm(x, residual) if i == last else (x, residual, rope)

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: compiles kernels, settles lazy state outside capture
            state = ()
            for i in range(len(self.pieces)):
                state = forward_piece(i, state)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        pieces, handoffs, state = [], [], ()
        # thread_local: the server builds the engine off the event-loop thread, whose own CUDA calls
        # must not invalidate the capture. Each graph keeps its own memory pool: a shared pool hit an
        # allocator assertion (use_count > 0) when captures ran on the server's loader thread.
        for i in range(len(self.pieces)):
            piece = torch.cuda.CUDAGraph()
            with torch.cuda.graph(piece, capture_error_mode="thread_local"):
                state = forward_piece(i, state)  # the last piece: hidden [size, hidden]
            pieces.append(piece)
            if i < last:
                handoffs.append(state)
        torch.cuda.synchronize(self.device)
        self.num_captures += 1
        self.capture_seconds += time.perf_counter() - start
        return _Graph(pieces, state, variant.name, handoffs)

    def _forget_swapped(self, event: SwapEvent) -> None:
        if event.op == DECODE_ATTENTION:
            self.graphs = {k: g for k, g in self.graphs.items() if g.variant != event.old}


MAX_DEFAULT_GRAPH_ROWS = 512  # verify steps past this run eagerly (speculation is off there anyway)


def graph_captures(runner) -> int:
    """CUDA graphs an executor's pool has captured so far (0 without a pool: CPU, simulator)."""
    graphs = getattr(runner, "graphs", None)
    return graphs.num_captures if graphs is not None else 0


def graph_rows_default(config: EngineConfig) -> int:
    """The largest decode batch captured when kernels.cuda_graph_max_batch is unset: max_num_seqs,
    or with speculation the k + 1 rows per sequence a verify step runs as decode rows (up to 512),
    so verify steps replay graphs instead of launching every kernel from Python."""
    rows = max_sampled_rows(config)
    return max(config.scheduler.max_num_seqs, min(rows, MAX_DEFAULT_GRAPH_ROWS))
