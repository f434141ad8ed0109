"""Compiled programs: a whole simulation loop in one call, and the RNN cell under shard_map.

- loop: T time steps of the LIF ensemble (``workloads_lif.py``) as
  ``statemap.jit(lambda ts: statemap.for_loop(statemap.vmap(step), ts))``
  against ``jax.jit(lax.scan(jax.vmap(...)))`` with potentials and key
  threaded by hand.
- shard_map: the RNN cell (``workload.py``), one lane per device, as
  ``statemap.shard_map`` against ``jax.jit(jax.shard_map(...))`` with every
  input laid out on the devices as the program keeps it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import statemap

from .workload import RNNCell, raw_lane
from . import peers_brainstate, peers_equinox, peers_nnx
from .workloads_common import RAW, Contender, Counter, Workload, add_peers, same_numbers
from .workloads_models import lif

AXIS = "devices"


def statemap_loop(members: int, neurons: int, steps: int) -> Contender:
    """The mapped LIF step looped by ``statemap.for_loop`` inside ``statemap.jit``."""
    v = statemap.HiddenState(jnp.zeros((members, neurons)), name="v")
    rng = statemap.RandomState(0, name="rng")
    runs, ts = Counter(), jnp.arange(steps)

    def member(t: jax.Array) -> jax.Array:
        runs.tick()
        v.value, count = lif(v.value, rng.normal((neurons,)))
        return count

    step = statemap.vmap(member, in_axes=None, axis_size=members, state_in_axes={0: statemap.HiddenState})
    run = statemap.jit(lambda ts: statemap.for_loop(step, ts))

    def call() -> object:
        return jax.block_until_ready((run(ts), v.value, rng.value))

    return Contender("statemap", "jit(for_loop(vmap))", call, runs)


def raw_loop(members: int, neurons: int, steps: int) -> Contender:
    """``lax.scan`` over the hand-threaded mapped step, in one ``jax.jit``."""
    runs, ts = Counter(), jnp.arange(steps)

    def member(v, base, i):
        runs.tick()
        _, key = jax.random.split(jax.random.fold_in(base, i))  # statemap's lane key, then one draw
        return lif(v, jax.random.normal(key, (neurons,)))

    def step(carry, t):
        v, key = carry
        key, base = jax.random.split(key)
        v, counts = jax.vmap(member, in_axes=(0, None, 0))(v, base, jnp.arange(members))
        return (v, key), counts

    run = jax.jit(lambda v, key, ts: jax.lax.scan(step, (v, key), ts))
    carry = {"v": jnp.zeros((members, neurons)), "key": statemap.RandomState(0).value}

    def call() -> object:
        (carry["v"], carry["key"]), counts = run(carry["v"], carry["key"], ts)
        return jax.block_until_ready((counts, carry["v"], carry["key"]))

    return Contender(RAW, "jax.jit(scan(vmap))", call, runs)


def loop(quick: bool) -> Workload:
    """The compiled LIF simulation loop, every contender."""
    members, neurons, steps = (4, 100, 50) if quick else (16, 1000, 1000)
    workload = Workload(
        f"LIF loop, {steps} steps x {members} x {neurons} (jit)",
        [statemap_loop(members, neurons, steps), raw_loop(members, neurons, steps)],
        calls=2 if quick else 5,
        reps=3 if quick else 10,
        check=same_numbers(rtol=1e-5),
    )
    builders = {"brainstate": peers_brainstate.loop, "Flax NNX": peers_nnx.loop, "Equinox": peers_equinox.loop}
    add_peers(workload, {name: (lambda m, b=b: b(m, members, neurons, steps)) for name, b in builders.items()})
    return workload


def statemap_shard(mesh: Mesh) -> Contender:
    """``workload.RNNCell`` under ``statemap.shard_map``, the input already laid out on the mesh."""
    cell = RNNCell(mesh.size, seed=0)
    step = statemap.shard_map(cell, AXIS, mesh=mesh, state_in_axes={0: statemap.HiddenState})
    x = jax.device_put(cell.x, NamedSharding(mesh, P(AXIS)))

    def call() -> object:
        return jax.block_until_ready((step(x), cell.h.value, cell.rng.value))

    return Contender("statemap", "statemap.shard_map", call, lambda: cell.python_runs)


def raw_shard(mesh: Mesh) -> Contender:
    """The cell through ``jax.jit(jax.shard_map(...))``, every state threaded by hand."""
    cell, runs, lane = RNNCell(mesh.size, seed=0), Counter(), raw_lane(AXIS)

    def device_step(W_h, W_x, h, x, key):
        runs.tick()
        new_key, base = jax.random.split(key)
        out, new_h = lane(h, x, W_h, W_x, base, ())  # this device's block: one lane, shape (1, ...)
        return out, new_h, new_key

    specs = {"in_specs": (P(), P(), P(AXIS), P(AXIS), P()), "out_specs": (P(AXIS), P(AXIS), P())}
    step = jax.jit(jax.shard_map(device_step, mesh=mesh, **specs))
    put = {name: NamedSharding(mesh, spec) for name, spec in zip(("W_h", "W_x", "h", "x", "key"), specs["in_specs"])}
    args = {"W_h": cell.W_h.value, "W_x": cell.W_x.value, "h": cell.h.value, "x": cell.x, "key": cell.rng.value}
    carry = {name: jax.device_put(value, put[name]) for name, value in args.items()}

    def call() -> object:
        out, carry["h"], carry["key"] = step(*carry.values())
        return jax.block_until_ready((out, carry["h"], carry["key"]))

    return Contender(RAW, "jax.jit(jax.shard_map)", call, runs)


def shard(quick: bool) -> Workload:
    """The RNN cell, one lane per device of an 8-device mesh: statemap and raw JAX."""
    mesh = Mesh(jax.devices()[:8], (AXIS,))
    return Workload(
        "RNN cell, 8 devices (shard_map)",
        [statemap_shard(mesh), raw_shard(mesh)],
        calls=5 if quick else 10,
        reps=3 if quick else 15,
        check=same_numbers(),
    )
