"""The RNN-cell workload and the interleaved timer both benchmarks share.

Both contenders compute exactly the same numbers: statemap's ``RNNCell`` reads
its parameters, hidden state and random key from ``State`` objects, and the
raw contender receives the same arrays as explicit arguments and derives the
lane keys the way statemap does (``split`` the parent key once, then
``fold_in(base, lane_index)`` per lane, then one ``RandomState.normal`` draw).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import statemap

H, D = 64, 16  # hidden size, input size
NOISE = 0.01  # scale of the per-lane noise added to the hidden state


def init_arrays(lanes: int, seed: int = 0) -> dict[str, jax.Array]:
    """Parameters (W_h, W_x), a zero hidden state and one input batch for ``lanes`` lanes."""
    k_h, k_x, k_in = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "W_h": jax.random.normal(k_h, (H, H)) / jnp.sqrt(H),
        "W_x": jax.random.normal(k_x, (D, H)) / jnp.sqrt(D),
        "h": jnp.zeros((lanes, H)),
        "x": jax.random.normal(k_in, (lanes, D)),
    }


def cell_math(h: jax.Array, x: jax.Array, W_h: jax.Array, W_x: jax.Array, noise: jax.Array) -> jax.Array:
    """One lane's update: ``tanh(h @ W_h + x @ W_x) + NOISE * noise``."""
    return jnp.tanh(h @ W_h + x @ W_x) + NOISE * noise


def lane_noise(base: jax.Array, lane_index: jax.Array) -> jax.Array:
    """The draw ``RandomState.normal((H,))`` makes in lane ``lane_index`` (by hand)."""
    lane_key = jax.random.fold_in(base, lane_index)
    _, key = jax.random.split(lane_key)  # RandomState.next_key: (advanced, drawn)
    return jax.random.normal(key, (H,))


class RNNCell:
    """The statemap side: two ParamStates, a HiddenState (lanes, H) and a RandomState."""

    def __init__(self, lanes: int, seed: int = 0, extra_states: int = 0):
        arrays = init_arrays(lanes, seed)
        self.W_h = statemap.ParamState(arrays["W_h"], name="W_h")
        self.W_x = statemap.ParamState(arrays["W_x"], name="W_x")
        self.h = statemap.HiddenState(arrays["h"], name="h")
        self.rng = statemap.RandomState(seed, name="rng")
        self.x = arrays["x"]
        self.extras = [statemap.State(jnp.full((4,), i / 1000.0)) for i in range(extra_states)]
        self.python_runs = 0

    def __call__(self, x: jax.Array) -> jax.Array:
        self.python_runs += 1
        noise = self.rng.normal((H,))
        self.h.value = cell_math(self.h.value, x, self.W_h.value, self.W_x.value, noise)
        if not self.extras:
            return self.h.value
        return self.h.value + jnp.stack([s.value for s in self.extras]).sum()


def raw_lane(axis_name: str) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """The raw contender's per-lane body: ``(h, x, W_h, W_x, base, extras) -> (out, new_h)``."""

    def lane(h, x, W_h, W_x, base, extras):
        new_h = cell_math(h, x, W_h, W_x, lane_noise(base, jax.lax.axis_index(axis_name)))
        out = new_h if not extras else new_h + jnp.stack(extras).sum()
        return out, new_h

    return lane


class Timing:
    """Median seconds per call: wall clock, and CPU time of the calling thread."""

    def __init__(self, wall: list[float], cpu: list[float]):
        self.wall = statistics.median(wall)
        self.cpu = statistics.median(cpu)


def interleaved(contenders: dict[str, Callable[[], object]], calls: int, reps: int) -> dict[str, Timing]:
    """Time each contender in alternating blocks of ``calls`` calls; medians over ``reps`` blocks.

    Each repetition runs one block of every contender, in an order that flips
    every repetition, so both see the same machine load. Each call must block
    on its own results. The calling thread's CPU time (``time.thread_time``)
    is recorded too: it is the Python-side cost of a call (dispatch and
    bookkeeping, not XLA's worker threads) and is far less sensitive to other
    processes on the machine than the wall clock.
    """
    names = list(contenders)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            fn = contenders[name]
            start, start_cpu = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                fn()
            wall[name].append((time.perf_counter() - start) / calls)
            cpu[name].append((time.thread_time() - start_cpu) / calls)
    return {name: Timing(wall[name], cpu[name]) for name in names}


def print_warm(statemap_label: str, raw_label: str, times: dict[str, Timing]) -> None:
    """Print the warm-call table of ``interleaved({"statemap": ..., "raw": ...})``."""
    sm, raw = times["statemap"], times["raw"]
    print(f"{'':20}  {'wall':>11}  {'caller CPU':>11}")
    print(f"{statemap_label:20}  {us(sm.wall)}  {us(sm.cpu)}")
    print(f"{raw_label:20}  {us(raw.wall)}  {us(raw.cpu)}")
    print(f"ratio statemap/raw: {sm.wall / raw.wall:.3f} (wall)")
    wall, cpu = (sm.wall - raw.wall) * 1e6, (sm.cpu - raw.cpu) * 1e6
    print(f"overhead per call: {wall:+.1f} µs wall, {cpu:+.1f} µs caller CPU")


def load() -> str:
    """The machine's 1-minute load average: figures taken under load are noisier."""
    return f"{os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)"


def us(seconds: float) -> str:
    """Seconds as microseconds, for the tables."""
    return f"{seconds * 1e6:8.1f} µs"
