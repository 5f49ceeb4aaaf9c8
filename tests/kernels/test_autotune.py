"""The registry and the autotuner on the CPU, with variants built from the reference: a fast copy, a
deliberately slowed copy, a wrong one. Real launches, real timings (the slowed variant sleeps). The
background compile is driven by a fake compiler that the test releases or makes fail."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from adaptserve.kernels.attention.metadata import AttentionMetadata, PrefillSequence
from adaptserve.kernels.attention.triton_decode import paged_decode_attention
from adaptserve.kernels.attention.variants import reference_variants, triton_variants
from adaptserve.kernels.autotune import AutotuneConfig, Autotuner
from adaptserve.kernels.choice_cache import ChoiceCache
from adaptserve.kernels.live_sample import compile_ahead
from adaptserve.kernels.registry import (
    DECODE_ATTENTION,
    PREFILL_ATTENTION,
    KernelRegistry,
    KernelVariant,
    ShapeBucket,
)

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 16, 4


def _registry() -> tuple[KernelRegistry, dict[str, KernelVariant]]:
    registry = KernelRegistry()
    reference = {v.op: v for v in reference_variants()}
    for variant in reference.values():
        registry.register(variant)
    decode_ref = reference[DECODE_ATTENTION]

    def slowed(*args, delay=0.004):
        time.sleep(delay)
        decode_ref.run(*args)

    def wrong(q, k, v, k_cache, v_cache, meta, scale, out, resources=None):
        decode_ref.run(q, k, v, k_cache, v_cache, meta, scale, out)
        out[: meta.num_decode_tokens] += 1.0

    for family, run, params in (
        ("slowed", slowed, (("delay", 0.004),)),
        ("wrong", wrong, ()),
    ):
        registry.register(KernelVariant(DECODE_ATTENTION, family, run, params=params))
    return registry, reference


def _decode_meta(num_seqs: int, context_len: int, num_blocks: int) -> AttentionMetadata:
    blocks_per_seq = -(-context_len // BLOCK)
    table = torch.randperm(num_blocks)[: num_seqs * blocks_per_seq].view(num_seqs, blocks_per_seq)
    context_lens = torch.full((num_seqs,), context_len, dtype=torch.int32)
    last = context_len - 1
    slots = table[:, last // BLOCK].long() * BLOCK + last % BLOCK
    return AttentionMetadata(
        slot_mapping=slots,
        num_decode_tokens=num_seqs,
        block_table=table.to(torch.int32),
        context_lens=context_lens,
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32),
        max_context_len=context_len,
    )


def _observe(tuner: Autotuner, num_seqs=3, context_len=10):
    k_cache = torch.randn(32, BLOCK, KV_HEADS, HEAD_DIM)
    v_cache = torch.randn(32, BLOCK, KV_HEADS, HEAD_DIM)
    meta = _decode_meta(num_seqs, context_len, 32)
    bucket = ShapeBucket.of(DECODE_ATTENTION, num_seqs, context_len, HEADS, KV_HEADS, HEAD_DIM)
    tuner.observe(bucket, meta, k_cache, v_cache, HEADS)
    return bucket


def test_bucket_rounds_up_to_powers_of_two_and_round_trips_through_its_key():
    bucket = ShapeBucket.of(DECODE_ATTENTION, 24, 1000, 32, 8, 128)
    assert (bucket.batch, bucket.context, bucket.layout) == (32, 1024, "32/8/128")
    assert ShapeBucket.parse(bucket.key()) == bucket


def test_choose_prefers_pin_then_choice_then_default_and_records_swaps():
    registry, _ = _registry()
    bucket = ShapeBucket.of(DECODE_ATTENTION, 1, 16, HEADS, KV_HEADS, HEAD_DIM)
    assert registry.choose(bucket).name == "torch_ref"
    registry.set_choice(bucket, "slowed[delay=0.004]", "tuned")
    assert registry.choose(bucket).name == "slowed[delay=0.004]"
    registry.pin(DECODE_ATTENTION, "wrong")
    assert registry.choose(bucket).name == "wrong"
    registry.pin(DECODE_ATTENTION, None)
    assert registry.choose(bucket).name == "slowed[delay=0.004]"
    assert [e.reason for e in registry.history] == ["tuned", "pinned", "unpinned"]
    with pytest.raises(ValueError, match="no decode_attention variant named 'nope'"):
        registry.pin(DECODE_ATTENTION, "nope")


def test_tuning_rejects_the_wrong_variant_and_keeps_the_fastest_correct_one(tmp_path):
    registry, reference = _registry()
    cache = ChoiceCache(tmp_path / "kernels.json", "test-gpu")
    tuner = Autotuner(
        registry,
        reference,
        AutotuneConfig(tunable_families=("torch_ref", "slowed", "wrong"), repeats=3),
        cache,
    )
    bucket = _observe(tuner)
    for _ in range(4):  # one candidate per slot, then the decision
        tuner.run_slot()
    tuned = [e for e in tuner.events if e["event"] == "tuned"]
    assert len(tuned) == 1
    assert "wrong" in tuned[0]["rejected"] and "error" in tuned[0]["rejected"]["wrong"]
    assert tuned[0]["best"] == "torch_ref"
    assert registry.is_tuned(bucket) and registry.choose(bucket).name == "torch_ref"
    # the choice persists, keyed by GPU and bucket, and a fresh registry starts warm from it
    fresh, _ = _registry()
    assert ChoiceCache(tmp_path / "kernels.json", "test-gpu").load_into(fresh) == 1
    assert fresh.is_tuned(bucket)
    assert ChoiceCache(tmp_path / "kernels.json", "other-gpu").load_into(_registry()[0]) == 0


def test_an_offered_slow_variant_is_rolled_back_on_live_samples_and_barred():
    registry, reference = _registry()
    tuner = Autotuner(registry, reference, AutotuneConfig(repeats=3, probation_samples=3), online=False)
    bucket = _observe(tuner)
    assert tuner.offer(DECODE_ATTENTION, "slowed[delay=0.004]") == [bucket.key()]
    assert registry.choose(bucket).name == "slowed[delay=0.004]"
    for _ in range(3):
        _observe(tuner)  # live steps keep coming while it is on probation
        tuner.run_slot()
    assert registry.choose(bucket).name == "torch_ref"
    rollback = [e for e in tuner.events if e["event"] == "rollback"]
    assert rollback and "slower" in rollback[0]["why"]
    assert registry.history[-1].reason.startswith("rollback")
    assert "slowed[delay=0.004]" in tuner.snapshot()["barred"][bucket.key()]


def test_a_grossly_slower_variant_is_rolled_back_on_its_first_sample():
    """A bucket may not come back often (a rare batch size): one sample past hard_regression is enough."""
    registry, reference = _registry()
    config = AutotuneConfig(repeats=3, probation_samples=3, hard_regression=2.0)
    tuner = Autotuner(registry, reference, config, online=False)
    bucket = _observe(tuner)
    tuner.offer(DECODE_ATTENTION, "slowed[delay=0.004]")
    _observe(tuner)
    tuner.run_slot()
    assert registry.choose(bucket).name == "torch_ref"
    assert [e["event"] for e in tuner.events] == ["rollback"]


def test_an_offered_wrong_variant_is_rolled_back_for_its_error():
    registry, reference = _registry()
    tuner = Autotuner(registry, reference, AutotuneConfig(repeats=2), online=False)
    bucket = _observe(tuner)
    tuner.offer(DECODE_ATTENTION, "wrong")
    _observe(tuner)
    tuner.run_slot()
    assert registry.choose(bucket).name == "torch_ref"
    assert "error" in [e for e in tuner.events if e["event"] == "rollback"][0]["why"]


def test_a_variant_as_fast_as_the_old_one_survives_probation():
    registry, reference = _registry()
    registry.register(KernelVariant(DECODE_ATTENTION, "copy", reference[DECODE_ATTENTION].run))
    tuner = Autotuner(registry, reference, AutotuneConfig(repeats=5, max_regression=0.5), online=False)
    bucket = _observe(tuner)
    tuner.offer(DECODE_ATTENTION, "copy")
    for _ in range(3):
        _observe(tuner)
        tuner.run_slot()
    assert registry.choose(bucket).name == "copy"
    assert [e["event"] for e in tuner.events] == ["kept"]


# ---- compiling off the engine thread -------------------------------------------------------------------

JIT_FAMILIES = ("fast", "slowed", "wrong")


def _jit_registry(log: list) -> tuple[KernelRegistry, dict[str, KernelVariant]]:
    """Decode candidates with a (no-op) JIT step whose launches are logged as ("run", family)."""
    registry = KernelRegistry()
    reference = {v.op: v for v in reference_variants()}
    for variant in reference.values():
        registry.register(variant)
    decode_ref = reference[DECODE_ATTENTION].run

    def launch(family, q, k, v, k_cache, v_cache, meta, scale, out, resources=None):
        log.append(("run", family))
        if family == "slowed":
            time.sleep(0.002)
        decode_ref(q, k, v, k_cache, v_cache, meta, scale, out)
        if family == "wrong":
            out[: meta.num_decode_tokens] += 1.0

    for family in JIT_FAMILIES:
        run = lambda *args, family=family: launch(family, *args)
        registry.register(KernelVariant(DECODE_ATTENTION, family, run, warmup=lambda *args: None))
    return registry, reference


class FakeCompiler:
    """Stands for Triton's warmup on the worker thread: logs ("compile", family), waits until the test
    releases it, and raises for the families in `fail`."""

    def __init__(self, log: list, fail: tuple[str, ...] = ()):
        self.log, self.fail = log, fail
        self.release = threading.Event()

    def __call__(self, variant: KernelVariant, args: tuple) -> None:
        self.log.append(("compile", variant.family))
        assert self.release.wait(10)
        if variant.family in self.fail:
            raise RuntimeError("ptxas fatal: out of registers")
        variant.warmup(*args)


def _jit_tuner(log: list, compiler: FakeCompiler) -> Autotuner:
    registry, reference = _jit_registry(log)
    config = AutotuneConfig(tunable_families=JIT_FAMILIES, repeats=2)
    return Autotuner(registry, reference, config, compiler=compiler)


def _slots_until_tuned(tuner: Autotuner, timeout: float = 10.0) -> dict:
    """Give slots (as the engine would, between steps) until the bucket's decision."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tuner.run_slot()
        tuned = [e for e in tuner.events if e["event"] in ("tuned", "untuned")]
        if tuned:
            return tuned[0]
        time.sleep(0.001)
    raise AssertionError(f"not tuned in {timeout} s: {tuner.snapshot()}")


def test_a_candidate_is_not_launched_until_its_background_compile_is_done():
    log: list = []
    compiler = FakeCompiler(log)
    tuner = _jit_tuner(log, compiler)
    bucket = _observe(tuner)
    for _ in range(5):
        begin = time.perf_counter()
        tuner.run_slot()
        assert time.perf_counter() - begin < 0.5  # the slot never waits for the compile
    assert log == [("compile", "fast")]  # one compile at a time, nothing launched
    assert tuner.snapshot()["compiling"] == f"{bucket.key()} fast"

    compiler.release.set()
    tuned = _slots_until_tuned(tuner)
    assert [name for kind, name in log if kind == "compile"] == list(JIT_FAMILIES)
    for family in JIT_FAMILIES:  # each candidate launched only after its compile
        assert log.index(("compile", family)) < log.index(("run", family))
    assert tuned["best"] == "fast" and "error" in tuned["rejected"]["wrong"]
    assert tuner.registry.choose(bucket).name == "fast"
    tuner.close()


def test_a_failed_compile_rejects_the_candidate_and_tuning_goes_on():
    log: list = []
    compiler = FakeCompiler(log, fail=("fast",))
    compiler.release.set()
    tuner = _jit_tuner(log, compiler)
    bucket = _observe(tuner)
    tuned = _slots_until_tuned(tuner)
    assert tuned["rejected"]["fast"].startswith("compile failed: ptxas fatal")
    assert ("run", "fast") not in log
    assert set(tuned["timings"]) == {"slowed"} and tuned["best"] == "slowed"
    assert tuner.registry.choose(bucket).name == "slowed"
    tuner.close()


@pytest.mark.parametrize("budget_ms, slots_to_tune", [(0.0, 4), (1e6, 1)])
def test_a_slot_starts_no_new_work_once_its_budget_is_spent(budget_ms, slots_to_tune):
    registry, reference = _registry()
    config = AutotuneConfig(
        tunable_families=("torch_ref", "slowed", "wrong"), repeats=2, slot_budget_ms=budget_ms
    )
    tuner = Autotuner(registry, reference, config, compiler=None)
    bucket = _observe(tuner)
    for slot in range(slots_to_tune):  # three candidates, then the decision
        assert not registry.is_tuned(bucket)
        tuner.run_slot()
        if budget_ms == 0:
            assert tuner.snapshot()["tuning"].get(bucket.key(), 0) == max(0, 2 - slot)
    assert registry.is_tuned(bucket)


def test_triton_warmups_compile_without_launching():
    """Under Triton's CPU interpreter warmup compiles nothing, but it must not launch either: the rows
    of `out` stay as they were, while the launch writes them."""
    k_cache = torch.randn(32, BLOCK, KV_HEADS, HEAD_DIM)  # [blocks, block, KVH, D]
    v_cache = torch.randn(32, BLOCK, KV_HEADS, HEAD_DIM)  # [blocks, block, KVH, D]
    decode = _decode_meta(2, 10, 32)
    prefill = AttentionMetadata(
        slot_mapping=torch.arange(6),
        num_decode_tokens=0,
        prefills=[PrefillSequence(0, 6, 6)],
        block_table=torch.arange(2, dtype=torch.int32).view(1, 2),
        context_lens=torch.tensor([6], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 6], dtype=torch.int32),
        max_query_len=6,
        max_context_len=6,
    )
    by_op = {DECODE_ATTENTION: decode, PREFILL_ATTENTION: prefill}
    for variant in triton_variants(slowed=False)[::5]:  # decode and prefill variants
        meta = by_op[variant.op]
        num_tokens = meta.slot_mapping.shape[0]
        q = torch.randn(num_tokens, HEADS, HEAD_DIM)  # [T, H, D]
        out = torch.full_like(q, float("nan"))  # [T, H, D]
        args = (q, None, None, k_cache, v_cache, meta, HEAD_DIM**-0.5, out)
        compile_ahead(variant, args)
        assert out.isnan().all(), variant.name
        variant.run(*args)
        assert not out.isnan().any(), variant.name

    # split-KV decode: its scratch buffers are not allocated for a warmup (a dtype stands for them)
    q = torch.randn(2, HEADS, HEAD_DIM)  # [N, H, D]
    out = torch.full_like(q, float("nan"))  # [N, H, D]
    args = (q, k_cache, v_cache, decode.block_table, decode.context_lens, HEAD_DIM**-0.5)
    paged_decode_attention(*args, tile_n=16, num_splits=4, out=out, compile_only=True)
    assert out.isnan().all()
    paged_decode_attention(*args, tile_n=16, num_splits=4, out=out)
    assert not out.isnan().any()
