"""The RNN cell with per-lane noise (``workload.py``), and warm overhead against the number of states.

Per lane: ``h <- tanh(h @ W_h + x @ W_x) + 0.01 * noise``, with ``W_h``, ``W_x``
broadcast, ``h`` one row per lane and one normal draw per lane. The
"states" workload adds ``n`` broadcast states of shape (4,), summed into the
output, so the difference to raw JAX is the cost of handling ``n`` more states.
"""

from __future__ import annotations

import jax
import statemap

from . import peers_brainstate, peers_equinox, peers_nnx
from .workload import RNNCell, raw_lane
from .workloads_common import RAW, Contender, Counter, Workload, add_peers, same_numbers

AXIS = "lanes"


def statemap_rnn(lanes: int, extra: int) -> Contender:
    """``workload.RNNCell`` under ``statemap.vmap``, the hidden state split per lane."""
    cell = RNNCell(lanes, seed=0, extra_states=extra)
    step = statemap.vmap(cell, state_in_axes={0: statemap.HiddenState})

    def call() -> object:
        return jax.block_until_ready((step(cell.x), cell.h.value, cell.rng.value))

    return Contender("statemap", "statemap.vmap", call, lambda: cell.python_runs)


def raw_rnn(lanes: int, extra: int) -> Contender:
    """Every state threaded by hand through one ``jax.jit(jax.vmap)``, keys split as statemap does."""
    cell, runs = RNNCell(lanes, seed=0, extra_states=extra), Counter()
    lane = raw_lane(AXIS)

    @jax.jit
    def raw_step(W_h, W_x, h, x, key, extras):
        runs.tick()
        new_key, base = jax.random.split(key)
        mapped = jax.vmap(lane, in_axes=(0, 0, None, None, None, None), axis_name=AXIS)
        out, new_h = mapped(h, x, W_h, W_x, base, extras)
        return out, new_h, new_key

    carry = {"h": cell.h.value, "key": cell.rng.value}
    extras = tuple(s.value for s in cell.extras)

    def call() -> object:
        out, carry["h"], carry["key"] = raw_step(cell.W_h.value, cell.W_x.value, carry["h"], cell.x, carry["key"], extras)
        return jax.block_until_ready((out, carry["h"], carry["key"]))

    return Contender(RAW, "jax.jit(jax.vmap)", call, runs)


PEER_BUILDERS = {
    "brainstate": peers_brainstate.rnn,
    "Flax NNX": peers_nnx.rnn,
    "Equinox": peers_equinox.rnn,
}


def rnn(quick: bool) -> Workload:
    """The RNN cell alone, every contender."""
    lanes = 8 if quick else 32
    return states(quick, 0, title=f"RNN cell, {lanes} lanes (vmap)", lanes=lanes)


def states(quick: bool, n: int, title: str | None = None, lanes: int = 8) -> Workload:
    """The RNN cell reading ``n`` extra broadcast states, every contender."""
    workload = Workload(
        title or f"{n} states (vmap)",
        [statemap_rnn(lanes, n), raw_rnn(lanes, n)],
        calls=5 if quick else 20,
        reps=3 if quick else 15,
        check=same_numbers(),
    )
    add_peers(workload, {name: (lambda m, b=b: b(m, lanes, n)) for name, b in PEER_BUILDERS.items()})
    return workload
