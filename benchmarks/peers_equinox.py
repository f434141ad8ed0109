"""Equinox's contenders, written the way its docs show: pure functions of modules and keys.

An Equinox model is an immutable ``eqx.Module`` pytree, so state is threaded by
hand: the step takes the model, the state and a PRNG key, and returns the new
ones. ``eqx.filter_jit`` compiles it, ``eqx.filter_vmap``/``filter_pmap`` map
it, with ``jax.random.split(key, lanes)`` giving each lane its key.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import jax
import jax.numpy as jnp

from .workload import H, cell_math, init_arrays
from .workloads_common import Contender, Counter
from .workloads_models import LR, init_mlp, mlp_loss, shards
from .workloads_models import lif as lif_math

NAME = "Equinox"
AXIS = "devices"


def rnn(eqx: ModuleType, lanes: int, extra: int) -> list[Contender]:
    """The RNN cell (with ``extra`` broadcast arrays in the module): ``filter_jit(filter_vmap)``."""
    class Cell(eqx.Module):
        W_h: jax.Array
        W_x: jax.Array
        extras: tuple[jax.Array, ...]

        def __call__(self, h: jax.Array, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
            new_h = cell_math(h, x, self.W_h, self.W_x, jax.random.normal(key, (H,)))
            return (new_h + jnp.stack(self.extras).sum() if self.extras else new_h), new_h

    runs, arrays = Counter(), init_arrays(lanes)
    cell = Cell(arrays["W_h"], arrays["W_x"], tuple(jnp.full((4,), i / 1000.0) for i in range(extra)))

    @eqx.filter_jit
    def step(cell, h, x, key):
        runs.tick()
        key, sub = jax.random.split(key)
        out, h = eqx.filter_vmap(Cell.__call__, in_axes=(None, 0, 0, 0))(cell, h, x, jax.random.split(sub, lanes))
        return out, h, key

    carry = {"h": arrays["h"], "key": jax.random.key(0)}

    def call() -> object:
        out, carry["h"], carry["key"] = step(cell, carry["h"], arrays["x"], carry["key"])
        return jax.block_until_ready((out, carry["h"], carry["key"]))

    return [Contender(NAME, "filter_jit(filter_vmap)", call, runs)]


def lif_member(neurons: int) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """One member's LIF step as a pure function of its potentials and its key."""

    def member(v: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        return lif_math(v, jax.random.normal(key, (neurons,)))

    return member


def lif(eqx: ModuleType, members: int, neurons: int) -> list[Contender]:
    """One time step of the LIF ensemble: potentials and key threaded by hand, a key per member."""
    runs, member = Counter(), lif_member(neurons)

    @eqx.filter_jit
    def step(v, key):
        runs.tick()
        key, sub = jax.random.split(key)
        v, counts = eqx.filter_vmap(member)(v, jax.random.split(sub, members))
        return counts, v, key

    carry = {"v": jnp.zeros((members, neurons)), "key": jax.random.key(0)}

    def call() -> object:
        counts, carry["v"], carry["key"] = step(carry["v"], carry["key"])
        return jax.block_until_ready((counts, carry["v"], carry["key"]))

    return [Contender(NAME, "filter_jit(filter_vmap)", call, runs)]


def loop(eqx: ModuleType, members: int, neurons: int, steps: int) -> list[Contender]:
    """The LIF ensemble for ``steps`` time steps in one call: ``filter_jit(lax.scan(filter_vmap))``."""
    runs, member = Counter(), lif_member(neurons)

    def body(carry, t):
        v, key = carry
        key, sub = jax.random.split(key)
        v, counts = eqx.filter_vmap(member)(v, jax.random.split(sub, members))
        return (v, key), counts

    @eqx.filter_jit
    def run(v, key, ts):
        runs.tick()
        return jax.lax.scan(body, (v, key), ts)

    carry, ts = {"v": jnp.zeros((members, neurons)), "key": jax.random.key(0)}, jnp.arange(steps)

    def call() -> object:
        (carry["v"], carry["key"]), counts = run(carry["v"], carry["key"], ts)
        return jax.block_until_ready((counts, carry["v"], carry["key"]))

    return [Contender(NAME, "filter_jit(lax.scan(filter_vmap))", call, runs)]


def sgd(eqx: ModuleType, devices: int, batch: int) -> list[Contender]:
    """The data-parallel SGD step: the model broadcast into ``filter_pmap``, the new one returned."""

    class MLP(eqx.Module):
        w1: jax.Array
        b1: jax.Array
        w2: jax.Array

        def loss(self, x: jax.Array, y: jax.Array) -> jax.Array:
            return mlp_loss({"w1": self.w1, "b1": self.b1, "w2": self.w2}, x, y)

    runs = Counter()
    x, y = shards(devices, batch)

    @eqx.filter_pmap(axis_name=AXIS, in_axes=(None, 0, 0), out_axes=None)
    def step(model, x, y):
        runs.tick()
        value, grads = eqx.filter_value_and_grad(MLP.loss)(model, x, y)
        grads = jax.lax.pmean(grads, AXIS)
        model = eqx.apply_updates(model, jax.tree.map(lambda g: -LR * g, grads))
        return jax.lax.pmean(value, AXIS), model

    carry = {"model": MLP(**init_mlp())}

    def call() -> object:
        value, carry["model"] = step(carry["model"], x, y)
        return jax.block_until_ready((value, carry["model"]))

    return [Contender(NAME, "filter_pmap", call, runs)]
