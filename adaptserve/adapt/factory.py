"""Builds the controllers an engine's ControlConfig names, with the telemetry and the online step
cost model they share. The server, `LLM(...)` and the simulator all come through here."""

from __future__ import annotations

import logging

from adaptserve.adapt.batching import BatchingController, BatchingTargets
from adaptserve.adapt.step_cost import OnlineStepCost, StepCostModel
from adaptserve.adapt.telemetry import Telemetry

logger = logging.getLogger(__name__)


def enable_configured_control(engine, prior: StepCostModel | None = None):
    """Attach the configured controllers to `engine` (an LLMEngine); returns its ControlPlane or None.
    `prior`: a step cost model to start from (a device profile, or the simulator's model)."""
    control = engine.config.control
    compressed = getattr(engine.runner, "compressed_kv", None) is not None
    kv_adaptive = engine.config.cache.kv_policy == "adaptive" and compressed
    if not control.controllers and not kv_adaptive:
        return None
    telemetry = Telemetry(window_s=control.telemetry_window_s, scheduler=engine.scheduler)
    cost = OnlineStepCost(prior)
    engine.stat_loggers.append(cost)
    controllers = []
    for name in control.controllers:
        if name == "batching":
            controllers.append(BatchingController(batching_targets(engine), cost_source=cost))
        elif name == "prewarm":
            prewarm = _prewarm(engine)
            if prewarm is not None:
                controllers.append(prewarm)
    if kv_adaptive:
        controllers.append(_kv_policy(engine, telemetry))
    plane = engine.enable_control(controllers, telemetry, control.control_interval_s)
    plane.step_cost = cost
    return plane


def batching_targets(engine) -> BatchingTargets:
    """The SLOs from the config; the configured batch limits are the ceilings."""
    control = engine.config.control
    max_seqs, max_tokens = engine.knob_ceilings
    return BatchingTargets(
        tpot_slo_s=control.tpot_slo_s,
        ttft_slo_s=control.ttft_slo_s,
        min_budget=min(64, max_tokens),
        max_budget=max_tokens,
        min_seqs=min(4, max_seqs),
        max_seqs=max_seqs,
    )


def _prewarm(engine):
    from adaptserve.adapt.prewarm import PrewarmController, RunnerGraphPool

    pool = RunnerGraphPool.from_runner(engine.runner) if hasattr(engine.runner, "graphs") else None
    if pool is None:
        logger.info("prewarm: no CUDA-graph pool on this executor; the prewarm controller is not started")
        return None
    return PrewarmController(pool)


def _kv_policy(engine, telemetry: Telemetry):
    """The KV format policy over the configured ladder, fed the runner's sampled KV error."""
    from adaptserve.adapt.kv_policy import KVFormatPolicy, KVPolicySettings

    cache = engine.config.cache
    policy = KVFormatPolicy(
        KVPolicySettings(ladder=tuple(cache.kv_ladder), error_budget=cache.kv_error_budget)
    )
    engine.stat_loggers.append(KVErrorReporter(engine, telemetry, policy))
    return policy


class KVErrorReporter:
    """After each step with a new sample, hands telemetry the attention-output error of the format new
    KV blocks are written in, and the policy every format's error, as the runner's monitor measured them."""

    def __init__(self, engine, telemetry: Telemetry, policy):
        self.engine = engine
        self.telemetry = telemetry
        self.policy = policy
        self._seen = 0

    def record(self, stats) -> None:
        monitor = self.engine.runner.attention.monitor
        if monitor.num_samples == self._seen:
            return
        self._seen = monitor.num_samples
        self.policy.format_errors = dict(monitor.attention_error)
        error = monitor.error(self.engine.knobs.kv_format)
        if error is not None:
            self.telemetry.report("kv_error", error, self.engine.clock())
