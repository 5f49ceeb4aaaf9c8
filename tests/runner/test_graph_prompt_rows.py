"""On a GPU, a prompt chunk that a prefix-cache hit leaves short replays the decode graphs as
one-token rows (kernels.cuda_graph_prompt_tokens) and gives what the eager prefill gives: the same
tokens and logprobs, one chunk alone and two in one step."""

import pytest

from adaptserve import LLM, SamplingParams
from tests.runner.test_graph_prewarm import OPTIONS, tiny_checkpoint

pytestmark = pytest.mark.cuda

BASE = [7 + i % 50 for i in range(32)]  # two 16-token blocks, cached after the first request
FIRST, SECOND = BASE + [3] * 9, BASE + [4, 5, 6, 7, 8, 9]  # the second leaves a 6-token chunk
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)


def run(llm: LLM) -> list[tuple[list[int], list[float]]]:
    results = []
    for prompts in ([FIRST], [SECOND], [FIRST + [11], SECOND]):  # the last: chunks of 10 and 6 at once
        for o in llm.generate(prompts, PARAMS, use_tqdm=False):
            out = o.outputs[0]
            results.append(
                (out.token_ids, [step[t] for t, step in zip(out.token_ids, out.logprobs, strict=True)])
            )
    return results


def check_same(got, expected) -> None:
    for (tokens, logprobs), (eager_tokens, eager_logprobs) in zip(got, expected, strict=True):
        assert tokens == eager_tokens
        assert logprobs == pytest.approx(eager_logprobs, abs=1e-4)


def test_a_short_chunk_after_a_cache_hit_replays_a_graph_like_the_eager_prefill():
    checkpoint = tiny_checkpoint()
    options = {**OPTIONS, "block_size": 16, "max_num_seqs": 16}  # graphs of up to 16 rows
    expected = run(LLM.from_checkpoint(checkpoint, cuda_graph_prompt_tokens=0, **options))
    llm = LLM.from_checkpoint(checkpoint, **options)
    graphs = llm.engine.runner.graphs
    check_same(run(llm), expected)
    # the 6-token chunk and the two chunks' 16 rows; every decode step here has one or two rows
    assert 6 in graphs.last_used and 16 in graphs.last_used
    # prompt rows replay the graph captured at start (for longer contexts): no capture per chunk
    assert len([key for key in graphs.graphs if key[0] == 6]) == 1


def test_with_the_knob_at_zero_prompt_chunks_run_eagerly():
    checkpoint = tiny_checkpoint()
    options = {**OPTIONS, "block_size": 16, "max_num_seqs": 16}
    llm = LLM.from_checkpoint(checkpoint, cuda_graph_prompt_tokens=0, **options)
    run(llm)
    assert not {6, 16} & set(llm.engine.runner.graphs.last_used)


def test_a_prompt_arriving_beside_a_verify_step_rides_in_the_graph_with_the_drafts():
    """Speculation on: request A verifies drafts step after step; B's 10-token prompt arrives in the
    middle, and the step that verifies A's drafts and computes B's prompt runs as rows of one graph.
    Both requests get the tokens that the eager mixed step gives."""
    checkpoint = tiny_checkpoint()
    spec = {"spec_method": "ngram", "num_speculative_tokens": 4, "spec_adaptive": False}
    options = {**OPTIONS, **spec}  # max_num_seqs 8: graphs of up to 40 rows

    def serve(llm: LLM) -> tuple[dict[str, list[int]], list]:
        engine, steps, done = llm.engine, [], {}
        engine.stat_loggers.append(type("Recorder", (), {"record": lambda self, s: steps.append(s)})())
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        engine.add_request("a", [5, 6, 7, 8, 9] * 6, params)
        for i in range(40):
            if i == 4:
                engine.add_request("b", [40 + j for j in range(10)], params)
            for output in engine.step():
                if output.finished:
                    done[output.request_id] = output.outputs[0].token_ids
            if not engine.has_unfinished_requests():
                break
        return done, steps

    expected, _ = serve(LLM.from_checkpoint(checkpoint, cuda_graph_prompt_tokens=0, **options))
    llm = LLM.from_checkpoint(checkpoint, **options)
    got, steps = serve(llm)
    assert got == expected and set(got) == {"a", "b"}
    mixed = [s for s in steps if s.num_draft_tokens and s.num_prefill_tokens > s.num_draft_tokens]
    assert mixed, "no step verified drafts beside a prompt chunk"
    graphs = llm.engine.runner.graphs
    assert graphs.bucket(mixed[0].num_scheduled_tokens) in graphs.last_used
