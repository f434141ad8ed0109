"""A job whose worker 1 fails once every worker has joined, for tests/test_multihost.py.

``fail.py raise``: worker 1 raises; ``fail.py kill``: worker 1 is killed
(SIGKILL). Worker 0 waits in a collective for a peer that never comes,
until the launcher stops it.
"""

import os
import signal
import sys

import jax
import jax.numpy as jnp


def total():
    ones = jnp.ones(jax.local_device_count())
    return jax.block_until_ready(jax.pmap(lambda v: jax.lax.psum(v, "d"), "d")(ones))


if jax.process_index() == 1:
    print("worker 1 about to fail", flush=True)
    if sys.argv[1] == "raise":
        raise RuntimeError("worker 1 gives up")
    os.kill(os.getpid(), signal.SIGKILL)
total()
