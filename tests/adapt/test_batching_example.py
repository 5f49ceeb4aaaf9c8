"""examples/adaptive_batching.py end to end on the simulator: on its bursty trace with long prompts the
batching controller switches knobs, keeps p90 TPOT under the 30 ms SLO that the static defaults break,
and so serves more requests within the SLO."""

import importlib.util
from argparse import Namespace
from pathlib import Path

EXAMPLE = Path(__file__).parents[2] / "examples" / "adaptive_batching.py"


def load_example():
    spec = importlib.util.spec_from_file_location("adaptive_batching", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_controller_meets_the_tpot_slo_that_the_defaults_break(capsys):
    example = load_example()
    args = Namespace(rate=22.0, num=500, ttft_ms=2000.0, tpot_ms=30.0, seed=1)
    simulation, adaptive = example.run(args, ("batching",))
    _, static = example.run(args, ())
    switches = simulation.replicas[0].engine.control.switches.recent
    assert {s.knob for s in switches} >= {"max_num_batched_tokens", "prefill_chunk"}
    assert adaptive.metrics["p90_tpot_ms"] < 30.0 < static.metrics["p90_tpot_ms"]
    assert adaptive.metrics["request_goodput"] > 1.1 * static.metrics["request_goodput"]
    example.print_timeline(simulation, adaptive.time_series[0], every=5.0)
    out = capsys.readouterr().out
    assert "switches" in out and "max_num_batched_tokens" in out
