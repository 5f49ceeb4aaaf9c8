"""The simulator: the real engine (scheduler, KV bookkeeping, controllers) on a calibrated step cost
model instead of a model, for N replicas behind a router, measured as `bench serve` measures.

Names are imported on first use, so `adaptserve --help` (which lists `sim`) does not load the engine."""

import importlib

_EXPORTS = {
    "VirtualClock": "adaptserve.sim.clock",
    "SimulatedExecutor": "adaptserve.sim.executor",
    "Replica": "adaptserve.sim.replica",
    "ROUTERS": "adaptserve.sim.router",
    "make_router": "adaptserve.sim.router",
    "SimOutcome": "adaptserve.sim.simulation",
    "SimResult": "adaptserve.sim.simulation",
    "Simulation": "adaptserve.sim.simulation",
    "StepRecorder": "adaptserve.sim.calibrate",
    "calibrate": "adaptserve.sim.calibrate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'adaptserve.sim' has no attribute {name!r}")
