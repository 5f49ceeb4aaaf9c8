"""Routers: which replica gets an arriving request. Small strategy objects over each replica's Load
as of the arrival; ties go to the lowest replica index, so a run is deterministic. Plain data in,
no engine import: the CLI lists the routers without loading torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Load:
    """What a router compares: requests not finished and tokens still to compute, as of some time."""

    num_unfinished: int
    outstanding_tokens: int  # prompt tokens before the first token + output tokens not yet received


class Router(Protocol):
    name: str

    def choose(self, loads: Sequence[Load]) -> int: ...  # index of the replica to send to


class RoundRobin:
    """Replicas in turn, whatever their load."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, loads: Sequence[Load]) -> int:
        index = self._next % len(loads)
        self._next = index + 1
        return index


class LeastLoaded:
    """The replica with the fewest unfinished requests."""

    name = "least_loaded"

    def choose(self, loads: Sequence[Load]) -> int:
        return min(range(len(loads)), key=lambda i: (loads[i].num_unfinished, i))


class LeastWork:
    """The replica with the fewest outstanding tokens (prompts not started + outputs not produced):
    a long prompt weighs more than a short one."""

    name = "least_work"

    def choose(self, loads: Sequence[Load]) -> int:
        return min(range(len(loads)), key=lambda i: (loads[i].outstanding_tokens, i))


ROUTERS = {cls.name: cls for cls in (RoundRobin, LeastLoaded, LeastWork)}


def make_router(name: str) -> Router:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; known: {', '.join(ROUTERS)}")
    return ROUTERS[name]()
