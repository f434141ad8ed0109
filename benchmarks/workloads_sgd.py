"""A data-parallel SGD step under pmap: one batch per device, gradients averaged with ``pmean``.

Every contender keeps one copy of the parameters per device (identical after
the ``pmean``), takes ``(devices, batch, ...)`` inputs and returns the mean
loss. Every call blocks on its results: many unsynchronised collective calls
can deadlock XLA's CPU runtime on small machines (JAX issue 25861).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import statemap

from . import peers_brainstate, peers_equinox, peers_nnx
from .workloads_common import RAW, Contender, Counter, Workload, add_peers
from .workloads_models import LR, init_mlp, mlp_loss, shards

AXIS = "devices"


def statemap_sgd(devices: int, batch: int) -> Contender:
    """``ParamState``s broadcast to the devices, ``statemap.value_and_grad`` over them, written as is."""
    params = {k: statemap.ParamState(v, name=k) for k, v in init_mlp().items()}
    x, y = shards(devices, batch)
    runs = Counter()

    def loss(x, y):
        return mlp_loss({k: p.value for k, p in params.items()}, x, y)

    @statemap.pmap(axis_name=AXIS)
    def step(x, y):
        runs.tick()
        value, grads = statemap.value_and_grad(loss, params)(x, y)
        for k, g in jax.lax.pmean(grads, AXIS).items():
            params[k].value = params[k].value - LR * g
        return jax.lax.pmean(value, AXIS)

    def call() -> object:
        return jax.block_until_ready((step(x, y), {k: p.value for k, p in params.items()}))

    return Contender("statemap", "statemap.pmap", call, runs)


def raw_sgd(devices: int, batch: int) -> Contender:
    """The parameters replicated on the devices by hand and threaded through ``jax.pmap``."""
    x, y = shards(devices, batch)
    runs = Counter()

    def step(params, x, y):
        runs.tick()
        value, grads = jax.value_and_grad(mlp_loss)(params, x, y)
        grads = jax.lax.pmean(grads, AXIS)
        return jax.lax.pmean(value, AXIS), jax.tree.map(lambda p, g: p - LR * g, params, grads)

    step = jax.pmap(step, axis_name=AXIS)
    carry = {"params": jax.tree.map(lambda a: jnp.broadcast_to(a, (devices, *a.shape)), init_mlp())}

    def call() -> object:
        value, carry["params"] = step(carry["params"], x, y)
        return jax.block_until_ready((value, carry["params"]))

    return Contender(RAW, "jax.pmap", call, runs)


def check(first: dict[str, object]) -> None:
    """statemap's loss and new parameters equal raw JAX's (device 0's copy)."""
    (value, params), (raw_value, raw_params) = first["statemap"], first[RAW]
    np.testing.assert_allclose(value, raw_value[0], rtol=1e-5)
    for k, v in params.items():
        np.testing.assert_allclose(v, raw_params[k][0], rtol=1e-5, atol=1e-6)


def sgd(quick: bool) -> Workload:
    """The data-parallel SGD step on 8 devices, every contender."""
    devices, batch = 8, 16 if quick else 64
    workload = Workload(
        f"SGD step, {devices} devices x {batch} examples (pmap)",
        [statemap_sgd(devices, batch), raw_sgd(devices, batch)],
        calls=5 if quick else 10,
        reps=3 if quick else 15,
        check=check,
    )
    builders = {"brainstate": peers_brainstate.sgd, "Flax NNX": peers_nnx.sgd, "Equinox": peers_equinox.sgd}
    add_peers(workload, {name: (lambda m, b=b: b(m, devices, batch)) for name, b in builders.items()})
    return workload


