"""Flax NNX's contenders, written the way its transforms guide shows.

Models are ``nnx.Module`` objects holding ``nnx.Param`` and other ``Variable``
types; ``nnx.vmap`` maps them with an ``nnx.StateAxes`` (which Variable types
are split, which broadcast), ``nnx.split_rngs`` gives every lane its own key
stream, and ``nnx.jit`` compiles the whole step and writes the new Variable
values back into the module.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

from .workload import H, cell_math, init_arrays
from .workloads_common import Contender, Counter
from .workloads_models import LR, init_mlp, mlp_loss, shards
from .workloads_models import lif as lif_math

NAME = "Flax NNX"
AXIS = "devices"


def cell_class(nnx: ModuleType) -> tuple[type, type]:
    """The RNN cell as an ``nnx.Module``, its hidden state a Variable type of its own."""

    class Hidden(nnx.Variable):
        pass

    class Cell(nnx.Module):
        def __init__(self, lanes: int, extra: int):
            arrays = init_arrays(lanes)
            self.W_h, self.W_x = nnx.Param(arrays["W_h"]), nnx.Param(arrays["W_x"])
            self.h = Hidden(arrays["h"])
            self.rngs = nnx.Rngs(noise=0)
            self.extras = nnx.List([nnx.Variable(jnp.full((4,), i / 1000.0)) for i in range(extra)])

        def __call__(self, x: jax.Array) -> jax.Array:
            noise = self.rngs.noise.normal((H,))
            self.h[...] = cell_math(self.h[...], x, self.W_h[...], self.W_x[...], noise)
            if not self.extras:
                return self.h[...]
            return self.h[...] + jnp.stack([s[...] for s in self.extras]).sum()

    return Cell, Hidden


def rnn(nnx: ModuleType, lanes: int, extra: int) -> list[Contender]:
    """The RNN cell (with ``extra`` broadcast Variables): ``nnx.jit(nnx.split_rngs(nnx.vmap))``."""
    Cell, Hidden = cell_class(nnx)
    runs = Counter()
    cell, x = Cell(lanes, extra), init_arrays(lanes)["x"]
    axes = nnx.StateAxes({Hidden: 0, nnx.RngState: 0, ...: None})

    @nnx.jit
    @nnx.split_rngs(splits=lanes)
    @nnx.vmap(in_axes=(axes, 0))
    def step(model, x):
        runs.tick()
        return model(x)

    def call() -> object:
        return jax.block_until_ready((step(cell, x), cell.h[...], cell.rngs.noise.count[...]))

    return [Contender(NAME, "nnx.jit(nnx.vmap)", call, runs)]


def lif_step(nnx: ModuleType, members: int, neurons: int) -> tuple[Any, ...]:
    """The LIF ensemble as an ``nnx.Module``, its ``split_rngs(vmap)`` step (not yet jitted), a counter."""
    _, Hidden = cell_class(nnx)

    class Ensemble(nnx.Module):
        def __init__(self):
            self.v = Hidden(jnp.zeros((members, neurons)))
            self.rngs = nnx.Rngs(noise=0)

        def __call__(self) -> jax.Array:
            self.v[...], count = lif_math(self.v[...], self.rngs.noise.normal((neurons,)))
            return count

    runs, model = Counter(), Ensemble()
    axes = nnx.StateAxes({Hidden: 0, nnx.RngState: 0, ...: None})

    @nnx.split_rngs(splits=members)
    @nnx.vmap(in_axes=(axes,), axis_size=members)
    def step(model):
        runs.tick()
        return model()

    return model, step, runs


def lif(nnx: ModuleType, members: int, neurons: int) -> list[Contender]:
    """One time step of the LIF ensemble: potentials split per member, the noise stream split too."""
    model, step, runs = lif_step(nnx, members, neurons)
    step = nnx.jit(step)

    def call() -> object:
        return jax.block_until_ready((step(model), model.v[...], model.rngs.noise.count[...]))

    return [Contender(NAME, "nnx.jit(nnx.vmap)", call, runs)]


def loop(nnx: ModuleType, members: int, neurons: int, steps: int) -> list[Contender]:
    """The LIF ensemble for ``steps`` time steps in one call: ``nnx.jit(nnx.scan(nnx.vmap))``."""
    model, step, runs = lif_step(nnx, members, neurons)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def body(model, t):
        return model, step(model)

    run, ts = nnx.jit(lambda model, ts: body(model, ts)[1]), jnp.arange(steps)

    def call() -> object:
        return jax.block_until_ready((run(model, ts), model.v[...], model.rngs.noise.count[...]))

    return [Contender(NAME, "nnx.jit(nnx.scan(nnx.vmap))", call, runs)]


def sgd(nnx: ModuleType, devices: int, batch: int) -> list[Contender]:
    """The data-parallel SGD step: the model and an ``nnx.Optimizer`` broadcast into ``nnx.pmap``."""
    import optax

    class MLP(nnx.Module):
        def __init__(self):
            for k, v in init_mlp().items():
                setattr(self, k, nnx.Param(v))

        def loss(self, x: jax.Array, y: jax.Array) -> jax.Array:
            return mlp_loss({k: getattr(self, k)[...] for k in ("w1", "b1", "w2")}, x, y)

    runs, model = Counter(), MLP()
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)
    x, y = shards(devices, batch)

    @nnx.pmap(axis_name=AXIS, in_axes=(None, None, 0, 0), out_axes=None)
    def step(model, optimizer, x, y):
        runs.tick()
        value, grads = nnx.value_and_grad(lambda m: m.loss(x, y))(model)
        optimizer.update(model, jax.lax.pmean(grads, AXIS))
        return jax.lax.pmean(value, AXIS)

    def call() -> object:
        return jax.block_until_ready((step(model, optimizer, x, y), nnx.state(model)))

    return [Contender(NAME, "nnx.pmap", call, runs)]
