"""statemap.shard_map against hand-threaded jax.jit(jax.shard_map(...)) and jax.pmap on an RNN cell.

Run from the repository root:

    python benchmarks/bench_shard_map.py

The script gives JAX 8 CPU devices itself and times 4 and 8 lanes, one lane
per device. The raw shard_map contender gets device-resident inputs (laid out
as its program keeps them), and so does statemap after its first call. Every
call blocks on its results: many unsynchronised multi-device calls can
deadlock XLA's CPU runtime on small machines (JAX-NOTES fact 10, JAX issue
25861). See benchmarks/README.md for what the figures mean.
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
from bench_pmap import CompileCounter  # noqa: E402
from bench_pmap import raw_contender as pmap_contender  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from workload import D, H, RNNCell, interleaved, load, print_warm, raw_lane, us  # noqa: E402

import statemap  # noqa: E402

AXIS = "devices"


def statemap_contender(cell: RNNCell, mesh: Mesh):
    step = statemap.shard_map(cell, AXIS, mesh=mesh, state_in_axes={0: statemap.HiddenState})
    x = jax.device_put(cell.x, NamedSharding(mesh, P(AXIS)))

    def call() -> tuple[jax.Array, jax.Array, jax.Array]:
        out = step(x)
        return jax.block_until_ready((out, cell.h.value, cell.rng.value))

    return call


def raw_contender(cell: RNNCell, mesh: Mesh):
    """The same step through ``jax.jit(jax.shard_map(...))``, every state threaded by hand."""
    lane = raw_lane(AXIS)

    def device_step(W_h, W_x, h, x, key):
        new_key, base = jax.random.split(key)
        out, new_h = lane(h, x, W_h, W_x, base, ())
        return out, new_h, new_key

    specs = {"in_specs": (P(), P(), P(AXIS), P(AXIS), P()), "out_specs": (P(AXIS), P(AXIS), P())}
    raw_step = jax.jit(jax.shard_map(device_step, mesh=mesh, **specs))

    def placed(value, spec):
        return jax.device_put(value, NamedSharding(mesh, spec))

    W_h, W_x = placed(cell.W_h.value, P()), placed(cell.W_x.value, P())
    x = placed(cell.x, P(AXIS))
    carry = {"h": placed(cell.h.value, P(AXIS)), "key": placed(cell.rng.value, P())}

    def call() -> tuple[jax.Array, jax.Array, jax.Array]:
        out, carry["h"], carry["key"] = raw_step(W_h, W_x, carry["h"], x, carry["key"])
        return jax.block_until_ready((out, carry["h"], carry["key"]))

    return call


def counted(counter: CompileCounter, fn) -> str:
    before = counter.snapshot()
    fn()
    return "{} traces, {} compilations".format(*(a - b for a, b in zip(counter.snapshot(), before)))


def run(lanes: int, counter: CompileCounter, calls: int = 20, reps: int = 101) -> None:
    print()
    print(f"--- {lanes} lanes on {lanes} CPU devices ---")
    mesh = Mesh(np.array(jax.devices()[:lanes]), (AXIS,))
    cell = RNNCell(lanes, seed=0)
    sm_call = statemap_contender(cell, mesh)
    raw_call = raw_contender(RNNCell(lanes, seed=0), mesh)
    pmap_call = pmap_contender(RNNCell(lanes, seed=0))
    # Same seed, same numbers, for all three.
    raw_result, pmap_result = raw_call(), pmap_call()
    before = counter.snapshot()
    start = time.perf_counter()
    sm_result = sm_call()
    cold = time.perf_counter() - start
    cold_traces, cold_compiles = (a - b for a, b in zip(counter.snapshot(), before))
    for other in (raw_result, pmap_result):
        for mine, theirs in zip(sm_result[:2], other[:2]):
            np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(sm_result[2]), np.asarray(other[2]))
    print("same seed, same numbers: statemap.shard_map, jit(shard_map) and jax.pmap agree (output, h, key)")
    print(
        f"cold call: {cold * 1e3:.0f} ms, {cell.python_runs} Python run(s) of the function, "
        f"{cold_traces} JAX traces, {cold_compiles} XLA compilations"
    )
    second = [counted(counter, c) for c in (sm_call, raw_call, pmap_call)]
    print(f"second call: statemap.shard_map {second[0]}; jit(shard_map) {second[1]}; jax.pmap {second[2]}")
    for _ in range(5):
        for contender in (sm_call, raw_call, pmap_call):
            contender()
    warm_before = counter.snapshot()
    times = interleaved({"statemap": sm_call, "raw": raw_call, "pmap": pmap_call}, calls, reps)
    traces, compiles = (a - b for a, b in zip(counter.snapshot(), warm_before))
    print_warm("statemap.shard_map", "jit(shard_map) hand", times)
    print(f"{'jax.pmap by hand':20}  {us(times['pmap'].wall)}  {us(times['pmap'].cpu)}")
    print(f"ratio statemap.shard_map/jax.pmap: {times['statemap'].wall / times['pmap'].wall:.3f} (wall)")
    print(
        f"{calls * reps} warm calls of each: {traces} traces, {compiles} compilations "
        f"(all contenders together); Python runs of the function: {cell.python_runs}"
    )
    assert compiles == 0 and traces == 0, "a warm call retraced or recompiled"
    assert cell.python_runs == 1, "a warm call ran the Python function again"


def main() -> None:
    counter = CompileCounter()
    print(f"statemap.shard_map vs jax.jit(jax.shard_map) and jax.pmap: RNN cell, one lane per device, H={H}, D={D}")
    print(f"jax {jax.__version__}, {jax.device_count()} CPU devices; load {load()}")
    for lanes in (4, 8):
        run(lanes, counter)
    print(f"\nload at the end: {load()}")


if __name__ == "__main__":
    main()
