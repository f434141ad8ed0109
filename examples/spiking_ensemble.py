"""Simulate an ensemble of noisy leaky integrate-and-fire (LIF) networks.

Every member is the same recurrent network of excitatory and inhibitory LIF
neurons with the same weights; only its noise differs. ``statemap.vmap``
maps one time step over the members: the membrane potentials and last spikes
(``HiddenState``s, one row per member) are split, the weights (a
``ParamState``) are broadcast, and the ``RandomState`` gives each member its
own key, so the members fire at different rates. ``statemap.for_loop``
inside ``statemap.jit`` runs the whole simulation as one compiled loop.

Run it with ``python examples/spiking_ensemble.py [--plot raster.png]``; the
raster plot needs matplotlib and is skipped without it.
"""

import argparse
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np

import statemap

MEMBERS = 4
NEURONS = 200  # the first 80% excitatory, the rest inhibitory
DT, TAU = 1.0, 20.0  # ms
THRESHOLD, DRIVE, NOISE = 1.0, 0.9, 0.5


def make_weights(seed: int) -> jax.Array:
    """Sparse random weights (post, pre): excitatory columns positive, inhibitory negative."""
    rng = np.random.default_rng(seed)
    excitatory = int(0.8 * NEURONS)
    connected = rng.random((NEURONS, NEURONS)) < 0.1
    strength = np.where(np.arange(NEURONS) < excitatory, 0.05, -0.2)
    return jnp.asarray((connected * strength).astype(np.float32))


w = statemap.ParamState(make_weights(seed=1), name="w")
v = statemap.HiddenState(jnp.zeros((MEMBERS, NEURONS)), name="v")
spikes = statemap.HiddenState(jnp.zeros((MEMBERS, NEURONS)), name="spikes")
noise = statemap.RandomState(0, name="noise")


@statemap.vmap(in_axes=None, axis_size=MEMBERS, state_in_axes={0: statemap.HiddenState})
def network_step(t):
    """One member's 1 ms step: leak, constant drive, recurrent input and noise."""
    recurrent = w.value @ spikes.value
    dv = (DRIVE - v.value) * DT / TAU + recurrent
    v.value = v.value + dv + NOISE * jnp.sqrt(DT / TAU) * noise.normal((NEURONS,))
    fired = v.value > THRESHOLD
    v.value = jnp.where(fired, 0.0, v.value)
    spikes.value = fired.astype(jnp.float32)
    return fired


@statemap.jit
def simulate(ts):
    """Steps every member through ``ts``; returns the spikes, (time, member, neuron)."""
    return statemap.for_loop(network_step, ts)


def save_raster(raster: np.ndarray, path: str) -> None:
    """Draws one raster panel per member and saves the figure to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(MEMBERS, 1, sharex=True, figsize=(8, 1.6 * MEMBERS))
    for member, ax in enumerate(axes):
        times, neurons = np.nonzero(raster[:, member])
        ax.scatter(times * DT, neurons, s=0.5, c="k")
        ax.set_ylabel(f"member {member}")
    axes[-1].set_xlabel("time (ms)")
    fig.suptitle("Noisy LIF ensemble: same network, a different noise key per member")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(steps: int, plot: str) -> None:
    raster = np.asarray(simulate(jnp.arange(steps)))  # (steps, MEMBERS, NEURONS)
    rates = raster.mean(axis=(0, 2)) * 1000.0 / DT  # spikes per neuron per second
    print(f"{MEMBERS} networks of {NEURONS} LIF neurons, {steps * DT:.0f} ms simulated")
    for member, rate in enumerate(rates):
        print(f"member {member}: {rate:.2f} Hz")
    trains = {raster[:, member].tobytes() for member in range(MEMBERS)}
    assert len(trains) == MEMBERS, "each member draws its own noise, so no two spike trains are equal"
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no raster plot")
        return
    save_raster(raster, plot)
    print(f"raster plot saved to {plot}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="1 ms time steps (default 1000)")
    parser.add_argument("--plot", default="spiking_ensemble.png", help="where to save the raster plot PNG")
    args = parser.parse_args()
    main(args.steps, args.plot)
