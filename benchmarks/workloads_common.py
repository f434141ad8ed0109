"""What every workload of ``python -m benchmarks`` shares: contenders, the measurement, the rows.

A workload is a function ``(quick) -> Workload``: a title and a list of
contenders, each a ready-to-call step that blocks on all its results (the
output and every state it updates), plus a counter of the Python runs of the
user's function. ``measure`` times the cold call of each contender, then all
warm calls interleaved (``workload.interleaved``), and returns one ``Row`` per
contender.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from .workload import interleaved

RAW = "raw JAX"  # the contender every ratio is taken against
PEERS = {"brainstate": "brainstate", "Flax NNX": "flax.nnx", "Equinox": "equinox"}


@dataclass
class Counter:
    """Counts the Python runs of a user function (incremented by the function itself)."""

    count: int = 0

    def tick(self) -> None:
        self.count += 1

    def __call__(self) -> int:
        return self.count


@dataclass
class Contender:
    """One way of writing a workload: ``step()`` runs one call and blocks on everything it changed."""

    name: str
    api: str
    step: Callable[[], object]
    runs: Callable[[], int]


@dataclass
class Workload:
    """A workload's contenders, and notes for those that could not run.

    ``check``, when given, receives every contender's cold-call result by name
    and asserts that those meant to compute the same numbers do.
    """

    title: str
    contenders: list[Contender]
    notes: list[str] = field(default_factory=list)
    calls: int = 20
    reps: int = 15
    check: Callable[[dict[str, object]], None] | None = None


@dataclass
class Row:
    """The figures of one contender on one workload.

    ``warm_s`` is the median wall time of a warm call and ``cpu_s`` the
    calling thread's CPU time in it (its Python and dispatch cost, little
    disturbed by other processes); ``ratio`` is ``warm_s`` over raw JAX's.
    ``cold_runs`` counts the Python runs of the user's function during the
    cold call, ``warm_runs`` those per warm call (0 unless it retraces), and
    ``cold_s`` is the cold call's wall time (trace and compile).
    """

    workload: str
    name: str
    api: str
    warm_s: float
    cpu_s: float
    ratio: float
    cold_runs: int
    warm_runs: float
    cold_s: float


def peer(name: str) -> ModuleType | None:
    """The peer library's module when it is installed, else ``None`` (the peer is skipped)."""
    try:
        return importlib.import_module(PEERS[name])
    except ImportError:
        return None


def add_peers(workload: Workload, builders: dict[str, Callable[[ModuleType], list[Contender]]]) -> None:
    """Build each installed peer's contender; note the ones that are not installed."""
    for name, build in builders.items():
        module = peer(name)
        if module is None:
            workload.notes.append(f"{name} skipped: `{PEERS[name]}` is not installed (pip install -e '.[bench]')")
        else:
            workload.contenders.extend(build(module))


def measure(workload: Workload, warmup: int = 3) -> list[Row]:
    """Cold call of each contender, then warm calls interleaved; one row per contender.

    A contender that runs the user's Python function again on a warm call
    (it retraces, so one call takes as long as a cold one) is timed on its
    own, on a few calls, rather than slowing every repetition of the others.
    """
    cold: dict[str, tuple[float, int]] = {}
    first: dict[str, object] = {}
    for c in workload.contenders:
        start = time.perf_counter()
        first[c.name] = c.step()
        cold[c.name] = (time.perf_counter() - start, c.runs())
    if workload.check is not None:
        workload.check(first)
    retracing = {c.name: c for c in workload.contenders if retraces(c, warmup)}
    steady = {c.name: c.step for c in workload.contenders if c.name not in retracing}
    before = {c.name: c.runs() for c in workload.contenders}
    times = interleaved(steady, workload.calls, workload.reps)
    times.update(interleaved({n: c.step for n, c in retracing.items()}, 1, min(workload.reps, 3)))
    calls = {name: workload.calls * workload.reps if name in steady else min(workload.reps, 3) for name in times}
    return [
        Row(
            workload=workload.title,
            name=c.name,
            api=c.api,
            warm_s=times[c.name].wall,
            cpu_s=times[c.name].cpu,
            ratio=times[c.name].wall / times[RAW].wall,
            cold_runs=cold[c.name][1],
            warm_runs=(c.runs() - before[c.name]) / calls[c.name],
            cold_s=cold[c.name][0],
        )
        for c in workload.contenders
    ]


def retraces(contender: Contender, warmup: int) -> bool:
    """Warm ``contender`` up; whether its last warm-up call still ran the Python function."""
    # The second call may compile once more (a pmap state now arrives sharded).
    for _ in range(warmup - 1):
        contender.step()
    runs = contender.runs()
    contender.step()
    return contender.runs() > runs


def same_numbers(names: tuple[str, ...] = ("statemap",), rtol: float = 1e-6) -> Callable[[dict[str, object]], None]:
    """A ``Workload.check``: the named contenders' first results equal raw JAX's (same seed)."""

    def check(first: dict[str, object]) -> None:
        for name in names:
            for got, want in zip(first[name], first[RAW]):
                np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)

    return check
