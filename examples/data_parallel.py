"""Data-parallel SGD with statemap.pmap on 8 CPU devices, checked against one device.

Each device takes its shard of every minibatch and computes gradients with
``statemap.value_and_grad``; ``jax.lax.pmean`` averages them, so every
device applies the same update and the parameters (``ParamState``s, broadcast
to the devices) are written back as is. The same model trained on the whole
minibatch on one device (``statemap.jit``, no ``pmean``) ends with the same
parameters, to 1e-5.

Run it with ``python examples/data_parallel.py``.
"""

import argparse

import jax

# Eight CPU devices; this must run before JAX starts its backend (the first
# array or jax.devices() call). On a machine with accelerators pmap uses those.
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import statemap  # noqa: E402

FEATURES, HIDDEN = 4, 16
BATCH = 128  # examples per step, split evenly across the devices
LEARNING_RATE = 0.1


class MLP:
    """A one-hidden-layer regression MLP whose parameters are ParamStates."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        w1 = rng.normal(size=(FEATURES, HIDDEN)).astype(np.float32) / FEATURES**0.5
        w2 = rng.normal(size=HIDDEN).astype(np.float32) / HIDDEN**0.5
        self.w1 = statemap.ParamState(jnp.asarray(w1), name="w1")
        self.w2 = statemap.ParamState(jnp.asarray(w2), name="w2")
        self.params = [self.w1, self.w2]

    def loss(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """Mean squared error on a batch ``x`` of shape (examples, FEATURES)."""
        prediction = jnp.tanh(x @ self.w1.value) @ self.w2.value
        return jnp.mean((prediction - y) ** 2)

    def sgd_step(self, x: jax.Array, y: jax.Array, axis_name: str | None = None) -> jax.Array:
        """One SGD step; under a mapping, gradients and loss are averaged over ``axis_name``."""
        loss, grads = statemap.value_and_grad(self.loss, self.params)(x, y)
        if axis_name is not None:
            loss, grads = jax.lax.pmean((loss, grads), axis_name)
        for param, grad in zip(self.params, grads):
            param.value = param.value - LEARNING_RATE * grad
        return loss


def make_batches(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Minibatches of a noisy nonlinear teacher: (steps, BATCH, FEATURES) and (steps, BATCH).

    The data stay in host memory (NumPy) until a step takes its minibatch.
    """
    rng = np.random.default_rng(42)
    xs = rng.normal(size=(steps, BATCH, FEATURES)).astype(np.float32)
    teacher = rng.normal(size=FEATURES).astype(np.float32)
    ys = np.sin(xs @ teacher) + 0.05 * rng.normal(size=(steps, BATCH)).astype(np.float32)
    return xs, ys


def main(steps: int) -> None:
    devices = jax.local_device_count()
    assert BATCH % devices == 0, f"BATCH={BATCH} must divide over {devices} devices"
    xs, ys = make_batches(steps)

    parallel = MLP(seed=0)
    single = MLP(seed=0)  # the same initial parameters

    @statemap.pmap(axis_name="devices")
    def parallel_step(x, y):
        return parallel.sgd_step(x, y, axis_name="devices")

    single_step = statemap.jit(single.sgd_step)
    print(parallel_step.explain(xs[0].reshape(devices, -1, FEATURES), ys[0].reshape(devices, -1)))

    for t in range(steps):
        # (BATCH, ...) -> (devices, BATCH // devices, ...): one shard per device.
        x_shards = xs[t].reshape(devices, -1, FEATURES)
        y_shards = ys[t].reshape(devices, -1)
        # Wait for each step: many unsynchronised collective calls can hang
        # the CPU backend (JAX issue 25861).
        parallel_loss = jax.block_until_ready(parallel_step(x_shards, y_shards))
        single_loss = single_step(xs[t], ys[t])
        if t % max(1, steps // 5) == 0 or t == steps - 1:
            print(f"step {t:3d}  loss on {devices} devices {float(parallel_loss[0]):.5f}"
                  f"  on one device {float(single_loss):.5f}")

    diff = max(float(jnp.max(jnp.abs(p.value - s.value))) for p, s in zip(parallel.params, single.params))
    print(f"max |parameter difference| after {steps} steps: {diff:.2e}")
    np.testing.assert_allclose(parallel.w1.value, single.w1.value, atol=1e-5)
    np.testing.assert_allclose(parallel.w2.value, single.w2.value, atol=1e-5)
    print(f"pmap on {devices} devices matches one device to 1e-5")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="SGD steps (default 50)")
    main(parser.parse_args().steps)
