"""The registry and the autotuner on the CPU, with variants built from the reference: a fast copy, a
deliberately slowed copy, a wrong one. Real launches, real timings (the slowed variant sleeps)."""

from __future__ import annotations

import time

import pytest
import torch

from adaptserve.kernels.attention.metadata import AttentionMetadata
from adaptserve.kernels.attention.variants import reference_variants
from adaptserve.kernels.autotune import AutotuneConfig, Autotuner
from adaptserve.kernels.choice_cache import ChoiceCache
from adaptserve.kernels.registry import DECODE_ATTENTION, KernelRegistry, KernelVariant, ShapeBucket

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
