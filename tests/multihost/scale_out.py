"""A data-parallel training run, for tests/test_multihost.py.

As a script, under ``python -m statemap.launch -n N --local-devices K
scale_out.py OUTDIR MAPPING...``, every process trains on its own rows of the
global batch with each named mapping (``pmap``, ``shard_map``), checks where the
states live and that a wrong local size is refused, and process 0 writes the
global results to ``OUTDIR/<mapping>.npz``. With ``raise`` after the
mappings, worker 1 then raises, once the results are saved, while the
others wait for it in JAX's shutdown: a failing worker in a running job.
Imported, ``train`` is the single-process reference.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import statemap

FEATURES = 3
STEPS = 2
MAPPINGS = {"pmap": statemap.pmap, "shard_map": statemap.shard_map}


def batch(lanes):
    """The global batch: one row of inputs and one target per lane."""
    x = np.linspace(-1.0, 1.0, lanes * FEATURES, dtype=np.float32).reshape(lanes, FEATURES)
    return x, x @ np.array([1.0, -2.0, 0.5], np.float32)


def model(local_lanes):
    """Weights (broadcast), a per-lane loss total (split), a random state, and a Python-float rate."""
    w = statemap.ParamState(jnp.zeros(FEATURES), name="w")
    loss = statemap.HiddenState(jnp.zeros(local_lanes), name="loss")
    # A weakly typed value: JAX's transfers between processes drop weak types.
    rate = statemap.State(0.1, name="rate")
    return w, loss, statemap.RandomState(0), rate


def make_step(mapping, w, loss, rng, rate, **keywords):
    """One SGD step on the mean gradient over every lane; per-lane noise is returned, not applied."""

    @mapping(axis_name="d", state_in_axes=statemap.HiddenState, **keywords)
    def step(x, y):
        err = x @ w.value - y
        w.value = w.value - rate.value * jax.lax.pmean(err * x, "d")
        loss.value = loss.value + err**2
        return rng.uniform(()), jax.lax.psum(1, "d"), jax.lax.all_gather(y, "d")

    return step


def train(mapping, x, y, **keywords):
    """``STEPS`` steps on rows ``x``, ``y``; returns the step, the states and each step's outputs."""
    states = model(len(x))
    step = make_step(mapping, *states, **keywords)
    outs = []
    for _ in range(STEPS):
        outs.append(jax.block_until_ready(step(x, y)))  # one collective call in flight at a time
    return step, states, outs


def check_process(name, step, states, x, y):
    """What each process sees: its local slices, the same broadcast values, a clear size error."""
    w, loss = states[:2]
    lanes = jax.local_device_count()
    assert f"this one passes {lanes} of the {jax.device_count()} lanes" in str(step.explain(x, y))
    assert loss.value.shape == (lanes,), loss.value.shape
    assert loss.value.is_fully_addressable and loss.value.sharding.device_set == set(jax.local_devices())
    multihost_utils.assert_equal(np.asarray(w.value), f"{name}: w differs between processes")
    before = [s.value for s in states]
    wrong = np.ones((lanes + 1, FEATURES), np.float32)
    try:
        step(wrong, np.ones(lanes + 1, np.float32))
    except ValueError as err:
        assert f"local size {lanes}" in str(err), err
    else:
        raise AssertionError(f"{name}: a wrong local size was accepted")
    assert all(s.value is value for s, value in zip(states, before)), f"{name}: a failed call changed a state"


def give_up():
    """Once every process has saved its results, worker 1 raises."""
    multihost_utils.sync_global_devices("results saved")
    if jax.process_index() == 1:
        print("worker 1 about to fail", flush=True)
        raise RuntimeError("worker 1 gives up")


def main(outdir, names):
    fail = names[-1:] == ["raise"]
    names = names[:-1] if fail else names
    lanes, here = jax.local_device_count(), jax.process_index()
    x, y = batch(jax.device_count())
    rows = slice(here * lanes, (here + 1) * lanes)
    for name in names:
        step, states, outs = train(MAPPINGS[name], x[rows], y[rows])
        check_process(name, step, states, x[rows], y[rows])
        w, loss = states[:2]
        local = {
            "loss": loss.value,
            "noise": jnp.stack([o[0] for o in outs], axis=1),  # (lanes, STEPS)
            "count": jnp.stack([o[1] for o in outs], axis=1),
        }
        results = {k: np.asarray(v) for k, v in multihost_utils.process_allgather(local, tiled=True).items()}
        results.update(w=np.asarray(w.value), gathered=np.asarray(outs[-1][2]))
        if here == 0:
            np.savez(pathlib.Path(outdir) / f"{name}.npz", **results)
    print(f"process {here}: checked", flush=True)
    if fail:
        give_up()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
