"""Train an ensemble of MLPs, each member on its own data, as one compiled program.

The members are created inside ``statemap.vmap``: their parameters are
``ParamState``s whose values come out stacked, one row per member. One
training step is a ``statemap.vmap`` over members (each lane takes the
gradient of its own loss with ``statemap.value_and_grad`` and updates its
own row of the parameters) inside ``statemap.jit``.

Run it with ``python examples/ensemble_training.py``.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import statemap

MEMBERS = 4
SIZES = (1, 32, 1)
POINTS = 64
LEARNING_RATE = 0.02

Layer = tuple[statemap.ParamState, statemap.ParamState]


def init_mlp(sizes: tuple[int, ...], rng: statemap.RandomState) -> list[Layer]:
    """Creates one MLP's parameters: a (weights, bias) pair of states per layer."""
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        w = statemap.ParamState(rng.normal((fan_in, fan_out)) / jnp.sqrt(fan_in), name="w")
        b = statemap.ParamState(jnp.zeros(fan_out), name="b")
        layers.append((w, b))
    return layers


def mlp(layers: list[Layer], x: jax.Array) -> jax.Array:
    """Applies the MLP to a batch of inputs ``x`` of shape (points, sizes[0])."""
    for w, b in layers[:-1]:
        x = jnp.tanh(x @ w.value + b.value)
    w, b = layers[-1]
    return x @ w.value + b.value


def make_data(members: int, points: int) -> tuple[jax.Array, jax.Array]:
    """One regression task per member: y = sin(f x) with a frequency per member."""
    x = jnp.linspace(-2.0, 2.0, points).reshape(1, points, 1)
    freqs = jnp.linspace(0.5, 2.0, members).reshape(members, 1, 1)
    xs = jnp.broadcast_to(x, (members, points, 1))
    return xs, jnp.sin(freqs * xs)


def main(steps: int) -> None:
    rng = statemap.RandomState(0, name="init")

    # Created inside vmap: every member draws its own initial weights (a key
    # per lane), and each state's value comes out stacked on axis 0.
    ensemble = statemap.vmap(lambda: init_mlp(SIZES, rng), axis_size=MEMBERS)()
    print("first-layer weights:", ensemble[0][0].value.shape, "(members, in, out)")

    # Each lane sees one member's row of every ParamState and that member's data.
    @statemap.jit
    @statemap.vmap(state_in_axes={0: statemap.ParamState})
    def train_step(x, y):
        def loss_fn():
            return jnp.mean((mlp(ensemble, x) - y) ** 2)

        loss, grads = statemap.value_and_grad(loss_fn, ensemble)()
        for (w, b), (gw, gb) in zip(ensemble, grads):
            w.value = w.value - LEARNING_RATE * gw
            b.value = b.value - LEARNING_RATE * gb
        return loss

    xs, ys = make_data(MEMBERS, POINTS)
    history = []
    for step in range(steps + 1):
        losses = np.asarray(train_step(xs, ys))
        history.append(losses)
        if step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  losses " + "  ".join(f"{v:.4f}" for v in losses))

    first, last = history[0], history[-1]
    assert np.all(last < first), (first, last)
    print("per-member loss went down:", "  ".join(f"{a:.4f} -> {b:.4f}" for a, b in zip(first, last)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    main(parser.parse_args().steps)
