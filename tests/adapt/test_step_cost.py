"""The step cost model: fits known coefficients, keeps them non-negative, saves and loads."""

import numpy as np
import pytest

from adaptserve.adapt.step_cost import OnlineStepCost, StepCostModel, StepShape
from adaptserve.engine.stats import StepStats


def _points(model: StepCostModel, num: int, noise: float, seed: int = 0) -> list[StepShape]:
    rng = np.random.default_rng(seed)
    points = []
    for _ in range(num):
        seqs = int(rng.integers(1, 64))
        tokens = seqs + int(rng.integers(0, 2048))
        context = seqs * int(rng.integers(16, 2048))
        seconds = model.predict(tokens, seqs, context) * (1 + noise * rng.standard_normal())
        points.append(StepShape(tokens, seqs, context, seconds))
    return points


def test_fit_recovers_the_coefficients():
    truth = StepCostModel(fixed_s=0.006, per_token_s=2.5e-5, per_sequence_s=4e-5, per_context_s=3e-8)
    fitted = StepCostModel.fit(_points(truth, 400, noise=0.0))
    assert fitted.fixed_s == pytest.approx(truth.fixed_s, rel=1e-6)
    assert fitted.per_token_s == pytest.approx(truth.per_token_s, rel=1e-6)
    assert fitted.per_sequence_s == pytest.approx(truth.per_sequence_s, rel=1e-5)
    assert fitted.per_context_s == pytest.approx(truth.per_context_s, rel=1e-5)
    assert fitted.relative_error < 1e-9 and fitted.num_points == 400


def test_fit_with_noise_predicts_within_the_noise_and_never_goes_negative():
    truth = StepCostModel(fixed_s=0.01, per_token_s=1e-4, per_sequence_s=0.0, per_context_s=0.0)
    fitted = StepCostModel.fit(_points(truth, 300, noise=0.05))
    assert min(fitted.fixed_s, fitted.per_token_s, fitted.per_sequence_s, fitted.per_context_s) >= 0
    assert 0.02 < fitted.relative_error < 0.06
    assert fitted.predict(1000, 10, 5000) == pytest.approx(truth.predict(1000, 10, 5000), rel=0.05)


def test_fit_needs_enough_points():
    with pytest.raises(ValueError, match="at least 4"):
        StepCostModel.fit([StepShape(1, 1, 1, 0.1)] * 3)


def test_precision_and_kv_format_scale_the_step(tmp_path):
    model = StepCostModel(
        fixed_s=0.01, per_token_s=0.0, precision_scale={"fp8": 0.6}, kv_format_scale={"int8": 0.9}
    )
    assert model.predict(1, 1, 1, precision="fp8", kv_format="int8") == pytest.approx(0.0054)
    path = tmp_path / "profile.json"
    model.save(path)
    assert StepCostModel.load(path) == model
    path.write_text('{"fixed_s": 1, "typo": 2}')
    with pytest.raises(ValueError, match="typo"):
        StepCostModel.load(path)


def test_online_fit_replaces_the_prior_once_shapes_vary():
    truth = StepCostModel(fixed_s=0.004, per_token_s=5e-5)
    online = OnlineStepCost(prior=StepCostModel(fixed_s=1.0), refit_every=8)
    for point in _points(truth, 64, noise=0.0):
        online.record(
            StepStats(
                start_time=0.0,
                step_time=point.seconds,
                num_scheduled_tokens=point.num_tokens,
                num_prefill_tokens=0,
                num_decode_sequences=point.num_sequences,
                num_generation_tokens=point.num_sequences,
                num_preemptions=0,
                prefix_cache_queries=0,
                prefix_cache_hits=0,
                execute_time=point.seconds,
                num_context_tokens=point.num_context_tokens,
                num_sequences=point.num_sequences,
            )
        )
    assert online.model.fixed_s == pytest.approx(0.004, rel=1e-4)
