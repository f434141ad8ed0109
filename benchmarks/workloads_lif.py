"""An ensemble of leaky integrate-and-fire networks, one noisy time step per call.

E members of N neurons each: the membrane potentials are one row per member,
every member draws its own normal noise, and the step returns each member's
spike count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import statemap

from . import peers_brainstate, peers_equinox, peers_nnx
from .workloads_common import RAW, Contender, Counter, Workload, add_peers, same_numbers
from .workloads_models import lif


def statemap_lif(members: int, neurons: int) -> Contender:
    """The potentials a ``HiddenState`` split per member, the noise a ``RandomState``."""
    v = statemap.HiddenState(jnp.zeros((members, neurons)), name="v")
    rng = statemap.RandomState(0, name="rng")
    runs = Counter()

    @statemap.vmap(in_axes=(), axis_size=members, state_in_axes={0: statemap.HiddenState})
    def step():
        runs.tick()
        v.value, count = lif(v.value, rng.normal((neurons,)))
        return count

    def call() -> object:
        return jax.block_until_ready((step(), v.value, rng.value))

    return Contender("statemap", "statemap.vmap", call, runs)


def raw_lif(members: int, neurons: int) -> Contender:
    """The potentials and the key threaded by hand, lane keys derived as statemap does."""
    runs = Counter()

    def member(v, base, i):
        _, key = jax.random.split(jax.random.fold_in(base, i))
        return lif(v, jax.random.normal(key, (neurons,)))

    @jax.jit
    def step(v, key):
        runs.tick()
        key, base = jax.random.split(key)
        v, counts = jax.vmap(member, in_axes=(0, None, 0))(v, base, jnp.arange(members))
        return counts, v, key

    carry = {"v": jnp.zeros((members, neurons)), "key": statemap.RandomState(0).value}

    def call() -> object:
        counts, carry["v"], carry["key"] = step(carry["v"], carry["key"])
        return jax.block_until_ready((counts, carry["v"], carry["key"]))

    return Contender(RAW, "jax.jit(jax.vmap)", call, runs)


def lif_ensemble(quick: bool) -> Workload:
    """One time step of the LIF ensemble, every contender."""
    members, neurons = (4, 100) if quick else (16, 1000)
    workload = Workload(
        f"LIF ensemble, {members} x {neurons} neurons (vmap)",
        [statemap_lif(members, neurons), raw_lif(members, neurons)],
        calls=5 if quick else 20,
        reps=3 if quick else 15,
        check=same_numbers(rtol=1e-5),
    )
    builders = {"brainstate": peers_brainstate.lif, "Flax NNX": peers_nnx.lif, "Equinox": peers_equinox.lif}
    add_peers(workload, {name: (lambda m, b=b: b(m, members, neurons)) for name, b in builders.items()})
    return workload
