"""Every figure of issue 12, the issue's old figure beside the one measured now.

Run from the repository root:

    python benchmarks/bench_issue12.py            # 2-6 min on a 2-core machine
    python benchmarks/bench_issue12.py --quick    # fewer repetitions, to check it runs

Each row is measured against raw JAX in the same run (``jax.jit(jax.vmap(...))``
with the states threaded by hand, from ``bench_vmap.py``), on the RNN cell of
``workload.py`` (B=32, H=64, one noise draw per lane) unless it says
otherwise. Traces are Python runs of the function, compilations are JAX's
``backend_compile`` events. See benchmarks/README.md for what each row means.
"""

from __future__ import annotations

import gc
import statistics
import sys
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from bench_vmap import raw_contender, statemap_contender
from workload import RNNCell, interleaved, load

import statemap

B = 32
QUICK = "--quick" in sys.argv
_EVENTS: Counter[str] = Counter()
_SECONDS: Counter[str] = Counter()


def _listen(event: str, duration: float, **kwargs: Any) -> None:
    name = event.rsplit("/", 1)[-1].replace("_duration", "")
    _EVENTS[name] += 1
    _SECONDS[name] += duration


jax.monitoring.register_event_duration_secs_listener(_listen)


def row(figure: str, old: str, new: str) -> None:
    print(f"| {figure} | {old} | {new} |")


def compiles() -> int:
    return _EVENTS["backend_compile"]


def warm_rows() -> None:
    calls, reps = (10, 11) if QUICK else (25, 101)
    base = (0.0, 0.0)  # the overhead (wall, CPU) without extra states
    for n, old in ((0, "1.06–1.17"), (100, "—")):
        cell, raw_cell = RNNCell(B, seed=2, extra_states=n), RNNCell(B, seed=2, extra_states=n)
        step, sm = statemap_contender(cell)
        raw = raw_contender(raw_cell)
        for _ in range(30):
            sm(), raw()
        contenders = {"statemap": sm, "raw": raw}
        if n == 0:
            contenders["floor"] = by_hand(step, cell)
        t = interleaved(contenders, calls if n == 0 else max(5, calls // 2), reps)
        s, r = t["statemap"], t["raw"]
        detail = f"{s.wall * 1e6:.0f} µs vs raw {r.wall * 1e6:.0f} µs; caller CPU +{(s.cpu - r.cpu) * 1e6:.1f} µs"
        if n == 0:
            f = t["floor"]
            detail += (
                f"; statemap's program called by hand with a hand-written write-back: "
                f"{f.wall / r.wall:.3f}, caller CPU +{(f.cpu - r.cpu) * 1e6:.1f} µs"
            )
        if n:  # the overhead each extra state adds, beyond the call's fixed overhead
            per = (s.wall - r.wall - base[0]) / n * 1e6, (s.cpu - r.cpu - base[1]) / n * 1e6
            detail += f"; per state {per[0]:+.3f} µs wall, {per[1]:+.3f} µs CPU (goal ≤ 0.3)"
        else:
            base = (s.wall - r.wall, s.cpu - r.cpu)
        label = "warm `vmap` call / `jax.jit(jax.vmap)`" + (f", {n} extra states" if n else "")
        row(label, old, f"**{s.wall / r.wall:.3f}** ({detail})")


def by_hand(step: Any, cell: RNNCell, program: Any = None) -> Callable[[], Any]:
    """The floor of any Python write-back: the plan's own compiled program, its two states written by hand.

    Reaches into statemap's private plan (``_plans.shortcut.plan``): a
    benchmark's view of what a call costs with no bookkeeping at all.
    ``program`` replaces the plan's (with the same inputs and outputs).
    """
    plan = step._plans.shortcut.plan
    refs, x = plan.refs, cell.x
    program = program or plan.program

    def call() -> Any:
        outs = program(x, *[ref()._value for ref in refs])
        cell.h._value, cell.rng._value = outs[1:]
        return jax.block_until_ready((outs[0], cell.h.value, cell.rng.value))

    return call


def gap_row() -> None:
    """Where the warm gap goes: Python before the program is dispatched, and donation.

    Python after the dispatch runs while XLA computes, and costs no wall
    time; Python before it delays the whole call. The lag from the call to
    the program's dispatch is timed by wrapping the plan's program (both
    contenders pay the wrapper). The plan's program compiled again without
    donation, called by hand, shows what donating the old hidden state costs.
    """
    calls, reps = (10, 11) if QUICK else (25, 101)
    cell = RNNCell(B, seed=6)
    step, sm = statemap_contender(cell)
    sm(), sm()  # the second call is warm and leaves the shortcut to its plan
    plan = step._plans.shortcut.plan
    program, dispatched = plan.program, [0.0]

    def stamped(*inputs: Any) -> Any:
        dispatched[0] = time.perf_counter()
        return program(*inputs)

    object.__setattr__(plan, "program", stamped)  # a benchmark's reach into a frozen private plan
    lags: dict[str, list[float]] = {"statemap": [], "by hand": []}
    for _ in range(200 if QUICK else 3000):
        for name, call in (("statemap", sm), ("by hand", by_hand(step, cell, stamped))):
            start = time.perf_counter()
            call()
            lags[name].append(dispatched[0] - start)
    object.__setattr__(plan, "program", program)
    other = RNNCell(B, seed=6)
    other_step, other_sm = statemap_contender(other)
    other_sm(), other_sm()
    plain = jax.jit(other_step._plans.shortcut.plan.program.__wrapped__)  # the same function, nothing donated
    contenders = {
        "donated": by_hand(step, cell),
        "not donated": by_hand(other_step, other, plain),
        "raw": raw_contender(RNNCell(B, seed=6)),
    }
    for _ in range(30):
        for fn in contenders.values():
            fn()
    t = interleaved(contenders, calls, reps)
    lag = {name: statistics.median(v) * 1e6 for name, v in lags.items()}
    row(
        "where the warm gap goes",
        "—",
        f"call to dispatch {lag['statemap']:.1f} µs (by hand {lag['by hand']:.1f} µs); the plan's program by hand: "
        f"{t['donated'].wall / t['raw'].wall:.3f} with the hidden state donated, "
        f"{t['not donated'].wall / t['raw'].wall:.3f} without",
    )


def timed_cold(make: Callable[[], Callable[[], Any]]) -> tuple[float, dict[str, float]]:
    """Seconds of the first call of a fresh contender, and JAX's own phases within it."""
    call = make()
    _SECONDS.clear()
    start = time.perf_counter()
    call()
    total = time.perf_counter() - start
    return total, dict(_SECONDS)


def cold_row() -> None:
    reps = 2 if QUICK else 5
    timed_cold(lambda: statemap_contender(RNNCell(B, seed=90))[1])  # JAX's own first-use costs
    timed_cold(lambda: raw_contender(RNNCell(B, seed=91)))
    sm, raw = [], []
    for rep in range(reps):
        pair = [("sm", statemap_contender), ("raw", raw_contender)]
        for name, make in pair if rep % 2 == 0 else reversed(pair):
            if name == "sm":
                sm.append(timed_cold(lambda: make(RNNCell(B, seed=100 + rep))[1]))  # type: ignore[index]
            else:
                raw.append(timed_cold(lambda: make(RNNCell(B, seed=100 + rep))))
    ratio = statistics.median(s[0] / r[0] for s, r in zip(sm, raw))
    row(
        "cold call (trace + compile) / `jax.jit(jax.vmap)` cold",
        "1.7",
        f"**{ratio:.2f}** (median of {reps}: {_phases(sm)}; raw: {_phases(raw)})",
    )


def _phases(runs: list[tuple[float, dict[str, float]]]) -> str:
    """Median total and JAX phases; the rest is Python around them (statemap: its own lane trace)."""
    total = statistics.median(t for t, _ in runs)
    names = {"jaxpr_trace": "JAX traces", "jaxpr_to_mlir_module": "lowering", "backend_compile": "compile"}
    parts = {label: statistics.median(p.get(name, 0.0) for _, p in runs) for name, label in names.items()}
    rest = total - sum(parts.values())
    shown = ", ".join(f"{label} {s * 1e3:.0f}" for label, s in parts.items())
    return f"{total * 1e3:.0f} ms = {shown}, other {rest * 1e3:.0f} ms"


def inline_row() -> None:
    calls, reps = (5, 5) if QUICK else (10, 41)
    cell = RNNCell(B, seed=4)
    built = statemap.vmap(cell, state_in_axes={0: statemap.HiddenState})

    def inline() -> Any:
        out = statemap.vmap(cell, state_in_axes={0: statemap.HiddenState})(cell.x)
        return jax.block_until_ready((out, cell.h.value, cell.rng.value))

    def warm() -> Any:
        return jax.block_until_ready((built(cell.x), cell.h.value, cell.rng.value))

    raw = raw_contender(RNNCell(B, seed=4))
    for _ in range(10):
        inline(), warm(), raw()
    t = interleaved({"inline": inline, "warm": warm, "raw": raw}, calls, reps)
    i, w, r = t["inline"].wall, t["warm"].wall, t["raw"].wall
    row(
        "`statemap.vmap(f, ...)(x)` built inline in a loop, same `f`",
        "88–124 ms a call (full trace and compile every time; warm 50–90 µs)",
        f"**{i * 1e6:.0f} µs** a call = {i / w:.2f}× a warm call ({w * 1e6:.0f} µs; raw {r * 1e6:.0f} µs); "
        f"Python runs of `f`: {cell.python_runs}",
    )


def memory_row() -> None:
    n = 20 if QUICK else 100
    cell = RNNCell(B, seed=5)

    def build_and_call() -> None:
        step = statemap.vmap(cell, state_in_axes={0: statemap.HiddenState})
        jax.block_until_ready(step(cell.x))

    raw_fn = jax.vmap(lambda h, x: jnp.tanh(h + x))

    def raw_build_and_call() -> None:
        jax.block_until_ready(jax.jit(raw_fn)(cell.h.value, cell.x[:, :1]))

    kept = {}
    for name, fn in (("statemap", build_and_call), ("raw", raw_build_and_call)):
        for _ in range(5):
            fn()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(n):
                fn()
            gc.collect()
            kept[name] = (tracemalloc.get_traced_memory()[0] - before) / n
        finally:
            tracemalloc.stop()
    row(
        "memory kept per mapping built and dropped in a loop",
        "0.4–1.7 MB, unbounded",
        f"**{kept['statemap'] / 1024:.1f} KiB** over {n} mappings (tracemalloc; raw `jax.jit(jax.vmap(f))` "
        f"rebuilt: {kept['raw'] / 1024:.1f} KiB); Python runs of `f`: {cell.python_runs}",
    )


def batch_sizes_row() -> None:
    sizes = range(1, 11 if QUICK else 71)
    scale = statemap.ParamState(jnp.float32(2.0), name="scale")
    runs = Counter[str]()

    def scaled(x: jax.Array) -> jax.Array:
        runs["statemap"] += 1
        return jnp.tanh(x * scale.value)

    def raw_scaled(x: jax.Array, s: jax.Array) -> jax.Array:
        runs["raw"] += 1
        return jnp.tanh(x * s)

    step = statemap.vmap(scaled)
    raw_step = jax.jit(jax.vmap(raw_scaled, in_axes=(0, None)))
    inputs = [jnp.ones((n, 4)) for n in [*sizes, *sizes]]
    counted = {}
    for name in ("statemap", "raw"):
        before, start = compiles(), time.perf_counter()
        for x in inputs:
            jax.block_until_ready(step(x) if name == "statemap" else raw_step(x, scale.value))
        counted[name] = (runs[name], compiles() - before, time.perf_counter() - start)
    (s_runs, s_comp, s_time), (r_runs, r_comp, r_time) = counted["statemap"], counted["raw"]
    row(
        f"variable-length batches: {len(sizes)} distinct batch sizes, each seen twice",
        "140 traces and compiles (64-plan LRU)",
        f"**{s_runs} traces, {s_comp} compiles** in {s_time:.1f} s (raw `jax.jit`: {r_runs} traces, "
        f"{r_comp} compiles in {r_time:.1f} s); plan capacity {statemap.StatefulTransform.plan_capacity} "
        f"signatures, then one warning",
    )


def refusal_row() -> None:
    n = 200 if QUICK else 1000
    states = [statemap.ParamState(jnp.zeros(()), name=f"p{i}") for i in range(n)]

    def write_all(x: jax.Array) -> jax.Array:
        for state in states:
            state.value = state.value + x  # one value per lane; nothing places it
        return x

    step = statemap.vmap(write_all)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        try:
            step(jnp.ones(B))
        except statemap.BatchAxisError:
            pass
        else:
            raise AssertionError("the batched writes were not refused")
        times.append(time.perf_counter() - start)
    row(
        f"refusing {n:,} unplaced batched writes (forgotten `state_in_axes`)",
        "quadratic: 200 states 11–16 s; 1,000 under `'ignore'` 448 s",
        f"**{times[0]:.2f} s** the first call (trace and one batched-ness probe), "
        f"{times[1] * 1e3:.1f} ms a repeat; raw JAX has no such check",
    )


def stall(warm: Callable[[], Any], cold: Callable[[], Any]) -> tuple[float, int, float]:
    """Run ``cold`` in a thread and ``warm`` here until it ends: (cold seconds, warm calls, longest one)."""
    done, started = threading.Event(), threading.Event()
    span: list[float] = []

    def cold_thread() -> None:
        started.set()
        start = time.perf_counter()
        cold()
        span.append(time.perf_counter() - start)
        done.set()

    latencies = []
    thread = threading.Thread(target=cold_thread)
    thread.start()
    started.wait()
    while not done.is_set():
        start = time.perf_counter()
        warm()
        latencies.append(time.perf_counter() - start)
    thread.join()
    return span[0], len(latencies), max(latencies)


def thread_row() -> None:
    results = {}
    for name, make in (("statemap", lambda c: statemap_contender(c)[1]), ("raw", raw_contender)):
        warm = make(RNNCell(B, seed=6))
        for _ in range(10):
            warm()
        results[name] = stall(warm, make(RNNCell(B, seed=7)))
    (s_cold, s_n, s_max), (r_cold, r_n, r_max) = results["statemap"], results["raw"]
    row(
        "a cold call in one thread, warm calls of another mapping in another",
        "warm calls stall for the whole trace + compile (0.6–0.9 s)",
        f"**{s_n} warm calls, longest {s_max * 1e3:.0f} ms** during a {s_cold:.2f} s cold call "
        f"(raw JAX: {r_n} warm calls, longest {r_max * 1e3:.0f} ms during {r_cold:.2f} s)",
    )


def main() -> None:
    print(f"issue 12 figures: jax {jax.__version__}, {jax.devices()[0].platform}; load {load()}")
    print()
    print("| figure | issue (old) | now |")
    print("|---|---|---|")
    warm_rows()
    gap_row()
    cold_row()
    inline_row()
    memory_row()
    batch_sizes_row()
    refusal_row()
    thread_row()
    print()
    print(f"load at the end: {load()}")


if __name__ == "__main__":
    main()
