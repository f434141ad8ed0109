"""statemap quickstart: one stateful RNN step, mapped with vmap and then with pmap."""

import os

# Four CPU devices, so that pmap has devices to map over on any machine.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402  (XLA_FLAGS must be set before JAX starts)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import statemap  # noqa: E402

LANES, HIDDEN, INPUTS = jax.local_device_count(), 8, 3


class RNNCell:
    """A tiny recurrent cell: two parameters, a hidden state per lane, a noise source."""

    def __init__(self, seed: int = 0):
        k_h, k_x = jax.random.split(jax.random.PRNGKey(seed))
        self.W_h = statemap.ParamState(0.3 * jax.random.normal(k_h, (HIDDEN, HIDDEN)), name="W_h")
        self.W_x = statemap.ParamState(jax.random.normal(k_x, (INPUTS, HIDDEN)), name="W_x")
        self.h = statemap.HiddenState(jnp.zeros((LANES, HIDDEN)), name="h")
        self.rng = statemap.RandomState(seed, name="noise")

    def step(self, x):
        """One lane's update: it sees one row of `h` and draws its own noise."""
        noise = 0.1 * self.rng.normal((HIDDEN,))
        self.h.value = jnp.tanh(self.h.value @ self.W_h.value + x @ self.W_x.value) + noise
        return self.h.value.mean()


cell = RNNCell(seed=0)
xs = jnp.linspace(-1.0, 1.0, LANES * INPUTS).reshape(LANES, INPUTS)

# Split every HiddenState across lanes; parameters are broadcast; each lane gets its own key.
vstep = statemap.vmap(cell.step, state_in_axes={0: statemap.HiddenState})
print(vstep.explain(xs))
vmapped = [vstep(xs) for _ in range(3)]
print("\nvmap, one output per lane (columns) and step (rows):")
print(np.asarray(vmapped))
h_vmap = cell.h.value

# The same cell and step under pmap, one lane per device, from the same starting point.
cell.h.value = jnp.zeros((LANES, HIDDEN))
cell.rng.seed(0)
pstep = statemap.pmap(cell.step, axis_name="devices", state_in_axes={0: statemap.HiddenState})
print()
print(pstep.explain(xs))
pmapped = [jax.block_until_ready(pstep(xs)) for _ in range(3)]
print(f"\npmap on {jax.local_device_count()} devices:")
print(np.asarray(pmapped))

np.testing.assert_allclose(np.asarray(pmapped), np.asarray(vmapped), rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(cell.h.value, h_vmap, rtol=1e-5, atol=1e-6)
print("\npmap and vmap agree for the same seed (outputs and hidden state).")
