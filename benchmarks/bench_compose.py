"""statemap's own jit, loops and grad against hand-threaded JAX.

Run from the repository root:

    python benchmarks/bench_compose.py [--quick]

Two workloads, each checked for equal numbers first, then timed interleaved:

- a simulation loop: T time steps of an ensemble of E noisy leaky
  integrate-and-fire networks of N neurons, written as
  ``statemap.jit(lambda: statemap.for_loop(statemap.vmap(step), ...))``,
  against ``jax.jit(lax.scan(jax.vmap(...)))`` with the state and key threaded
  by hand; also the speed-up over a Python loop of warm mapping calls.
- an MLP train step: ``statemap.jit`` of ``statemap.value_and_grad`` over
  ParamStates, an SGD update and a step counter, against
  ``jax.jit(jax.value_and_grad(...))`` with the parameters threaded by hand.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from workload import interleaved, load, print_warm

import statemap

QUICK = "--quick" in sys.argv
E, N, T = (4, 100, 50) if QUICK else (16, 1000, 1000)
DECAY, SCALE, DRIVE, THRESHOLD = 0.95, 0.3, 0.06, 1.0


def lif(v: jax.Array, noise: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One step of N neurons: leak, noise and drive, then spike and reset."""
    v = DECAY * v + SCALE * noise + DRIVE
    spikes = v > THRESHOLD
    return jnp.where(spikes, 0.0, v), spikes.sum()


class Ensemble:
    """The statemap side: membrane potentials split per member, one RandomState."""

    def __init__(self, seed: int = 0):
        self.v = statemap.HiddenState(jnp.zeros((E, N)), name="v")
        self.rng = statemap.RandomState(seed, name="rng")
        self.step = statemap.vmap(self._member_step, in_axes=None, axis_size=E, state_in_axes=statemap.HiddenState)
        self.run = statemap.jit(lambda ts: statemap.for_loop(self.step, ts))

    def _member_step(self, t: jax.Array) -> jax.Array:
        self.v.value, count = lif(self.v.value, self.rng.normal((N,)))
        return count


def raw_simulation():
    """The same loop with the potentials and the key threaded by hand."""

    def member(v, base, i):
        _, key = jax.random.split(jax.random.fold_in(base, i))  # statemap's lane key, then one draw
        return lif(v, jax.random.normal(key, (N,)))

    def step(carry, t):
        v, key = carry
        key, base = jax.random.split(key)
        v, counts = jax.vmap(member, in_axes=(0, None, 0))(v, base, jnp.arange(E))
        return (v, key), counts

    return jax.jit(lambda v, key, ts: jax.lax.scan(step, (v, key), ts))


def simulation() -> None:
    ts = jnp.arange(T)
    model, raw = Ensemble(), raw_simulation()
    carry = {"v": model.v.value, "key": model.rng.value}
    counts = model.run(ts)
    (v, key), raw_counts = raw(carry["v"], carry["key"], ts)
    np.testing.assert_array_equal(counts, raw_counts)
    np.testing.assert_allclose(model.v.value, v, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(model.rng.value, key)

    def sm_call():
        return jax.block_until_ready((model.run(ts), model.v.value, model.rng.value))

    def raw_call():
        (carry["v"], carry["key"]), out = raw(carry["v"], carry["key"], ts)
        return jax.block_until_ready((out, carry["v"], carry["key"]))

    print(f"\n== simulation loop: {T} steps of {E} LIF networks x {N} neurons ==")
    times = interleaved({"statemap": sm_call, "raw": raw_call}, calls=1 if not QUICK else 3, reps=10 if not QUICK else 4)
    print_warm("statemap jit(for_loop(vmap))", "jax.jit(scan(vmap))", times)
    start = time.perf_counter()
    for t in range(T):
        out = model.step(t)
    jax.block_until_ready((out, model.v.value))
    python_loop = time.perf_counter() - start
    print(f"python loop of {T} warm statemap.vmap calls: {python_loop * 1e3:.1f} ms "
          f"({python_loop / times['statemap'].wall:.1f}x the compiled loop)")


D_IN, HIDDEN, BATCH, LR = 32, 64, 64, 0.01


def mlp_loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - y) ** 2)


def train_step_contenders():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    init = {
        "w1": jax.random.normal(k1, (D_IN, HIDDEN)) / np.sqrt(D_IN),
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, 1)) / np.sqrt(HIDDEN),
    }
    x, y = jax.random.normal(k3, (BATCH, D_IN)), jax.random.normal(k4, (BATCH, 1))
    params = {k: statemap.ParamState(v, name=k) for k, v in init.items()}
    steps = statemap.ShortTermState(jnp.int32(0), name="steps")
    runs = [0]

    def loss(x, y):
        runs[0] += 1
        return mlp_loss({k: p.value for k, p in params.items()}, x, y)

    @statemap.jit
    def sm_step(x, y):
        value, grads = statemap.value_and_grad(loss, params)(x, y)
        for k, p in params.items():
            p.value = p.value - LR * grads[k]
        steps.value = steps.value + 1
        return value

    @jax.jit
    def raw_step(params, steps, x, y):
        value, grads = jax.value_and_grad(mlp_loss)(params, x, y)
        return value, jax.tree.map(lambda p, g: p - LR * g, params, grads), steps + 1

    return params, steps, runs, sm_step, raw_step, init, x, y


def train_step() -> None:
    params, steps, runs, sm_step, raw_step, init, x, y = train_step_contenders()
    raw_state = {"params": init, "steps": jnp.int32(0)}
    for _ in range(3):
        value = sm_step(x, y)
        raw_value, raw_state["params"], raw_state["steps"] = raw_step(raw_state["params"], raw_state["steps"], x, y)
        np.testing.assert_allclose(value, raw_value, rtol=1e-5)
    for k, p in params.items():
        np.testing.assert_allclose(p.value, raw_state["params"][k], rtol=1e-5, atol=1e-6)
    assert runs[0] == 1, f"the loss ran {runs[0]} times in Python; expected once"

    def sm_call():
        return jax.block_until_ready((sm_step(x, y), [p.value for p in params.values()], steps.value))

    def raw_call():
        out, raw_state["params"], raw_state["steps"] = raw_step(raw_state["params"], raw_state["steps"], x, y)
        return jax.block_until_ready((out, raw_state["params"], raw_state["steps"]))

    print(f"\n== MLP train step: value_and_grad + SGD + counter ({D_IN}-{HIDDEN}-1, batch {BATCH}) ==")
    times = interleaved({"statemap": sm_call, "raw": raw_call}, calls=50 if not QUICK else 5, reps=30 if not QUICK else 4)
    print_warm("statemap.jit", "jax.jit(value_and_grad)", times)
    print(f"Python runs of the loss: {runs[0]} (cold call only)")


if __name__ == "__main__":
    print(f"jax {jax.__version__}, load {load()}")
    simulation()
    train_step()
    print(f"\nload at the end: {load()}")
