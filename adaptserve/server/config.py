"""Server settings: where to listen, how to drain, and admission control by priority tier."""

from __future__ import annotations

from dataclasses import dataclass, field

from adaptserve.config import ConfigError


@dataclass(frozen=True)
class PriorityTier:
    """Requests whose priority is <= `max_priority` (and above the previous tier's) share a TTFT SLO."""

    name: str
    max_priority: int  # lower priority value = more important, as in vLLM
    ttft_slo_s: float  # time-to-first-token objective, seconds


def default_tiers() -> list[PriorityTier]:
    return [
        PriorityTier("high", -1, 1.0),
        PriorityTier("normal", 0, 5.0),
        PriorityTier("low", 2**31, 20.0),
    ]


# priority names a client may send instead of a number
NAMED_PRIORITIES = {"high": -1, "normal": 0, "low": 1}


@dataclass
class AdmissionConfig:
    enabled: bool = True  # reject (429) requests predicted to miss their tier's TTFT SLO
    tiers: list[PriorityTier] = field(default_factory=default_tiers)  # ordered by max_priority
    max_waiting_requests: int = 1024  # queue bound in requests (always enforced)
    max_waiting_tokens: int = 1 << 20  # queue bound in prompt tokens (always enforced)
    slo_margin: float = 0.25  # admit only if predicted TTFT <= (1 - margin) * SLO: the model errs short

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ConfigError("admission.tiers must name at least one tier")
        self.tiers = sorted(self.tiers, key=lambda t: t.max_priority)
        for tier in self.tiers:
            if not tier.ttft_slo_s > 0:
                raise ConfigError(f"admission tier {tier.name!r}: ttft_slo_s={tier.ttft_slo_s} must be > 0")
        if not 0 <= self.slo_margin < 1:
            raise ConfigError(f"admission.slo_margin={self.slo_margin} must be in [0, 1)")
        if self.max_waiting_requests < 1:
            raise ConfigError(f"admission.max_waiting_requests={self.max_waiting_requests} must be >= 1")
        if self.max_waiting_tokens < 1:
            raise ConfigError(f"admission.max_waiting_tokens={self.max_waiting_tokens} must be >= 1")

    def tier(self, priority: int) -> PriorityTier:
        """The tier of a priority value; priorities past the last bound belong to the last tier."""
        return next((t for t in self.tiers if priority <= t.max_priority), self.tiers[-1])


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # address to listen on
    port: int = 8000  # TCP port
    served_model_name: str | None = None  # name in /v1/models; None = derived from the model path
    drain_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may run before they are failed
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)


def parse_slos(text: str, tiers: list[PriorityTier] | None = None) -> list[PriorityTier]:
    """`high=0.5,normal=2` → tiers with those TTFT SLOs (seconds); tiers not named keep their default."""
    tiers = {t.name: t for t in (tiers or default_tiers())}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in tiers:
            raise ConfigError(f"--ttft-slo: expected TIER=SECONDS with TIER in {sorted(tiers)}, got {item!r}")
        try:
            seconds = float(value)
        except ValueError:
            raise ConfigError(f"--ttft-slo: {value!r} is not a number of seconds") from None
        old = tiers[name]
        tiers[name] = PriorityTier(old.name, old.max_priority, seconds)
    return list(tiers.values())
