"""A model of one step's execute time from its shape, fitted by least squares to measured steps.

    time ≈ fixed + per_token · scheduled tokens + per_sequence · sequences + per_context · context tokens

(`per_context` covers attention reading the KV cache), times a correction by the step's token count
(`token_correction`, fitted from the residuals): GEMM libraries pick kernels by the row count, so a
step of 3 tokens can be slower than one of 4, and a CUDA-graph pool pads a decode batch up to its
bucket; a line cannot follow that staircase, a table can. Lower weight precisions and KV formats
scale the whole step by a measured factor. The adaptive batching controller predicts with it, the
simulator runs on it, and it is stored as JSON per device under `adaptserve/sim/profiles/`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FEATURES = ("fixed", "per_token", "per_sequence", "per_context")


@dataclass(frozen=True, slots=True)
class StepShape:
    """The inputs of the model, and with `seconds` one measured point."""

    num_tokens: int  # tokens computed (prompt chunks + decodes)
    num_sequences: int  # sequences scheduled
    num_context_tokens: int  # K/V tokens attention reads
    seconds: float = 0.0  # measured execute time (0 when predicting)

    def features(self) -> tuple[float, float, float, float]:
        return (1.0, float(self.num_tokens), float(self.num_sequences), float(self.num_context_tokens))


@dataclass
class StepCostModel:
    fixed_s: float = 0.01  # per step: launches, sampling, host work not hidden
    per_token_s: float = 1e-4  # per computed token: the GEMMs
    per_sequence_s: float = 0.0  # per scheduled sequence: sampling, metadata
    per_context_s: float = 0.0  # per K/V token read by attention
    precision_scale: dict[str, float] = field(default_factory=dict)  # e.g. {"fp8": 0.6}; missing = 1
    kv_format_scale: dict[str, float] = field(default_factory=dict)  # e.g. {"int8": 0.9}; missing = 1
    # [[num_tokens, factor], ...] by num_tokens; linear between rows, the end rows' factor beyond them
    token_correction: list[list[float]] = field(default_factory=list)
    device: str = "unknown"  # what it was fitted on
    num_points: int = 0  # how many steps it was fitted to
    relative_error: float = 0.0  # mean |predicted - measured| / measured over those steps

    def predict(
        self,
        num_tokens: int,
        num_sequences: int,
        num_context_tokens: int,
        precision: str = "native",
        kv_format: str = "bf16",
    ) -> float:
        base = (
            self.fixed_s
            + self.per_token_s * num_tokens
            + self.per_sequence_s * num_sequences
            + self.per_context_s * num_context_tokens
        )
        scale = self.precision_scale.get(precision, 1.0) * self.kv_format_scale.get(kv_format, 1.0)
        return base * scale * self.correction(num_tokens)

    def correction(self, num_tokens: int) -> float:
        """The fitted factor for a step of `num_tokens` (1 without a table)."""
        if not self.token_correction:
            return 1.0
        table = np.asarray(self.token_correction, dtype=np.float64)  # [R, 2]
        return float(np.interp(num_tokens, table[:, 0], table[:, 1]))

    def predict_shape(self, shape: StepShape, precision: str = "native", kv_format: str = "bf16") -> float:
        return self.predict(
            shape.num_tokens, shape.num_sequences, shape.num_context_tokens, precision, kv_format
        )

    @classmethod
    def fit(cls, points: Iterable[StepShape], device: str = "unknown") -> StepCostModel:
        """Least squares with every coefficient >= 0: a coefficient that comes out negative is
        dropped and the rest refitted (an active-set pass, enough for four features); then the
        token-count correction table is fitted to what the line leaves over."""
        points = [p for p in points if p.seconds > 0]
        if len(points) < 4:
            raise ValueError(f"fitting a step cost model needs at least 4 measured steps, got {len(points)}")
        x = np.array([p.features() for p in points], dtype=np.float64)  # [N, 4]
        y = np.array([p.seconds for p in points], dtype=np.float64)  # [N]
        # relative error matters (short and long steps alike): weight each row by 1 / seconds
        w = 1.0 / y
        active = list(range(len(FEATURES)))
        coef = np.zeros(len(FEATURES))
        while active:
            solution, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
            if (solution >= 0).all():
                coef[:] = 0
                coef[active] = solution
                break
            active.pop(int(np.argmin(solution)))
        model = cls(*coef.tolist(), device=device, num_points=len(points))
        model.token_correction = _residual_table(points, x @ coef)  # x @ coef: [N], the line alone
        predicted = np.array([model.predict_shape(p) for p in points])  # [N]
        model.relative_error = float(np.mean(np.abs(predicted - y) / y))
        return model

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> StepCostModel:
        data = json.loads(Path(path).read_text())
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown step cost model field(s) {sorted(unknown)}")
        return cls(**data)


def _residual_table(points: list[StepShape], predicted: np.ndarray, min_points: int = 2) -> list[list[float]]:
    """Rows [token count, median of measured / predicted] per bin of steps: one bin per token count up
    to 64, then one per power of two (the row sits at the bin's median count). Bins with fewer than
    `min_points` steps are left out; [] when none has enough."""
    bins: dict[int, list[tuple[int, float]]] = {}
    for point, guess in zip(points, predicted, strict=True):
        n = point.num_tokens
        key = n if n <= 64 else (n - 1).bit_length()  # 65..128 -> 7, 129..256 -> 8, ...
        bins.setdefault(key, []).append((n, point.seconds / guess if guess > 0 else 1.0))
    rows = []
    for members in bins.values():
        if len(members) >= min_points:
            counts, ratios = zip(*members, strict=True)
            rows.append([float(np.median(counts)), float(np.median(ratios))])
    return sorted(rows)


class OnlineStepCost:
    """Refits a StepCostModel to the engine's recent steps as they come (a StatLogger), keeping the
    prior until enough steps of different sizes have been seen."""

    def __init__(self, prior: StepCostModel | None = None, window: int = 1024, refit_every: int = 32):
        self.model = prior or StepCostModel()
        self._points: list[StepShape] = []
        self.window = window
        self.refit_every = refit_every
        self._since_fit = 0

    def record(self, stats) -> None:
        if stats.num_scheduled_tokens == 0 or stats.execute_time <= 0:
            return
        self._points.append(
            StepShape(
                stats.num_scheduled_tokens, stats.num_sequences, stats.num_context_tokens, stats.execute_time
            )
        )
        if len(self._points) > self.window:
            del self._points[: len(self._points) - self.window]
        self._since_fit += 1
        if self._since_fit >= self.refit_every and len(self._points) >= 16:
            self._since_fit = 0
            tokens = [p.num_tokens for p in self._points]
            if max(tokens) - min(tokens) >= 16:  # shapes differ enough to separate the terms
                fitted = StepCostModel.fit(self._points, self.model.device)
                fitted.precision_scale, fitted.kv_format_scale = (
                    self.model.precision_scale,
                    self.model.kv_format_scale,
                )
                self.model = fitted
