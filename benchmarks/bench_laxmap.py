"""statemap.map against statemap.vmap: memory and time of an ensemble, batch_size lanes at a time.

Run from the repository root:

    python benchmarks/bench_laxmap.py

Workload: an ensemble of E two-layer networks, each member with its own
weights (``ParamState``s split on axis 0), its own input noise (one
``RandomState``, a key per member) and a running statistic it writes
(a ``HiddenState`` split on axis 0). Every member sees the same batch of B
inputs, so one member's activations are B x W floats and ``vmap`` holds all
E members' at once: E times the memory of ``map`` with ``batch_size=1``.

Memory is the compiled program's scratch space, ``temp_size_in_bytes`` of
``compiled.memory_analysis()``: deterministic, unlike sampled live buffers.
The programs are those statemap builds (a subclass hands them over through
the ``_map`` hook). Time is the median warm call, interleaved as in the
other benchmarks. The outputs and final states of every contender are first
checked against ``statemap.vmap``'s. See benchmarks/README.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from workload import interleaved, load

import statemap

E, B, D, W = 32, 128, 32, 512  # members, batch, input size, hidden width


class Ensemble:
    """The states of E members and the per-member function (the same for every contender)."""

    def __init__(self, seed: int = 0):
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
        self.w1 = statemap.ParamState(jax.random.normal(k1, (E, D, W)) / np.sqrt(D), name="w1")
        self.w2 = statemap.ParamState(jax.random.normal(k2, (E, W)) / np.sqrt(W), name="w2")
        self.stat = statemap.HiddenState(jnp.zeros((E,)), name="stat")
        self.rng = statemap.RandomState(seed, name="rng")
        self.x = jax.random.normal(k3, (B, D))
        self.python_runs = 0

    def member(self, x: jax.Array) -> jax.Array:
        self.python_runs += 1
        hidden = jnp.tanh(x @ self.w1.value + 0.1 * self.rng.normal((B, W)))  # (B, W): the big one
        out = hidden @ self.w2.value
        self.stat.value = 0.9 * self.stat.value + 0.1 * out.mean()
        return jnp.mean(out**2)


SPLIT = {0: (statemap.ParamState, statemap.HiddenState)}


def probed(base: type[statemap.StatefulMapping]) -> type[statemap.StatefulMapping]:
    """``base``, remembering the memory analysis of the program it compiles."""

    class Probe(base):  # type: ignore[misc, valid-type]
        memory = None

        def _map(self, spec):
            program = super()._map(spec)

            def run(*inputs):
                if self.memory is None:
                    self.memory = program.lower(*inputs).compile().memory_analysis()
                return program(*inputs)

            return run

    return Probe


def contender(make):
    """A fresh ensemble (seed 0), its mapping, and a blocking call."""
    model = Ensemble()
    mapping = make(model)
    args = (jnp.broadcast_to(model.x, (E, B, D)),)

    def call():
        out = mapping(*args)
        return jax.block_until_ready((out, model.stat.value, model.rng.value))

    return model, mapping, call


def mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.2f} ms"


def main(calls: int = 2, reps: int = 15) -> None:
    print(f"statemap.map vs statemap.vmap: ensemble of E={E} members, B={B}, D={D}, W={W}")
    print(f"one member's activations: {B * W * 4 / 2**20:.2f} MiB; jax {jax.__version__}; load {load()}")
    VMap, LaxMap = probed(statemap.VMapMapping), probed(statemap.LaxMapMapping)
    contenders = {"vmap": contender(lambda m: VMap(m.member, state_in_axes=SPLIT))}
    for size in (1, 8, E):
        contenders[f"map, batch_size={size}"] = contender(
            lambda m, size=size: LaxMap(m.member, batch_size=size, state_in_axes=SPLIT)
        )
    reference = contenders["vmap"][2]()
    for name, (model, _, call) in contenders.items():
        out, stat, key = call() if name != "vmap" else reference
        np.testing.assert_allclose(np.asarray(out), np.asarray(reference[0]), rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(stat), np.asarray(reference[1]), rtol=2e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(key), np.asarray(reference[2]))
    print("same seed, same numbers: every batch_size gives vmap's outputs, states and key")
    times = interleaved({name: c[2] for name, c in contenders.items()}, calls, reps)
    vmap_temp = contenders["vmap"][1].memory.temp_size_in_bytes
    print(f"{'':22}  {'scratch memory':>14}  {'vs vmap':>7}  {'warm call':>11}  {'vs vmap':>7}")
    for name, (model, mapping, _) in contenders.items():
        temp = mapping.memory.temp_size_in_bytes
        wall = times[name].wall
        print(
            f"{name:22}  {mib(temp):>14}  {temp / vmap_temp:7.3f}  {ms(wall)}  "
            f"{wall / times['vmap'].wall:7.2f}"
        )
        assert model.python_runs == 1, "a warm call ran the Python function again"
    print(f"load at the end: {load()}")


if __name__ == "__main__":
    main()
