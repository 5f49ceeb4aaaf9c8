"""The speculation policy driven with synthetic step costs and acceptance."""

import itertools
import math
import random
from statistics import mean

import pytest

from adaptserve.adapt.spec_estimates import Acceptance, bucket_of
from adaptserve.adapt.speculation import OFF, SpeculationPolicy


def simulate(policy, *, batch, steps, plain_cost, draft_cost, alpha, hit=1.0, start=0.0, dt=0.05):
    """Run `steps` steps: the policy picks an arm, the synthetic engine 'runs' it and reports back.
    Costs are functions of the step's tokens; each draft is accepted while a deterministic stream of
    Bernoulli(alpha) outcomes says so. Returns the arms chosen."""
    chosen = []
    flips = itertools.cycle([(i * 0.6180339) % 1.0 for i in range(1, 100000)])
    for i in range(steps):
        now = start + i * dt
        drafter, k = policy.choose(now, batch)
        chosen.append((drafter, k))
        generated = tokens = batch
        if k:
            drafting = int(round(hit * batch))
            tokens += drafting * k
            for _ in range(drafting):
                accepted = 0
                while accepted < k and next(flips) < alpha[drafter]:
                    accepted += 1
                generated += accepted
                policy.observe_request(drafter, "r", k, accepted)
            policy.observe_proposals(drafter, batch, drafting)
            seconds = draft_cost[drafter](tokens, k)
        else:
            seconds = plain_cost(tokens)
        policy.observe_step((drafter, k) if k else OFF, batch, tokens, seconds)
    return chosen


def memory_bound(tokens, k=0):
    return 0.010 + 0.00002 * tokens


def compute_bound(tokens, k=0):
    return 0.002 + 0.001 * tokens


def test_memory_bound_batch_one_settles_on_long_drafts():
    policy = SpeculationPolicy(("ngram",), max_draft=8)
    chosen = simulate(policy, batch=1, steps=400, plain_cost=memory_bound,
                      draft_cost={"ngram": memory_bound}, alpha={"ngram": 0.8})  # fmt: skip
    assert policy.current == ("ngram", 8)
    assert sum(arm == ("ngram", 8) for arm in chosen[-100:]) >= 90


def test_a_graph_capture_on_an_arms_first_step_does_not_keep_it_off():
    """Every arm's first step captures a graph (30x a step, as on the H100). The arm's value is the
    median of its recent steps and the line skips such outliers, so batch 1 still settles on k=8;
    with a decayed mean, k=8's first burst kept it under k=4."""
    captured = set()

    def with_capture(tokens, k=0):
        seconds = memory_bound(tokens)
        if k not in captured:
            captured.add(k)
            seconds += 0.3
        return seconds

    policy = SpeculationPolicy(("ngram",), max_draft=8)
    chosen = simulate(policy, batch=1, steps=400, plain_cost=with_capture,
                      draft_cost={"ngram": with_capture}, alpha={"ngram": 0.8})  # fmt: skip
    assert policy.current == ("ngram", 8)
    assert sum(arm == ("ngram", 8) for arm in chosen[-100:]) >= 90


def test_compute_bound_large_batch_turns_speculation_off():
    policy = SpeculationPolicy(("ngram",), max_draft=4)
    chosen = simulate(policy, batch=64, steps=400, plain_cost=compute_bound,
                      draft_cost={"ngram": compute_bound}, alpha={"ngram": 0.6})  # fmt: skip
    assert policy.current == OFF
    assert sum(arm == OFF for arm in chosen[-100:]) >= 85  # the rest are probes
    assert "batch 64" in policy.last_reason


def test_the_better_drafter_wins():
    """A layer draft costs a partial pass per drafted token; the free n-gram draft with higher
    acceptance should win, and a weak layer draft should never become current."""
    policy = SpeculationPolicy(("ngram", "layers15", "layers22"), max_draft=4)
    costs = {
        "ngram": memory_bound,
        "layers15": lambda tokens, k: memory_bound(tokens) + k * 0.005,
        "layers22": lambda tokens, k: memory_bound(tokens) + k * 0.007,
    }
    simulate(policy, batch=1, steps=600, plain_cost=memory_bound, draft_cost=costs,
             alpha={"ngram": 0.7, "layers15": 0.1, "layers22": 0.3})  # fmt: skip
    assert policy.current[0] == "ngram"


def test_noise_around_equal_values_does_not_make_the_knob_move():
    """Two arms delivering the same tokens/s up to +-3 % noise: the current one stays."""
    policy = SpeculationPolicy(("ngram",), max_draft=2, probe_every=10**9)
    policy.current = ("ngram", 2)
    for arm in policy.arms:  # every arm measured at the same rate first
        for _ in range(3):
            policy.observe_step(arm, 4, 4, 0.01)
    switches = 0
    for i in range(400):
        before = policy.current
        arm = policy.choose(i * 0.05, 4)
        switches += policy.current != before
        noise = 1.03 if i % 2 else 0.97
        policy.observe_step(arm, 4, 4, 0.01 * noise)  # every arm: the same step time +- 3 %
    assert switches == 0


def test_probes_keep_other_arms_measured_but_back_off_when_they_lose():
    """At a compute-bound batch every drafting arm loses: each probe that confirms it doubles its wait,
    so exploration fades (but never stops) instead of costing a burst every probe_every steps."""
    policy = SpeculationPolicy(("ngram",), max_draft=4, probe_every=20)
    chosen = simulate(policy, batch=64, steps=3000, plain_cost=compute_bound,
                      draft_cost={"ngram": compute_bound}, alpha={"ngram": 0.6}, dt=0.05)  # fmt: skip
    early = sum(arm != OFF for arm in chosen[:400])  # ~3 arms probed in bursts of 3
    late = sum(arm != OFF for arm in chosen[2000:3000])
    assert 15 <= early <= 40
    assert 1 <= late <= early / 2
    assert all(wait > 1 for wait in policy.backoff.values()) and len(policy.backoff) == 3


def test_a_probe_that_comes_close_resets_its_wait():
    policy = SpeculationPolicy(("ngram",), max_draft=1, probe_every=10)
    policy.current = OFF
    for _ in range(3):
        policy.observe_step(OFF, 4, 4, 0.010)
        policy.observe_step(("ngram", 1), 4, 8, 0.020)  # 1.5 tokens in twice off's time
    for i in range(60):  # probes of the losing arm back off
        arm = policy.choose(i * 0.05, 4)
        policy.observe_step(arm, 4, 8 if arm[1] else 4, 0.020 if arm[1] else 0.010)
    bucket = bucket_of(4)
    assert policy.backoff[(bucket, ("ngram", 1))] >= 2
    for i in range(60, 400):  # then it becomes as good as off: its next probe resets the wait
        arm = policy.choose(i * 0.05, 4)
        policy.observe_step(arm, 4, 8 if arm[1] else 4, 0.010)
    assert (bucket, ("ngram", 1)) not in policy.backoff


def test_per_request_draft_length_follows_its_acceptance():
    """A draft row is worth its chance of being reached and accepted. "bad" never gets its first
    draft accepted: that chance sinks to 0.14 (its drafter's prior holds it there), under the 0.2
    threshold, so it drafts one token, still tested so that it can recover."""
    policy = SpeculationPolicy(("ngram",), max_draft=8, min_draft_accept=0.2)
    for _ in range(30):
        policy.observe_request("ngram", "good", 8, 8)
        policy.observe_request("ngram", "bad", 8, 0)
    assert policy.request_draft_len("ngram", "good", 8) == 8
    assert policy.request_acceptance[("ngram", "bad")].rate_at(0) == pytest.approx(0.14, abs=0.02)
    assert policy.request_draft_len("ngram", "bad", 8) == 1
    policy.forget("bad")
    assert ("ngram", "bad") not in policy.request_acceptance


def test_draft_rows_are_cut_by_what_a_row_costs():
    """alpha 0.5: draft j is kept while 0.5^j beats the threshold. A step that costs the same with more
    rows (memory bound) keeps 5 drafts; one whose rows cost their full share (compute bound) keeps 3."""

    def trained(cost):
        policy = SpeculationPolicy(("ngram",), max_draft=8)
        for tokens in range(1, 200, 7):
            policy.observe_step(OFF, tokens, tokens, cost(tokens))
        policy.acceptance["ngram"] = Acceptance(prior=0.5, prior_trials=1e9)  # 0.5 at every position
        return policy

    memory = trained(lambda tokens: 0.010 + 1e-7 * tokens)
    memory.choose(0.0, 1)
    assert memory.draft_threshold == pytest.approx(0.02)
    assert memory.request_draft_len("ngram", "r", 8) == 5  # 0.5^5 = 0.031 >= 0.02 > 0.5^6
    compute = trained(lambda tokens: 0.001 * tokens)
    compute.choose(0.0, 64)
    assert compute.draft_threshold == pytest.approx(0.1)  # capped at min_draft_accept
    assert compute.request_draft_len("ngram", "r", 8) == 3  # 0.5^3 = 0.125 >= 0.1 > 0.5^4


def test_copy_like_acceptance_keeps_long_drafts_where_rows_cost():
    """The first draft accepted half the time, the rest following it: each draft that is reached is
    almost surely accepted, so all 8 stay even where a row costs its full share (threshold 0.1)."""
    policy = SpeculationPolicy(("ngram",), max_draft=8)
    for tokens in range(1, 200, 7):
        policy.observe_step(OFF, tokens, tokens, 0.001 * tokens)  # compute bound
    for step in range(200):
        policy.observe_request("ngram", "r", 8, 8 if step % 2 else 0)
    policy.choose(0.0, 64)
    assert policy.draft_threshold == pytest.approx(0.1)
    assert policy.request_draft_len("ngram", "r", 8) == 8


def test_draft_overhead_is_never_negative():
    """Verify steps cheaper than the plain steps' line (a CPU whose GEMM rows get cheaper as they
    grow) leave the n-gram overhead at 0, and the line learns their real time (with the overhead
    at -20 ms it had learnt 0.05 s for them)."""
    policy = SpeculationPolicy(("ngram",), max_draft=4)
    for tokens in range(1, 40):
        policy.observe_step(OFF, tokens, tokens, 0.01 + 0.001 * tokens)
    for _ in range(20):
        policy.observe_step(("ngram", 4), 8, 40, 0.03)  # the line says 0.05
    assert policy.cost.draft_overhead["ngram"] == 0.0
    assert 0.03 <= policy.cost.line.predict(40) < 0.04


def test_a_re_probe_of_an_arm_that_stays_worse_is_one_step():
    """Once every arm was measured at batch 64 (compute bound: off wins), a probe is a one-step check;
    only a check that comes close would get the rest of a burst. Three-step re-probes of k=1 and
    k=2 cost 3 % of the steps at batch 128."""
    policy = SpeculationPolicy(("ngram",), max_draft=4, probe_every=20, max_backoff=1)
    chosen = simulate(policy, batch=64, steps=600, plain_cost=compute_bound,
                      draft_cost={"ngram": compute_bound}, alpha={"ngram": 0.5})  # fmt: skip
    late = chosen[300:]
    runs = [len(list(group)) for arm, group in itertools.groupby(late) if arm != OFF]
    assert late.count(OFF) > 0.9 * len(late) and len(runs) >= 10
    assert max(runs) == 1


def test_lookup_overhead_is_per_sequence():
    """The H100's n-gram steps: 60 us of host work per drafting sequence on top of the line. Learnt at
    batch 8, it rules k=1 out at batch 128 (predicted under half of off, so never probed there); as
    one cost per step it predicted k=1 at 0.86 of off, and every bucket probed it."""
    policy = SpeculationPolicy(("ngram",), max_draft=4)
    line = lambda tokens: 0.001 + 0.00002 * tokens  # noqa: E731
    for _ in range(30):
        policy.observe_step(OFF, 8, 8, line(8))
        policy.observe_step(OFF, 128, 128, line(128))
        policy.observe_step(("ngram", 1), 8, 16, line(16) + 8 * 60e-6)
    assert policy.cost.draft_overhead["ngram"] == pytest.approx(60e-6, rel=0.2)  # the line takes a little
    for step in range(100):
        policy.observe_request("ngram", "r", 1, int(step % 3 > 0))  # the H100's 0.66 at position 1
    off, k1 = policy.predicted(OFF, 128), policy.predicted(("ngram", 1), 128)
    assert k1 < policy.probe_floor * off


def test_fixed_policy_always_drafts_the_maximum():
    policy = SpeculationPolicy(("ngram",), max_draft=3, adaptive=False)
    simulate(policy, batch=64, steps=50, plain_cost=compute_bound, draft_cost={"ngram": compute_bound},
             alpha={"ngram": 0.1})  # fmt: skip
    assert policy.choose(10.0, 64) == ("ngram", 3) and policy.request_draft_len("ngram", "r", 3) == 3


def test_a_shrinking_batch_reuses_what_the_neighbouring_bucket_measured():
    """Values are per sequence, so at batch 3 (bucket 2) the arms measured at batch 4 (bucket 3)
    count: the choice carries over, and no never-measured probe burst runs."""
    policy = SpeculationPolicy(("ngram",), max_draft=4, probe_every=10**9)
    simulate(policy, batch=4, steps=200, plain_cost=memory_bound,
             draft_cost={"ngram": memory_bound}, alpha={"ngram": 0.7})  # fmt: skip
    best = policy.current
    assert best != OFF
    arms = [policy.choose(100.0 + i, 3) for i in range(20)]
    assert set(arms) == {best}


def gpu_like_throughput(policy, batch, steps, alpha, noise, seed, fixed=None):
    """Tokens/s over `steps` steps of a GPU-shaped engine: a plain step hides its host work behind
    the device (max), a verify step cannot (sum); the device time grows with the rows. Acceptance is
    drawn at random (seeded) and every step's time carries lognormal noise."""
    rng = random.Random(seed)

    def device(rows):
        return 1.2e-3 + 2e-5 * rows

    tokens = seconds = 0.0
    for _ in range(steps):
        drafter, k = fixed if fixed is not None else policy.choose(seconds, batch)
        generated, rows = batch, batch
        if k:
            lengths = [k if fixed else policy.request_draft_len(drafter, f"r{r}", k) for r in range(batch)]
            for r, length in enumerate(lengths):
                accepted = 0
                while accepted < length and rng.random() < alpha:
                    accepted += 1
                generated += accepted
                if fixed is None:
                    policy.observe_request(drafter, f"r{r}", length, accepted)
            if fixed is None:
                policy.observe_proposals(drafter, batch, batch)
            rows += sum(lengths)
            step = 0.5e-3 + 2e-5 * batch + device(batch + max(lengths) * batch)
        else:
            step = max(0.25e-3 + 1e-5 * batch, device(batch))
        step *= math.exp(rng.gauss(0.0, noise))
        if fixed is None:
            policy.observe_step((drafter, k) if k else OFF, batch, rows, step)
        tokens += generated
        seconds += step
    return tokens / seconds


@pytest.mark.parametrize("batch", [1, 8, 64, 128])
def test_adaptive_is_within_a_few_percent_of_the_best_fixed_arm_at_every_load(batch):
    """Random acceptance (alpha 0.55) and 15 % timing noise: values built from the drafter's alpha
    and measured step times pick the right arm. (Tokens/s measured per arm over its last ten steps
    lost 18 % at batch 1: a step's accepted count swings from 1 to k + 1.)"""
    arms = [OFF] + [("ngram", k) for k in (1, 2, 4, 8)]
    best = max(gpu_like_throughput(None, batch, 400, 0.55, 0.0, seed=0, fixed=arm) for arm in arms)
    policy = SpeculationPolicy(("ngram",), max_draft=8)
    gpu_like_throughput(policy, batch, 300, 0.55, 0.15, seed=1)  # the first seconds of serving
    adaptive = gpu_like_throughput(policy, batch, 600, 0.55, 0.15, seed=2)
    assert adaptive >= 0.95 * best


def draining_throughput(policy, batch, alpha, seed, fixed=None, hit=0.75):
    """Tokens/s of one pass of `batch` requests that stop after 40-128 tokens, so the batch
    drains as they finish (as `bench spec` runs) after their prompts' steps (whose times the policy
    does not see), on an engine shaped after the H100 measurements
    of SmolLM2 in float32: device time 1.1 ms + 45 us per row; a plain step hides its host work
    (0.4 ms + 5 us per sequence) behind the device, except the first after a verify step, and a
    verify step adds its own (0.8 ms + 10 us per sequence). As in the engine with async scheduling,
    a plain step's time reaches the policy after the next step was chosen. The lookup finds a draft
    for a request with chance `hit`, each draft is accepted with chance `alpha` (seeded draws);
    step times carry 10 % noise."""
    rng = random.Random(seed)
    # as the bench's answers: most run to max_tokens (128), the rest stop earlier
    remaining = {f"r{r}": 128 if rng.random() < 0.6 else rng.randint(40, 127) for r in range(batch)}
    tokens = seconds = 0.0
    for _ in range(-(-batch * 400 // 2048)):  # prompt steps: 400 tokens each in 2048-token chunks
        if fixed is None:
            policy.choose(seconds, batch)  # chosen, but a prompt step's time is not reported
        seconds += 1e-3 + 2e-6 * min(2048, batch * 400)
    in_flight = None  # a plain step's observation, read one step later
    overlapped = True  # the previous step (a prompt step) was plain: this one's host work hides
    while remaining:
        live = len(remaining)
        drafter, k = fixed if fixed is not None else policy.choose(seconds, live)
        if in_flight is not None:
            policy.observe_step(*in_flight)
            in_flight = None
        rows = live
        found = 0
        for request_id in list(remaining):
            length = 0
            if k and rng.random() < hit:  # the lookup finds a match
                found += 1
                length = k if fixed else policy.request_draft_len(drafter, request_id, k)
                length = min(length, remaining[request_id] - 1)
            accepted = 0
            while accepted < length and rng.random() < alpha:
                accepted += 1
            if k and fixed is None and length:
                policy.observe_request(drafter, request_id, length, accepted)
            rows += length
            made = min(accepted + 1, remaining[request_id])
            tokens += made
            remaining[request_id] -= made
            if not remaining[request_id]:
                del remaining[request_id]
                if fixed is None:
                    policy.forget(request_id)
        device = 1.1e-3 + 4.5e-5 * rows
        if k:
            step = 0.8e-3 + 1e-5 * live + device
            if fixed is None:
                policy.observe_proposals(drafter, live, found)
        else:
            host = 0.4e-3 + 5e-6 * live
            step = max(host, device) if overlapped else host + device
        overlapped = not k
        step *= math.exp(rng.gauss(0.0, 0.1))
        if fixed is None and k:
            policy.observe_step((drafter, k), live, rows, step)
        elif fixed is None:
            in_flight = (OFF, live, rows, step)
        seconds += step
    if in_flight is not None:
        policy.observe_step(*in_flight)
    return tokens / seconds


def test_adaptive_keeps_up_with_the_best_fixed_arm_while_the_batch_drains():
    """Short passes whose batch shrinks as requests finish (the GPU bench's shape), averaged over
    five passes: the policy, warmed up on one pass as `bench spec` warms each engine, is within 10 %
    of the best fixed arm at every starting batch (measured: 0.91 at batch 8, where each batch
    size from 8 down is learnt in a few steps, 0.97-0.99 elsewhere), and its worst ratio beats every
    fixed arm's worst. (On the H100 the policy had speculated at batch 128 at 0.66x of off: values
    reused across buckets at another batch size, a cooldown of half a second, ~300 GPU steps, a
    probe burst carried from one pass into the next, off probed over prompt steps that report
    nothing, then ruled out by a step-cost line fitted on draft steps alone.)"""
    arms = [OFF] + [("ngram", k) for k in (1, 2, 4, 8)]
    worst_fixed = dict.fromkeys(arms, 1.0)
    worst_adaptive = 1.0
    for batch in (1, 8, 32, 64, 128):
        fixed = {
            arm: mean(draining_throughput(None, batch, 0.7, seed=s, fixed=arm) for s in range(5))
            for arm in arms
        }
        best = max(fixed.values())
        policy = SpeculationPolicy(("ngram",), max_draft=8)
        draining_throughput(policy, batch, 0.7, seed=100)  # the bench's untimed warm-up pass
        adaptive = mean(draining_throughput(policy, batch, 0.7, seed=s) for s in range(5))
        assert adaptive >= 0.9 * best, (batch, adaptive / best)
        worst_adaptive = min(worst_adaptive, adaptive / best)
        for arm in arms:
            worst_fixed[arm] = min(worst_fixed[arm], fixed[arm] / best)
    assert worst_adaptive > max(worst_fixed.values()), (worst_adaptive, worst_fixed)


def test_no_arm_runs_a_verify_step_past_the_graph_rows():
    """At batch 128 with 512 graph rows, k = 4 (640 rows) and k = 8 would run eagerly: never chosen,
    not even probed, though the synthetic costs make long drafts look best; k = 2 (384 rows) may run."""
    policy = SpeculationPolicy(("ngram",), max_draft=8, max_rows=512)
    chosen = simulate(policy, batch=128, steps=300, plain_cost=memory_bound,
                      draft_cost={"ngram": memory_bound}, alpha={"ngram": 0.8})  # fmt: skip
    assert {k for _, k in chosen} <= {0, 1, 2}
    assert policy.current == ("ngram", 2)  # the longest that fits: memory bound, long drafts pay
    unlimited = SpeculationPolicy(("ngram",), max_draft=8)
    chosen = simulate(unlimited, batch=128, steps=300, plain_cost=memory_bound,
                      draft_cost={"ngram": memory_bound}, alpha={"ngram": 0.8})  # fmt: skip
    assert unlimited.current[1] > 2  # without the limit it runs past 512 rows


def test_the_row_limit_moves_with_the_batch_size():
    policy = SpeculationPolicy(("ngram",), max_draft=8, max_rows=512)
    assert policy.fits(("ngram", 8), 56) and not policy.fits(("ngram", 8), 57)  # 504 and 513 rows
    assert policy.fits(OFF, 10_000)
    policy.choose(0.0, 8)
    assert policy.current == ("ngram", 8)  # 72 rows: the optimistic start stands
    policy.choose(0.0, 200)
    assert policy.current == ("ngram", 1)  # 400 rows; k = 2 would need 600
    policy.choose(0.0, 300)
    assert policy.current == OFF  # even k = 1 needs 600
