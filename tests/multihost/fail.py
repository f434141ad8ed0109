"""A job whose worker 1 raises once every worker has joined, for tests/test_multihost.py.

Worker 0 waits in a collective for a peer that never comes, until the
launcher stops it. (A worker killed by a signal: see ``dies/``.)
"""

import jax
import jax.numpy as jnp


def total():
    ones = jnp.ones(jax.local_device_count())
    return jax.block_until_ready(jax.pmap(lambda v: jax.lax.psum(v, "d"), "d")(ones))


if jax.process_index() == 1:
    print("worker 1 about to fail", flush=True)
    raise RuntimeError("worker 1 gives up")
total()
