"""KV compression through the whole engine on the real SmolLM2: the chunked cache read in its own
format gives the plain cache's tokens at bf16, int8 stays close, and under memory pressure the
adaptive policy lowers the format, requantizes cold blocks, fits more sequences and loses none."""

from __future__ import annotations

import itertools

import pytest

from adaptserve import LLM
from adaptserve.engine.request import SamplingParams
from adaptserve.model.loaders import load_checkpoint

PROMPTS = ["The capital of France is", "Write a haiku about the sea:", "List three prime numbers:"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint(None, progress=False)


@pytest.fixture(scope="module")
def reference(checkpoint):
    llm = LLM.from_checkpoint(checkpoint, max_model_len=512)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def _agreement(tokens, reference) -> float:
    pairs = zip(tokens, reference, strict=True)
    return sum(a == b for x, y in pairs for a, b in zip(x, y, strict=True)) / sum(map(len, reference))


def _generate(llm, prompts=PROMPTS, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_chunked_bf16_cache_gives_the_plain_caches_tokens(checkpoint, reference):
    llm = LLM.from_checkpoint(checkpoint, max_model_len=512, kv_policy="adaptive")
    assert llm.engine.kv_cache.block_pool.write_format == "bf16"
    assert _generate(llm) == reference


def test_int8_cache_stays_close_and_int4_drifts(checkpoint, reference):
    int8 = LLM.from_checkpoint(checkpoint, max_model_len=512, kv_format="int8")
    pool = int8.engine.kv_cache.block_pool
    assert _agreement(_generate(int8), reference) >= 0.9
    assert pool.num_free_blocks == pool.num_chunks * pool.blocks_per_chunk["int8"]  # all freed again
    int4 = LLM.from_checkpoint(checkpoint, max_model_len=512, kv_format="int4")
    assert _agreement(_generate(int4), reference) < 1.0  # int4 with per-token keys changes this output


def test_int4k_moves_full_blocks_and_writes_new_tokens_in_int8(checkpoint, reference):
    llm = LLM.from_checkpoint(checkpoint, max_model_len=512, kv_format="int4k")
    pool = llm.engine.kv_cache.block_pool
    assert pool.write_format == "int4k" and pool.token_format == "int8"
    tokens = _generate(llm)
    # each sequence filled its first block, which then moved whole into int4k (kept for its prefix)
    assert llm.engine.runner.compressed_kv.num_requantized_blocks >= len(PROMPTS)
    assert "int4k" in pool.chunk_format
    # free-running agreement is fragile: one flip early in a reply changes the rest of it. Measured
    # here (3 prompts x 24 tokens): 0.75 on an Intel Xeon (first flips at tokens 19 and 11, after
    # each prompt's first block moved to int4k), above 0.9 on an AMD EPYC; int4 with per-token keys
    # flips within 5-10 tokens (0.23 over 6 prompts x 48 tokens, int4k 0.56, int8 0.95). The
    # quality itself is measured teacher-forced in `bench kv` (kv-int4k-cpu.json)
    assert _agreement(tokens, reference) >= 0.6


def test_knob_switches_the_write_format_only_on_a_compressed_cache(checkpoint):
    plain = LLM.from_checkpoint(checkpoint, max_model_len=256)
    with pytest.raises(ValueError, match="kv_format cannot change at run time"):
        plain.engine.apply_knob("kv_format", "int8")
    compressed = LLM.from_checkpoint(checkpoint, max_model_len=256, kv_format="int8")
    compressed.engine.apply_knob("kv_format", "int4")
    assert compressed.engine.kv_cache.block_pool.write_format == "int4"
    with pytest.raises(ValueError, match="kv_format"):
        compressed.engine.apply_knob("kv_format", "int2")


def test_pressure_lowers_the_format_requantizes_and_fits_more(checkpoint):
    """64 bf16 blocks (1024 tokens; the adaptive cache keeps 16 back to move blocks into) for 12
    requests of ~105 tokens each (1260): bf16 must preempt."""
    prompts = [f"Count from {i} to {i + 60}, one number per line:" for i in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True)
    options = dict(max_model_len=256, num_blocks=64, max_num_seqs=12, enable_prefix_caching=False)

    def run(**extra):
        llm = LLM.from_checkpoint(checkpoint, **options, **extra)
        # the policy's forecast and cooldowns read the engine's clock: a clock that advances a fixed
        # 50 ms per reading (a step here reads it 3-5 times and takes 0.1-0.3 s on this CPU) makes the
        # run the same on a quiet or a loaded machine (on the wall clock a loaded CI run switched late
        # and preempted as often as bf16)
        llm.engine.clock = itertools.count(start=1.0, step=0.05).__next__
        steps = []
        llm.engine.stat_loggers.append(type("R", (), {"record": lambda self, s: steps.append(s)})())
        outputs = _generate(llm, prompts, params)
        return llm, steps, outputs

    _, plain_steps, plain_out = run()
    llm, steps, out = run(kv_policy="adaptive", kv_monitor_rate=0.0, control_interval_s=0.0)
    assert [len(t) for t in out] == [90] * 12 and [len(t) for t in plain_out] == [90] * 12  # none lost
    switches = [s for s in llm.engine.control.switches.recent if s.knob == "kv_format"]
    assert switches and switches[0].new in ("int8", "int4")
    assert llm.engine.runner.compressed_kv.num_requantized_blocks > 0
    preemptions, plain_preemptions = (sum(s.num_preemptions for s in run) for run in (steps, plain_steps))
    assert plain_preemptions > 0 and preemptions < plain_preemptions


def test_hot_window_under_pressure_writes_bf16_and_loses_nothing(checkpoint):
    """The pressure run with a 1-block hot window: the policy still lowers the format and cold blocks
    move, but every sequence's newest block is bf16 after every step, and every request finishes."""
    prompts = [f"Count from {i} to {i + 60}, one number per line:" for i in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True)
    llm = LLM.from_checkpoint(
        checkpoint,
        max_model_len=256,
        num_blocks=64,
        max_num_seqs=12,
        enable_prefix_caching=False,
        kv_policy="adaptive",
        kv_monitor_rate=0.0,
        control_interval_s=0.0,
        kv_hot_window=1,
    )
    llm.engine.clock = itertools.count(start=1.0, step=0.05).__next__  # as in the pressure test above
    manager = llm.engine.kv_cache
    pool = manager.block_pool
    newest, lower = set(), set()

    def record(_, stats):
        newest.update(pool.format_of(blocks[-1]) for blocks in manager.req_to_blocks.values() if blocks)
        lower.update(name for name, n in pool.usage_by_format().items() if n and name != "bf16")

    llm.engine.stat_loggers.append(type("R", (), {"record": record})())
    out = _generate(llm, prompts, params)
    assert [len(t) for t in out] == [90] * 12  # none lost, none cut short
    switches = [s for s in llm.engine.control.switches.recent if s.knob == "kv_format"]
    assert switches and switches[0].new in ("int8", "int4")
    assert llm.engine.runner.compressed_kv.num_requantized_blocks > 0 and lower
    assert newest == {"bf16"}
