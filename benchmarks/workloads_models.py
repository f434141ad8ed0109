"""The pure math of the LIF and SGD workloads, shared by every contender.

Contenders differ only in how state and keys reach this math (statemap states,
hand-threaded arrays, brainstate states, NNX Variables, Equinox modules).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DECAY, SCALE, DRIVE, THRESHOLD = 0.95, 0.3, 0.06, 1.0
D_IN, HIDDEN, LR = 16, 32, 0.05


def lif(v: jax.Array, noise: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One step of a network of leaky integrate-and-fire neurons: leak, noise and drive, spike, reset."""
    v = DECAY * v + SCALE * noise + DRIVE
    spikes = v > THRESHOLD
    return jnp.where(spikes, 0.0, v), spikes.sum()


def init_mlp(seed: int = 0) -> dict[str, jax.Array]:
    """A D_IN-HIDDEN-1 tanh MLP's parameters."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {
        "w1": jax.random.normal(k1, (D_IN, HIDDEN)) / jnp.sqrt(D_IN),
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, 1)) / jnp.sqrt(HIDDEN),
    }


def mlp_loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error of the MLP on one batch."""
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - y) ** 2)


def shards(devices: int, batch: int, seed: int = 1) -> tuple[jax.Array, jax.Array]:
    """Inputs and targets, one batch of ``batch`` examples per device: shapes (devices, batch, ...)."""
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kx, (devices, batch, D_IN)), jax.random.normal(ky, (devices, batch, 1))
