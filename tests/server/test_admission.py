"""SLO-aware admission without a model: a real Scheduler and KV-cache manager hold the queue, the
step-time model is fixed (or fed synthetic StepStats), and the controller's predictions and verdicts
are checked against them."""

import math
import random

import pytest

from adaptserve.config import ConfigError, SchedulerConfig
from adaptserve.engine.kv_cache import KVCacheManager
from adaptserve.engine.outputs import RunnerOutput
from adaptserve.engine.request import Request, SamplingParams
from adaptserve.engine.scheduler import Scheduler
from adaptserve.engine.stats import StepStats
from adaptserve.server.admission import AdmissionController, PredictionCalibration, StepTimeModel
from adaptserve.server.config import AdmissionConfig, PriorityTier, default_tiers, parse_slos

FIXED_S, PER_TOKEN_S = 0.01, 0.001
BUDGET = 512  # max_num_batched_tokens


def step_stats(num_tokens: int, step_time: float, num_decodes: int = 0) -> StepStats:
    return StepStats(
        start_time=0.0,
        step_time=step_time,
        num_scheduled_tokens=num_tokens,
        num_prefill_tokens=num_tokens - num_decodes,
        num_decode_sequences=num_decodes,
        num_generation_tokens=0,
        num_preemptions=0,
        prefix_cache_queries=0,
        prefix_cache_hits=0,
    )


def make_scheduler(policy: str = "fcfs", max_num_seqs: int = 64) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=BUDGET, policy=policy)
    return Scheduler(config, KVCacheManager(num_blocks=4096, block_size=16))


_ids = iter(range(1_000_000))


def add(scheduler: Scheduler, num_prompt_tokens: int, priority: int = 0, max_tokens: int = 16) -> Request:
    """Queue a request (waiting) with a prompt of `num_prompt_tokens` tokens."""
    i = next(_ids)
    request = Request(
        f"r{i}",
        [1 + (i + k) % 1000 for k in range(num_prompt_tokens)],
        SamplingParams(max_tokens=max_tokens),
        arrival_time=float(i),
        priority=priority,
    )
    scheduler.add_request(request)
    return request


def run_one_step(scheduler: Scheduler) -> None:
    """Schedule, and 'sample' one token for every sequence that finished its prompt."""
    out = scheduler.schedule()
    sampled = [s.request_id for s in out.sequences if s.sample]
    scheduler.update_from_output(out, RunnerOutput(sampled, [7] * len(sampled), [None] * len(sampled)))


def controller(scheduler: Scheduler, **config) -> AdmissionController:
    """Exact thresholds unless a test asks for a margin."""
    model = StepTimeModel(fixed_s=FIXED_S, per_token_s=PER_TOKEN_S)
    return AdmissionController(AdmissionConfig(**{"slo_margin": 0.0, **config}), scheduler, model)


def prefill_time(num_tokens: int, num_decodes: int = 0) -> float:
    """What the step model says `num_tokens` prompt tokens take when they are all that is queued."""
    steps = math.ceil(num_tokens / (BUDGET - num_decodes))
    return steps * FIXED_S + PER_TOKEN_S * (num_tokens + steps * num_decodes)


# ---- StepTimeModel -------------------------------------------------------------------------------------


def test_step_time_model_recovers_fixed_and_per_token_cost():
    model = StepTimeModel()
    for i in range(64):
        tokens = 16 + 31 * i
        model.record(step_stats(tokens, 0.01 + 0.001 * tokens))
    assert model.fixed_s == pytest.approx(0.01, rel=0.05)
    assert model.per_token_s == pytest.approx(0.001, rel=0.05)
    assert model.step_time(300) == pytest.approx(0.31, rel=0.05)


def test_step_time_model_ignores_steps_with_no_tokens():
    model = StepTimeModel()
    for i in range(64):
        tokens = 16 + 31 * i
        model.record(step_stats(tokens, 0.01 + 0.001 * tokens))
        model.record(step_stats(0, 5.0))  # an idle step (abort bookkeeping): no cost signal
    assert model.fixed_s == pytest.approx(0.01, rel=0.05)
    assert model.per_token_s == pytest.approx(0.001, rel=0.05)

    prior = StepTimeModel(fixed_s=0.02, per_token_s=1e-4)
    for _ in range(64):
        prior.record(step_stats(0, 5.0))
    assert (prior.fixed_s, prior.per_token_s) == (0.02, 1e-4)


def test_step_time_model_with_steps_all_of_one_size_matches_their_mean():
    """No slope can be fitted from one step size: the per-token prior is kept, the fixed cost moves."""
    model = StepTimeModel(fixed_s=0.02, per_token_s=1e-4)
    for i in range(16):
        model.record(step_stats(100, 0.05 + 0.002 * (i % 2)))
    assert model.per_token_s == 1e-4
    assert model.step_time(100) == pytest.approx(0.051)


# ---- AdmissionController -------------------------------------------------------------------------------


def test_empty_queue_is_admitted():
    admission = controller(make_scheduler())
    assert admission.check(100, 16, priority=0) is None
    assert admission.predict_ttft(100, 0) == pytest.approx(prefill_time(100))


def test_predicted_ttft_grows_with_the_queue_until_the_slo_rejects():
    scheduler = make_scheduler()
    admission = controller(scheduler, tiers=[PriorityTier("normal", 2**31, 1.0)])
    predictions = []
    rejection = None
    while rejection is None:
        tokens_ahead = 200 * len(scheduler.waiting)
        predicted = admission.predict_ttft(100, 0)
        assert predicted == pytest.approx(prefill_time(tokens_ahead + 100))
        predictions.append(predicted)
        rejection = admission.check(100, 16, priority=0)
        if rejection is None:
            assert predicted <= 1.0
            add(scheduler, 200)
    assert predictions == sorted(predictions) and len(set(predictions)) == len(predictions)
    assert len(predictions) > 3, "several requests fit before the SLO is missed"
    assert predictions[-1] > 1.0
    assert rejection.reason == "slo"
    assert rejection.retry_after_s >= 1
    assert rejection.retry_after_s == max(1, math.ceil(predictions[-1] - 1.0))
    assert "'normal' tier" in rejection.message and "SLO of 1s" in rejection.message


def test_retry_after_is_how_far_the_prediction_overshoots():
    scheduler = make_scheduler()
    admission = controller(scheduler, tiers=[PriorityTier("normal", 2**31, 1.0)])
    for _ in range(20):
        add(scheduler, 1000)
    predicted = admission.predict_ttft(100, 0)
    assert predicted > 10
    assert admission.check(100, 16, priority=0).retry_after_s == math.ceil(predicted - 1.0)


def test_priority_policy_high_priority_skips_lower_priority_tokens():
    scheduler = make_scheduler(policy="priority")
    admission = controller(scheduler)  # default tiers: high 1s, normal 5s, low 20s
    for _ in range(25):
        add(scheduler, 1000, priority=5)

    low = admission.check(500, 16, priority=5)
    assert low is not None and low.reason == "slo" and "'low' tier" in low.message
    assert admission.check(500, 16, priority=-1) is None
    # its own step: the scheduler packs no less important prompts into it
    assert admission.predict_ttft(500, -1) == pytest.approx(prefill_time(500))

    add(scheduler, 2000, priority=-1)  # the same priority does queue ahead
    assert admission.predict_ttft(500, -1) == pytest.approx(prefill_time(2500))


def test_fcfs_policy_high_priority_waits_behind_everyone():
    scheduler = make_scheduler(policy="fcfs")
    admission = controller(scheduler)
    for _ in range(25):
        add(scheduler, 1000, priority=5)
    assert admission.predict_ttft(500, -1) == pytest.approx(prefill_time(25_500))
    rejection = admission.check(500, 16, priority=-1)
    assert rejection is not None and "'high' tier" in rejection.message


def test_max_waiting_requests_is_enforced_even_when_disabled():
    scheduler = make_scheduler()
    admission = controller(scheduler, enabled=False, max_waiting_requests=3)
    for _ in range(2):
        add(scheduler, 10)
    assert admission.check(10, 16, priority=0) is None
    add(scheduler, 10)
    rejection = admission.check(10, 16, priority=0)
    assert rejection.reason == "queue_requests"
    assert "max_waiting_requests=3" in rejection.message
    assert rejection.retry_after_s >= 1


def test_max_waiting_tokens_is_enforced_even_when_disabled():
    scheduler = make_scheduler()
    admission = controller(scheduler, enabled=False, max_waiting_tokens=1000)
    add(scheduler, 600)
    add(scheduler, 300)
    assert admission.check(100, 16, priority=0) is None  # 900 + 100 = the bound
    rejection = admission.check(101, 16, priority=0)
    assert rejection.reason == "queue_tokens"
    assert "max_waiting_tokens=1000" in rejection.message


def test_disabled_admits_what_would_miss_the_slo():
    scheduler = make_scheduler()
    for _ in range(20):
        add(scheduler, 1000)
    assert controller(scheduler).check(100, 16, priority=0).reason == "slo"
    assert controller(scheduler, enabled=False).check(100, 16, priority=0) is None


def test_full_slots_add_the_running_requests_decode_time():
    scheduler = make_scheduler(max_num_seqs=2)
    add(scheduler, 50, max_tokens=300)
    add(scheduler, 50, max_tokens=1000)
    run_one_step(scheduler)  # both prefilled, one token each: 299 and 999 left
    assert len(scheduler.running) == 2 and scheduler.num_running_prefill_tokens() == 0
    admission = controller(scheduler)

    decode_step = FIXED_S + PER_TOKEN_S * 2  # a step of the two running decodes
    expected_prefill = prefill_time(100, num_decodes=2)
    # a free slot opens when the request closer to its max_tokens finishes
    assert admission.predict_ttft(100, 0) == pytest.approx(expected_prefill + 299 * decode_step)
    add(scheduler, 100)  # one waiting ahead: it takes that slot; this request waits for the other
    assert admission.predict_ttft(100, 0) == pytest.approx(prefill_time(200, 2) + 999 * decode_step)
    rejection = admission.check(100, 16, priority=0)
    assert rejection is not None and rejection.reason == "slo"


def test_free_slots_add_no_decode_wait():
    scheduler = make_scheduler(max_num_seqs=3)
    add(scheduler, 50, max_tokens=300)
    add(scheduler, 50, max_tokens=1000)
    run_one_step(scheduler)
    admission = controller(scheduler)
    assert admission.predict_ttft(100, 0) == pytest.approx(prefill_time(100, num_decodes=2))
    assert admission.check(100, 16, priority=0) is None


# ---- config --------------------------------------------------------------------------------------------


def test_default_tiers_map_priorities():
    config = AdmissionConfig()
    assert [config.tier(p).name for p in (-100, -1, 0, 1, 7, 2**40)] == [
        "high",
        "high",
        "normal",
        "low",
        "low",
        "low",
    ]


def test_custom_tiers_are_sorted_and_past_the_last_bound_is_the_last_tier():
    config = AdmissionConfig(tiers=[PriorityTier("batch", 10, 60.0), PriorityTier("interactive", 0, 0.5)])
    assert [t.name for t in config.tiers] == ["interactive", "batch"]
    assert config.tier(-3).name == "interactive"
    assert config.tier(0).name == "interactive"
    assert config.tier(1).name == "batch"
    assert config.tier(10).name == "batch"
    assert config.tier(11).name == "batch"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"tiers": []}, "at least one tier"),
        ({"tiers": [PriorityTier("high", 0, 0.0)]}, "'high'.*> 0"),
        ({"max_waiting_requests": 0}, "max_waiting_requests=0"),
        ({"max_waiting_tokens": 0}, "max_waiting_tokens=0"),
    ],
)
def test_admission_config_rejects_bad_values(options, match):
    with pytest.raises(ConfigError, match=match):
        AdmissionConfig(**options)


def test_parse_slos_sets_named_tiers_and_keeps_the_others():
    tiers = {t.name: t for t in parse_slos("high=0.5, normal=2")}
    defaults = {t.name: t for t in default_tiers()}
    assert tiers["high"] == PriorityTier("high", defaults["high"].max_priority, 0.5)
    assert tiers["normal"] == PriorityTier("normal", defaults["normal"].max_priority, 2.0)
    assert tiers["low"] == defaults["low"]
    assert parse_slos("") == default_tiers()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("urgent=1", r"TIER in \['high', 'low', 'normal'\], got 'urgent=1'"),
        ("high", "expected TIER=SECONDS.*got 'high'"),
        ("high=fast", "'fast' is not a number"),
    ],
)
def test_parse_slos_rejects_bad_input(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_slos(text)


def test_non_positive_slo_from_the_command_line_is_refused():
    with pytest.raises(ConfigError, match="'high'.*ttft_slo_s=-1.0 must be > 0"):
        AdmissionConfig(tiers=parse_slos("high=-1"))


def test_slo_margin_rejects_before_the_slo_itself():
    scheduler = make_scheduler()
    exact = controller(scheduler, tiers=[PriorityTier("normal", 2**31, 1.0)])
    margin = controller(scheduler, tiers=[PriorityTier("normal", 2**31, 1.0)], slo_margin=0.25)
    while exact.predict_ttft(100, 0) <= 0.75:
        add(scheduler, 100)
    assert exact.predict_ttft(100, 0) <= 1.0, "the step between two predictions is below 0.25 s"
    assert exact.check(100, 16, priority=0) is None
    assert margin.check(100, 16, priority=0).reason == "slo"


def test_a_prompt_too_long_for_the_slo_is_admitted_on_an_idle_engine():
    scheduler = make_scheduler()
    admission = controller(scheduler, tiers=[PriorityTier("normal", 2**31, 0.05)])
    assert admission.predict_ttft(2000, 0) > 0.05
    assert admission.check(2000, 16, priority=0) is None  # waiting would not make it faster
    add(scheduler, 500)
    assert admission.check(2000, 16, priority=0).reason == "slo"  # but a queue ahead of it would


def test_more_important_arrivals_stretch_the_prediction():
    now = [0.0]
    scheduler = make_scheduler(policy="priority")
    tiers = [PriorityTier("high", -1, 100.0), PriorityTier("low", 2**31, 2.0)]
    model = StepTimeModel(fixed_s=FIXED_S, per_token_s=PER_TOKEN_S)
    admission = AdmissionController(
        AdmissionConfig(tiers=tiers, slo_margin=0.0), scheduler, model, clock=lambda: now[0]
    )
    add(scheduler, 1500, priority=1)
    assert admission.check(100, 16, priority=1) is None
    for _ in range(40):  # a stream of high-priority work, each taking engine time
        now[0] += 0.05
        assert admission.check(200, 64, priority=-1) is None
    rejection = admission.check(100, 16, priority=1)
    assert rejection is not None and rejection.reason == "slo"
    now[0] += 60  # the window forgets them
    assert admission.check(100, 16, priority=1) is None


def _first_tokens(ids_and_ttfts: list[tuple[str, float]]) -> StepStats:
    stats = step_stats(0, 0.0)
    stats.first_token_request_ids = [rid for rid, _ in ids_and_ttfts]
    stats.time_to_first_token = [ttft for _, ttft in ids_and_ttfts]
    return stats


def test_calibration_adds_how_late_first_tokens_really_came():
    scheduler = make_scheduler()
    admission = controller(scheduler, tiers=[PriorityTier("normal", 2**31, 1.0)])
    for _ in range(6):
        add(scheduler, 100)
    model_s = admission.predict_ttft(100, 0)
    assert 0.5 < model_s < 1.0 and admission.check(100, 16, priority=0) is None
    # the real TTFTs of admitted requests came 0.4 s after their predictions
    for i in range(20):
        assert admission.check(100, 16, priority=0, waited_s=0.1, request_id=f"r{i}") is None
    for i in range(20):
        admission.record(_first_tokens([(f"r{i}", 0.1 + model_s + 0.4)]))
    admission.record(_first_tokens([("unknown", 99.0)]))  # not predicted here: ignored
    assert admission.calibration.extra_s == pytest.approx(0.4)
    rejection = admission.check(100, 16, priority=0)
    assert rejection is not None and rejection.reason == "slo"


def test_calibration_forgets_a_slow_spell():
    now = [0.0]
    calibration = PredictionCalibration(clock=lambda: now[0], max_age_s=60.0)
    for i in range(20):  # a busy machine: first tokens came 3 s late
        calibration.expect(f"slow{i}", 0.2)
        calibration.record(_first_tokens([(f"slow{i}", 3.2)]))
    assert calibration.extra_s == pytest.approx(3.0)
    now[0] = 30.0
    for i in range(20):  # the machine is quiet again; the slow residuals still dominate the p90
        calibration.expect(f"fast{i}", 0.2)
        calibration.record(_first_tokens([(f"fast{i}", 0.25)]))
    assert calibration.extra_s > 2.0
    now[0] = 61.0  # a minute after the slow spell: it no longer counts
    calibration.record(_first_tokens([]))
    assert calibration.extra_s == pytest.approx(0.05)
    now[0] = 200.0  # nothing recent at all: no correction
    calibration.record(_first_tokens([]))
    assert calibration.extra_s == 0.0


def test_step_time_model_separates_the_cost_of_decode_sequences():
    model = StepTimeModel()
    rng = random.Random(0)
    for _ in range(64):
        decodes = rng.randint(0, 32)
        tokens = decodes + rng.choice([0, 0, 64, 256])  # decode steps, and steps with a prompt chunk
        model.record(step_stats(tokens, 0.01 + 0.001 * tokens + 0.002 * decodes, decodes))
    assert model.fixed_s == pytest.approx(0.01, rel=0.05)
    assert model.per_token_s == pytest.approx(0.001, rel=0.05)
    assert model.per_decode_s == pytest.approx(0.002, rel=0.05)
