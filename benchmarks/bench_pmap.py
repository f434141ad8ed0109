"""statemap.pmap against hand-threaded jax.pmap on an RNN cell, one lane per device.

Run from the repository root:

    python benchmarks/bench_pmap.py

The script gives JAX 8 CPU devices itself and times 4 and 8 lanes. Every call
blocks on its results: many unsynchronised multi-device calls can deadlock
XLA's CPU runtime on small machines (docs: JAX-NOTES fact 10, JAX issue 25861).
See benchmarks/README.md for what the figures mean.
"""

from __future__ import annotations

import os

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_cpu_collective_timeout_seconds=60")
_existing = os.environ.get("XLA_FLAGS", "").split()
_names = {flag.split("=")[0] for flag in _existing}
os.environ["XLA_FLAGS"] = " ".join(_existing + [f for f in _FLAGS if f.split("=")[0] not in _names])

import time  # noqa: E402

import jax  # noqa: E402  (XLA_FLAGS must be set first)
import numpy as np  # noqa: E402
from workload import D, H, RNNCell, interleaved, load, print_warm, raw_lane  # noqa: E402

import statemap  # noqa: E402

AXIS = "devices"


class CompileCounter:
    """Counts traces and XLA compilations through JAX's monitoring events."""

    def __init__(self) -> None:
        self.traces = 0
        self.compiles = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: object) -> None:
        if event.endswith("/jaxpr_trace_duration"):
            self.traces += 1
        elif event.endswith("/backend_compile_duration"):
            self.compiles += 1

    def snapshot(self) -> tuple[int, int]:
        return self.traces, self.compiles


def statemap_contender(cell: RNNCell):
    step = statemap.pmap(cell, axis_name=AXIS, state_in_axes={0: statemap.HiddenState})

    def call() -> tuple[jax.Array, jax.Array, jax.Array]:
        out = step(cell.x)
        return jax.block_until_ready((out, cell.h.value, cell.rng.value))

    return step, call


def raw_contender(cell: RNNCell):
    """The same step through ``jax.pmap``, every state threaded by hand, keys split on device."""
    lane = raw_lane(AXIS)

    def device_step(W_h, W_x, h, x, key):
        new_key, base = jax.random.split(key)
        out, new_h = lane(h, x, W_h, W_x, base, ())
        return out, new_h, new_key

    raw_step = jax.pmap(device_step, axis_name=AXIS, in_axes=(None, None, 0, 0, None), out_axes=(0, 0, None))
    carry = {"h": cell.h.value, "key": cell.rng.value}
    W_h, W_x, x = cell.W_h.value, cell.W_x.value, cell.x

    def call() -> tuple[jax.Array, jax.Array, jax.Array]:
        out, carry["h"], carry["key"] = raw_step(W_h, W_x, carry["h"], x, carry["key"])
        return jax.block_until_ready((out, carry["h"], carry["key"]))

    return call


def run(lanes: int, counter: CompileCounter, calls: int = 20, reps: int = 101) -> None:
    print()
    print(f"--- {lanes} lanes on {lanes} CPU devices ---")
    # Same seed, same numbers.
    cell = RNNCell(lanes, seed=0)
    step, sm_call = statemap_contender(cell)
    raw_call = raw_contender(RNNCell(lanes, seed=0))
    raw_out, raw_h, raw_key = raw_call()
    before = counter.snapshot()
    start = time.perf_counter()
    out = jax.block_until_ready(step(cell.x))
    cold = time.perf_counter() - start
    cold_traces, cold_compiles = (a - b for a, b in zip(counter.snapshot(), before))
    np.testing.assert_allclose(out, raw_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cell.h.value, raw_h, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(cell.rng.value, raw_key)
    print("same seed, same numbers: statemap.pmap and jax.pmap agree (output, hidden state, key)")
    print(
        f"cold call: {cold * 1e3:.0f} ms, {cell.python_runs} Python run(s) of the function, "
        f"{cold_traces} JAX traces, {cold_compiles} XLA compilations"
    )
    # The second call compiles once more, for statemap and jax.pmap alike: the
    # hidden state now arrives sharded over the devices (the first call's
    # output) rather than as a single-device array. After that, nothing may.
    seen = []
    for contender in (sm_call, raw_call):
        before = counter.snapshot()
        contender()
        seen.append("{} traces, {} compilations".format(*(a - b for a, b in zip(counter.snapshot(), before))))
    print(f"second call (hidden state now sharded): statemap {seen[0]}; jax.pmap {seen[1]}")
    for _ in range(5):
        sm_call()
        raw_call()
    warm_before = counter.snapshot()
    times = interleaved({"statemap": sm_call, "raw": raw_call}, calls, reps)
    traces, compiles = (a - b for a, b in zip(counter.snapshot(), warm_before))
    warm_calls = calls * reps
    print_warm("statemap.pmap", "jax.pmap by hand", times)
    print(
        f"{warm_calls} warm calls of each: {traces} traces, {compiles} compilations "
        f"(both contenders together); Python runs of the function: {cell.python_runs}"
    )
    assert compiles == 0 and traces == 0, "a warm call retraced or recompiled"
    assert cell.python_runs == 1, "a warm call ran the Python function again"


def main() -> None:
    counter = CompileCounter()
    print(f"statemap.pmap vs jax.pmap: RNN cell, one lane per device, H={H}, D={D}")
    print(f"jax {jax.__version__}, {jax.device_count()} CPU devices; load {load()}")
    for lanes in (4, 8):
        run(lanes, counter)
    print(f"\nload at the end: {load()}")


if __name__ == "__main__":
    main()
