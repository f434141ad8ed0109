"""brainstate's contenders, written the way its docs show: ``State`` objects and ``vmap2``/``pmap2``.

The mapped function reads and writes closed-over ``brainstate.State`` objects;
``brainstate.transform.vmap2``/``pmap2`` (its ``StatefulMapping``) split the
states selected by ``state_in_axes``, give every lane its own key from each
``brainstate.random.RandomState``, and write the results back.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

from .workload import H, cell_math, init_arrays
from .workloads_common import Contender, Counter
from .workloads_models import LR, init_mlp, mlp_loss, shards
from .workloads_models import lif as lif_math

NAME = "brainstate"
AXIS = "devices"


class Cell:
    """The RNN cell of ``workload.py`` on brainstate states."""

    def __init__(self, bs: ModuleType, lanes: int, extra: int, runs: Counter):
        arrays = init_arrays(lanes)
        self.W_h, self.W_x = bs.ParamState(arrays["W_h"]), bs.ParamState(arrays["W_x"])
        self.h = bs.HiddenState(arrays["h"])
        self.rng = bs.random.RandomState(0)
        self.extras = [bs.State(jnp.full((4,), i / 1000.0)) for i in range(extra)]
        self.x, self.runs = arrays["x"], runs

    def __call__(self, x: jax.Array) -> jax.Array:
        self.runs.tick()
        noise = self.rng.normal(size=(H,))
        self.h.value = cell_math(self.h.value, x, self.W_h.value, self.W_x.value, noise)
        if not self.extras:
            return self.h.value
        return self.h.value + jnp.stack([s.value for s in self.extras]).sum()


def rnn(bs: ModuleType, lanes: int, extra: int) -> list[Contender]:
    """``vmap2`` as is (it traces and runs eagerly on every call), and under ``transform.jit``."""
    from brainstate.util.filter import OfType

    contenders = []
    for jitted in (False, True):
        runs = Counter()
        cell = Cell(bs, lanes, extra, runs)
        hidden = {0: OfType(bs.HiddenState)}
        step = bs.transform.vmap2(cell, state_in_axes=hidden, state_out_axes=hidden)
        step = bs.transform.jit(step) if jitted else step
        contenders.append(Contender(*labels(jitted, "vmap2"), stepper(step, (cell.x,), cell.h, cell.rng), runs))
    return contenders


def labels(jitted: bool, mapping: str) -> tuple[str, str]:
    """Contender name and API of brainstate's ``mapping`` with or without ``transform.jit``."""
    if jitted:
        return f"{NAME} jit", f"transform.jit({mapping})"
    return NAME, f"transform.{mapping}"


def stepper(step: Callable[..., object], args: tuple[object, ...], *states: Any) -> Callable[[], object]:
    """One call of ``step(*args)``, blocked on its output and the states' new values."""

    def call() -> object:
        return jax.block_until_ready((step(*args), *(s.value for s in states)))

    return call


def lif_step(bs: ModuleType, members: int, neurons: int, timed: bool = False) -> tuple[Any, ...]:
    """The LIF ensemble's ``vmap2`` step (taking a time step ``t`` when ``timed``), its states and counter."""
    from brainstate.util.filter import OfType

    runs = Counter()
    v, rng = bs.HiddenState(jnp.zeros((members, neurons))), bs.random.RandomState(0)

    def member(*t: jax.Array) -> jax.Array:
        runs.tick()
        v.value, count = lif_math(v.value, rng.normal(size=(neurons,)))
        return count

    hidden = {0: OfType(bs.HiddenState)}
    in_axes = None if timed else ()
    step = bs.transform.vmap2(member, in_axes=in_axes, axis_size=members, state_in_axes=hidden, state_out_axes=hidden)
    return step, v, rng, runs


def lif(bs: ModuleType, members: int, neurons: int) -> list[Contender]:
    """One time step of the LIF ensemble: potentials split per member, a key per member."""
    contenders = []
    for jitted in (False, True):
        step, v, rng, runs = lif_step(bs, members, neurons)
        step = bs.transform.jit(step) if jitted else step
        contenders.append(Contender(*labels(jitted, "vmap2"), stepper(step, (), v, rng), runs))
    return contenders


def loop(bs: ModuleType, members: int, neurons: int, steps: int) -> list[Contender]:
    """The LIF ensemble for ``steps`` time steps in one compiled call: ``jit(for_loop(vmap2))``."""
    step, v, rng, runs = lif_step(bs, members, neurons, timed=True)
    run = bs.transform.jit(lambda ts: bs.transform.for_loop(step, ts))
    return [Contender(*labels(True, "for_loop(vmap2)"), stepper(run, (jnp.arange(steps),), v, rng), runs)]


def sgd(bs: ModuleType, devices: int, batch: int) -> list[Contender]:
    """The data-parallel SGD step: ParamStates broadcast, ``transform.grad`` over them, ``pmap2``."""
    params = {k: bs.ParamState(v) for k, v in init_mlp().items()}
    x, y = shards(devices, batch)
    runs = Counter()

    def loss(x, y):
        return mlp_loss({k: p.value for k, p in params.items()}, x, y)

    def step(x, y):
        runs.tick()
        grads, value = bs.transform.grad(loss, grad_states=params, return_value=True)(x, y)
        for k, g in jax.lax.pmean(grads, AXIS).items():
            params[k].value = params[k].value - LR * g
        return jax.lax.pmean(value, AXIS)

    step = bs.transform.pmap2(step, axis_name=AXIS)
    return [Contender(NAME, "transform.pmap2", stepper(step, (x, y), *params.values()), runs)]
