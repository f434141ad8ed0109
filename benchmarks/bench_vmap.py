"""statemap.vmap against hand-threaded jax.jit(jax.vmap(...)) on an RNN cell.

Run from the repository root:

    python benchmarks/bench_vmap.py

Prints the warm-call time of both contenders (timed interleaved, medians),
their ratio, the number of Python runs of the mapped function on a cold call,
and the warm overhead per extra broadcast state with 10, 100 and 1,000 states.
See benchmarks/README.md for what the figures mean.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from workload import D, H, RNNCell, Timing, interleaved, load, print_warm, raw_lane, us

import statemap

B = 32  # lanes
AXIS = "lanes"


def statemap_contender(cell: RNNCell):
    step = statemap.vmap(cell, state_in_axes={0: statemap.HiddenState})

    def call() -> tuple[jax.Array, jax.Array, jax.Array]:
        out = step(cell.x)
        return jax.block_until_ready((out, cell.h.value, cell.rng.value))

    return step, call


def raw_contender(cell: RNNCell):
    """The same step with every state threaded by hand through one jitted function."""
    lane = raw_lane(AXIS)

    @jax.jit
    def raw_step(W_h, W_x, h, x, key, extras):
        new_key, base = jax.random.split(key)
        mapped = jax.vmap(lane, in_axes=(0, 0, None, None, None, None), axis_name=AXIS)
        out, new_h = mapped(h, x, W_h, W_x, base, extras)
        return out, new_h, new_key

    # Start from the same values as the statemap cell, but own them here.
    carry = {"h": cell.h.value, "key": cell.rng.value}
    W_h, W_x, x = cell.W_h.value, cell.W_x.value, cell.x
    extras = tuple(s.value for s in cell.extras)

    def call() -> tuple[jax.Array, jax.Array, jax.Array]:
        out, carry["h"], carry["key"] = raw_step(W_h, W_x, carry["h"], x, carry["key"], extras)
        return jax.block_until_ready((out, carry["h"], carry["key"]))

    return call


def check_same_numbers() -> None:
    """One step of each from the same seed gives the same output, state and key."""
    cell = RNNCell(B, seed=0)
    step, _ = statemap_contender(cell)
    raw_out, raw_h, raw_key = raw_contender(RNNCell(B, seed=0))()
    out = step(cell.x)
    np.testing.assert_allclose(out, raw_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cell.h.value, raw_h, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(cell.rng.value, raw_key)


def cold_call() -> None:
    cell = RNNCell(B, seed=1)
    step, _ = statemap_contender(cell)
    start = time.perf_counter()
    jax.block_until_ready(step(cell.x))
    cold = time.perf_counter() - start
    runs_cold = cell.python_runs
    for _ in range(100):
        jax.block_until_ready(step(cell.x))
    print(f"cold call (trace + compile): {cold * 1e3:.0f} ms")
    print(f"Python runs of the function: {runs_cold} on the cold call, {cell.python_runs} after 100 more warm calls")
    assert runs_cold == 1 and cell.python_runs == 1, "a warm call ran the Python function again"


def warm_ratio(calls: int = 25, reps: int = 201) -> dict[str, Timing]:
    cell = RNNCell(B, seed=2)
    _, sm_call = statemap_contender(cell)
    raw_call = raw_contender(RNNCell(B, seed=2))
    for _ in range(50):
        sm_call()
        raw_call()
    return interleaved({"statemap": sm_call, "raw": raw_call}, calls, reps)


def scaling(reps: int = 61) -> None:
    print()
    print("warm overhead with n extra broadcast states (shape (4,), summed into the output):")
    print(f"{'n':>6}  {'statemap':>11}  {'raw':>11}  {'ratio':>6}  {'per state (wall)':>17}  {'per state (CPU)':>16}")
    for n in (10, 100, 1000):
        cell = RNNCell(B, seed=3, extra_states=n)
        _, sm_call = statemap_contender(cell)
        raw_call = raw_contender(RNNCell(B, seed=3, extra_states=n))
        for _ in range(10):
            sm_call()
            raw_call()
        times = interleaved({"statemap": sm_call, "raw": raw_call}, max(10, 2500 // n), reps)
        sm, raw = times["statemap"], times["raw"]
        print(
            f"{n:>6}  {us(sm.wall)}  {us(raw.wall)}  {sm.wall / raw.wall:6.3f}  "
            f"{(sm.wall - raw.wall) / n * 1e6:14.3f} µs  {(sm.cpu - raw.cpu) / n * 1e6:13.3f} µs"
        )
    print("per state = (statemap time - raw time) / n, by wall clock and by the calling thread's CPU time")


def main() -> None:
    print(f"statemap.vmap vs jax.jit(jax.vmap(...)): RNN cell, B={B} lanes, H={H}, D={D}")
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {len(jax.devices())} device(s); load {load()}")
    check_same_numbers()
    print("same seed, same numbers: statemap and raw agree (output, hidden state, key)")
    cold_call()
    times = warm_ratio()
    print()
    print("warm call, blocking on every call's results (medians of interleaved blocks):")
    print_warm("statemap.vmap", "jit(vmap) by hand", times)
    scaling()
    print(f"load at the end: {load()}")


if __name__ == "__main__":
    main()
