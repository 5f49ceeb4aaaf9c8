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
    if not control.controllers:
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
