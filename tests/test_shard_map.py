"""statemap.shard_map / ShardMapMapping, checked against hand-threaded oracles.

The oracles pass the states' values explicitly through
``jax.jit(jax.shard_map(...))`` (or ``jax.pmap``) with the keys split by hand
as statemap does (``new, base = split(key)``, lane i draws with
``split(fold_in(base, i))[1]``), or run the same user function under
``statemap.vmap`` / ``statemap.pmap`` from the same seed. The 8 CPU devices
come from ``tests/conftest.py``. Every call is synced: many unsynced calls
with collectives can deadlock XLA's CPU runtime (JAX-NOTES fact 10).
"""

import contextlib
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compiles
from helpers import assert_concrete, assert_keys_equal, assert_tree_allclose, assert_unchanged, snapshot
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import statemap

N = 8


def rows(*shape, start=0.0):
    """A small float32 array with distinct entries."""
    return jnp.arange(start, start + np.prod(shape), dtype=jnp.float32).reshape(shape) / 10


def sync(x):
    return jax.block_until_ready(x)


def raw(fn, in_specs, out_specs, mesh=None, axis="d"):
    """Hand-threaded ``jax.jit(jax.shard_map(fn))`` over ``mesh`` (default: all devices on ``axis``)."""
    mesh = mesh if mesh is not None else Mesh(np.array(jax.devices()), (axis,))
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names={axis}))


def lane_draw(base, axis, shape):
    """What ``RandomState.normal(shape)`` draws in this lane, the parent split to ``base`` by hand."""
    lane_key = jax.random.fold_in(base, jax.lax.axis_index(axis))
    return jax.random.normal(jax.random.split(lane_key)[1], shape)


# Names, forms, docstrings.


def test_forms_and_docstring_examples():
    @statemap.shard_map
    def double(x):
        return x * 2

    @statemap.shard_map(axis_name="i")
    def centred(x):
        return x - jax.lax.pmean(x, "i")

    x = rows(N, 2)
    assert isinstance(double, statemap.ShardMapMapping) and isinstance(centred, statemap.ShardMapMapping)
    assert_tree_allclose(sync(double(x)), x * 2)
    assert_tree_allclose(sync(centred(x)), x - x.mean(0))
    direct = statemap.ShardMapMapping(lambda v: jax.lax.psum(v, "d"), "d")
    assert direct.axis_name == "d"
    assert_tree_allclose(sync(direct(x)), jnp.broadcast_to(x.sum(0), (N, 2)))
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    tests = finder.find(statemap.shard_map, "shard_map") + finder.find(statemap.ShardMapMapping, "ShardMapMapping")
    assert sum(len(t.examples) for t in tests) >= 10
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


# Collectives.


def test_collectives_match_hand_threaded_shard_map():
    total = statemap.State(jnp.zeros(2), name="total")

    def f(x):
        total.value = total.value + jax.lax.psum(x, "d")
        gathered = jax.lax.all_gather(x, "d")
        return x - jax.lax.pmean(x, "d"), gathered, jax.lax.axis_index("d")

    def oracle_lane(t, x):
        x = x[0]
        out = (x - jax.lax.pmean(x, "d"), jax.lax.all_gather(x, "d"), jax.lax.axis_index("d"))
        return t + jax.lax.psum(x, "d"), *(o[None] for o in out)

    oracle = raw(oracle_lane, (P(), P("d")), (P(), P("d"), P("d"), P("d")))
    x = rows(N, 2)
    out = sync(statemap.shard_map(f, "d")(x))
    t, *want = sync(oracle(jnp.zeros(2), x))
    assert out[1].shape == (N, N, 2)
    assert_tree_allclose(out, tuple(want))
    np.testing.assert_array_equal(np.asarray(out[2]), np.arange(N))
    assert total.value.shape == (2,)
    assert_tree_allclose(total.value, t)
    assert_tree_allclose(total.value, x.sum(0))


def test_in_axes_out_axes_and_a_replicated_output():
    x, w = rows(2, N), rows(2, start=1.0)
    f = statemap.shard_map(lambda a, b: (a * b, jax.lax.psum(a, "d")), "d", in_axes=(-1, None), out_axes=(1, None))
    out, total = sync(f(x, w))
    assert out.shape == (2, N) and total.shape == (2,)
    assert_tree_allclose(out, x * w[:, None])
    assert_tree_allclose(total, x.sum(1))


def test_data_parallel_sgd_matches_single_device_oracle():
    per_device, features, lr = 2, 3, 0.1
    x_all = jnp.asarray(np.random.default_rng(0).normal(size=(N * per_device, features)), jnp.float32)
    y_all = x_all @ jnp.array([1.0, -2.0, 0.5]) + 0.3
    w = statemap.ParamState(jnp.zeros(features), name="w")
    b = statemap.ParamState(jnp.zeros(()), name="b")
    runs = []

    def loss(params, x, y):
        return jnp.mean((x @ params[0] + params[1] - y) ** 2)

    @statemap.shard_map(axis_name="batch")
    def sgd_step(x, y):
        runs.append(1)
        value, grads = jax.value_and_grad(loss)((w.value, b.value), x, y)
        grads = jax.lax.pmean(grads, "batch")
        w.value = w.value - lr * grads[0]
        b.value = b.value - lr * grads[1]
        return jax.lax.pmean(value, "batch")

    params = (jnp.zeros(features), jnp.zeros(()))
    oracle = jax.jit(jax.value_and_grad(loss))
    xs, ys = x_all.reshape(N, per_device, features), y_all.reshape(N, per_device)
    for _ in range(4):
        value = sync(sgd_step(xs, ys))
        expected, grads = oracle(params, x_all, y_all)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        assert_tree_allclose(value, jnp.full(N, expected), rtol=1e-5)
        assert w.value.shape == (features,) and b.value.shape == ()
        assert_tree_allclose((w.value, b.value), params, rtol=1e-5)
    assert runs == [1]
    assert float(oracle(params, x_all, y_all)[0]) < float(expected)


# Same numbers as vmap and pmap; keys.


def make_cell(seed):
    h = statemap.HiddenState(rows(N, 3), name="h")
    w = statemap.ParamState(jnp.full(3, 0.5), name="w")
    rng = statemap.RandomState(seed)

    def cell(x):
        h.value = jnp.tanh(h.value * w.value + x) + 0.1 * rng.normal((3,))
        w.value = w.value + 0.01 * jax.lax.pmean(x, "d")
        return h.value.sum()

    return cell, (h, w, rng)


def test_same_numbers_as_vmap_and_pmap():
    cells = {name: make_cell(jax.random.key(7)) for name in ("vmap", "pmap", "shard_map")}
    split = {0: statemap.HiddenState}
    mappings = {  # shard_map last: compared against the others
        "vmap": statemap.vmap(cells["vmap"][0], axis_name="d", state_in_axes=split),
        "pmap": statemap.pmap(cells["pmap"][0], "d", state_in_axes=split),
        "shard_map": statemap.shard_map(cells["shard_map"][0], "d", state_in_axes=split),
    }
    keys = [np.asarray(jax.random.key_data(cells["shard_map"][1][2].value))]
    for step in range(2):
        x = rows(N, 3, start=step)
        got = {name: sync(m(x)) for name, m in mappings.items()}
        for name in list(mappings)[:-1]:
            np.testing.assert_allclose(np.asarray(got["shard_map"]), np.asarray(got[name]), rtol=1e-6)
            for a, b in zip(cells["shard_map"][1], cells[name][1]):
                assert_tree_allclose(a.value, b.value)
        assert_keys_equal(cells["shard_map"][1][2].value, cells["vmap"][1][2].value)
        keys.append(np.asarray(jax.random.key_data(cells["shard_map"][1][2].value)))
    assert len({k.tobytes() for k in keys}) == 3  # the key advanced once per call


def test_per_lane_keys_match_hand_threaded_shard_map():
    rng = statemap.RandomState(4)
    h = statemap.HiddenState(jnp.zeros((N, 2)), name="h")

    def f(x):
        h.value = h.value + x + rng.normal((2,))
        return rng.next_key()

    def oracle_lane(hv, x, key):
        new, base = jax.random.split(key)
        lane_key = jax.random.fold_in(base, jax.lax.axis_index("d"))
        lane_key, draw = jax.random.split(lane_key)
        return hv + x + jax.random.normal(draw, (1, 2)), jax.random.split(lane_key)[1][None], new

    oracle = raw(oracle_lane, (P("d"), P("d"), P()), (P("d"), P("d"), P()))
    mapping = statemap.shard_map(f, "d", state_in_axes=statemap.HiddenState)
    hv, key = h.value, rng.value
    for step in range(2):
        x = rows(N, 2, start=step)
        keys = sync(mapping(x))
        hv, want_keys, key = sync(oracle(hv, x, key))
        np.testing.assert_array_equal(np.asarray(h.value), np.asarray(hv))
        assert_keys_equal(keys, want_keys)
        assert_keys_equal(rng.value, key)
    assert len({tuple(k) for k in np.asarray(keys)}) == N


def test_per_lane_keys_match_hand_threaded_pmap():
    rng = statemap.RandomState(5)  # a legacy key (the test above uses a typed one)
    out = sync(statemap.shard_map(lambda x: x + rng.normal((2,)))(rows(N, 2)))
    new, base = jax.random.split(jax.random.PRNGKey(5))
    expected = jax.pmap(lambda k, x: x + jax.random.normal(jax.random.split(k)[1], (2,)))(
        jax.random.split(base, N), rows(N, 2)
    )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    assert_keys_equal(rng.value, new)


def test_explicitly_broadcast_random_state_gives_every_lane_the_same_key():
    rng = statemap.RandomState(0)
    out = sync(statemap.shard_map(lambda x: x + rng.normal(()), state_in_axes={None: rng})(jnp.zeros(N)))
    want = jax.random.normal(jax.random.split(jax.random.PRNGKey(0))[1], ())
    assert_tree_allclose(out, jnp.full(N, want))
    assert_keys_equal(rng.value, jax.random.split(jax.random.PRNGKey(0))[0])


# Write policy.


def test_device_varying_write_to_a_broadcast_state_is_refused():
    acc = statemap.ParamState(jnp.zeros(2), name="acc")
    total = statemap.State(jnp.zeros(2), name="total")
    rng = statemap.RandomState(0)

    def f(x):
        total.value = total.value + jax.lax.psum(x, "d")
        acc.value = acc.value + x + rng.normal(())  # differs per device
        return x

    saved = snapshot([acc, total, rng])
    mapping = statemap.shard_map(f, "d")
    for _ in range(2):  # the cached plan refuses too
        with pytest.raises(statemap.BatchAxisError, match=r"(?s)statemap.shard_map: .*ParamState 'acc' \(shape \(2,\)\)"):
            mapping(rows(N, 2))
        assert_unchanged(saved)  # never device 0's value, and nothing else written either


def test_collective_write_to_a_broadcast_state_is_written_as_is():
    mean = statemap.ShortTermState(jnp.zeros(2), name="mean")
    x = rows(N, 2)
    sync(statemap.shard_map(lambda v: setattr(mean, "value", jax.lax.pmean(v, "d")), "d")(x))
    assert mean.value.shape == (2,)
    assert_tree_allclose(mean.value, x.mean(0))


@pytest.mark.parametrize("policy", ["warn", "ignore"])
def test_policy_warn_and_ignore_stack_on_axis_0(policy):
    acc = statemap.ParamState(jnp.ones(2), name="acc")

    def f(x):
        acc.value = acc.value + x

    mapping = statemap.shard_map(f, unexpected_out_state_mapping=policy)
    x = rows(N, 2)
    with pytest.warns(UserWarning, match=r"ParamState 'acc'") if policy == "warn" else contextlib.nullcontext():
        sync(mapping(x))
    assert acc.value.shape == (N, 2)
    assert_tree_allclose(acc.value, 1 + x)


def test_unknown_policy_raises_at_construction():
    with pytest.raises(ValueError, match=r"`unexpected_out_state_mapping`"):
        statemap.shard_map(lambda x: x, unexpected_out_state_mapping="drop")


def test_state_created_inside_comes_out_stacked_like_vmap():
    def make():
        rng = statemap.RandomState(3)
        return lambda: statemap.ParamState(rng.normal((2,)), name="w")

    w = sync(statemap.shard_map(make())())
    w_v = statemap.vmap(make(), axis_size=N)()
    assert isinstance(w, statemap.ParamState) and w.name == "w"
    assert w.value.shape == (N, 2)
    assert_concrete([w])
    np.testing.assert_array_equal(np.asarray(w.value), np.asarray(w_v.value))
    assert len({tuple(np.asarray(r)) for r in w.value}) == N


# All-or-nothing.


def test_failing_function_leaves_every_state_untouched():
    h = statemap.HiddenState(rows(N, 2), name="h")
    w = statemap.ParamState(jnp.ones(2), name="w")
    rng = statemap.RandomState(0)

    def bad(x):
        h.value = h.value + x
        w.value = w.value * 2 + jax.lax.psum(x, "d")
        rng.normal(())
        raise RuntimeError("boom in the lane")

    saved = snapshot([h, w, rng])
    mapping = statemap.shard_map(bad, "d", state_in_axes=statemap.HiddenState)
    with pytest.raises(RuntimeError, match="boom in the lane"):
        mapping(rows(N, 2))
    assert_unchanged(saved)


# States on the devices, warm calls.


def make_step():
    h = statemap.HiddenState(jnp.zeros((N, 3)), name="h")
    w = statemap.ParamState(jnp.ones(3), name="w")
    rng = statemap.RandomState(0)
    runs = []

    @statemap.shard_map(axis_name="d", state_in_axes=statemap.HiddenState)
    def step(x):
        runs.append(1)
        h.value = h.value * 0.5 + x * w.value + 0.01 * rng.normal((3,))
        w.value = w.value - 0.1 * jax.lax.pmean(x, "d")
        return h.value.sum()

    return step, (h, w, rng), runs


def test_states_stay_on_the_devices_split_sharded_and_broadcast_replicated():
    step, (h, w, rng), _ = make_step()
    x = rows(N, 3)
    for _ in range(2):
        sync(step(x))
        assert isinstance(h.value.sharding, NamedSharding)
        assert h.value.sharding.mesh == step.mesh and h.value.sharding.spec == P("d")
        assert h.value.sharding.shard_shape(h.value.shape) == (1, 3)  # one row per device
        for replicated in (w.value, rng.value):
            assert isinstance(replicated.sharding, NamedSharding) and replicated.sharding.spec == P()
            assert replicated.sharding.is_fully_replicated
            assert len(replicated.devices()) == N
    assert_tree_allclose(w.value, 1 - 0.2 * x.mean(0), rtol=1e-5)


def test_warm_calls_run_python_once_do_not_recompile_and_see_current_values():
    step, (h, w, rng), runs = make_step()
    x = sync(rows(N, 3))
    with compiles() as cold:
        sync(step(x))
    assert cold  # the listener does see statemap's compilations
    keys = {np.asarray(rng.value).tobytes()}
    with compiles() as warm:
        for _ in range(3):  # the second call is warm too: the states came back where they go
            sync(step(x))
            keys.add(np.asarray(rng.value).tobytes())
    assert warm == []
    assert runs == [1]
    assert len(keys) == 4  # the key advanced on every call
    w.value = jnp.full(3, 2.0, jnp.float32)  # a change between calls is seen, not baked in
    before = h.value
    sync(step(x))
    assert_tree_allclose(w.value, 2.0 - 0.1 * x.mean(0), rtol=1e-5)
    noise = h.value - (before * 0.5 + x * 2.0)
    assert float(jnp.abs(noise).max()) < 0.1
    assert runs == [1]


def test_donate_argnums_reuses_the_argument_buffers():
    x = jax.device_put(rows(N, 2), NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P("d")))  # where it goes
    kept = rows(N, 2)
    mapping = statemap.shard_map(lambda a, b: a + b, "d", donate_argnums=0)
    out = sync(mapping(x, kept))
    assert x.is_deleted()
    assert not kept.is_deleted()
    assert_tree_allclose(out, rows(N, 2) * 2)


def test_a_donated_argument_passed_again_raises_and_leaves_states_unchanged():
    h = statemap.HiddenState(jnp.zeros((N, 2)), name="h")
    x = jax.device_put(rows(N, 2), NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P("d")))

    def bump(a):
        h.value = h.value + a

    mapping = statemap.shard_map(bump, "d", donate_argnums=0, state_in_axes=statemap.HiddenState)
    sync(mapping(x))
    with pytest.raises(RuntimeError, match="has been deleted"):
        mapping(x)
    assert_tree_allclose(h.value, rows(N, 2))


def test_a_state_left_on_other_devices_moves_to_the_mesh():
    h = statemap.HiddenState(jnp.zeros((4, 2)), name="h")

    def bump(x):
        h.value = h.value + x

    first = statemap.shard_map(bump, devices=jax.devices()[4:], state_in_axes=statemap.HiddenState)
    second = statemap.shard_map(bump, devices=jax.devices()[:4], state_in_axes=statemap.HiddenState)
    sync(first(jnp.ones((4, 2))))
    assert set(h.value.devices()) == set(jax.devices()[4:])
    sync(second(jnp.ones((4, 2))))
    assert set(h.value.devices()) == set(jax.devices()[:4])
    assert_tree_allclose(h.value, jnp.full((4, 2), 2.0))



def test_inside_jit_a_state_left_on_other_devices_is_refused_with_the_fix():
    h = statemap.HiddenState(jnp.zeros((4, 2)), name="h")

    def bump(x):
        h.value = h.value + x
        return h.value.sum()

    first = statemap.shard_map(bump, devices=jax.devices()[4:], state_in_axes=statemap.HiddenState)
    second = statemap.shard_map(bump, devices=jax.devices()[:4], state_in_axes=statemap.HiddenState)
    sync(first(jnp.ones((4, 2))))
    saved = snapshot([h])
    with pytest.raises(ValueError, match=r"statemap\.jit: the program runs on other devices .*HiddenState 'h'.* is on device\(s\) \[4, 5, 6, 7\].*call the mapping once outside it"):
        statemap.jit(second)(jnp.ones((4, 2)))
    assert_unchanged(saved)
    sync(second(jnp.ones((4, 2))))  # the mapping on its own moves it
    assert_tree_allclose(statemap.jit(second)(jnp.ones((4, 2))), jnp.full(4, 6.0))


# Meshes and devices.


def test_mesh_4x2_mapped_over_its_first_axis_leaves_the_other_alone():
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    h = statemap.HiddenState(jnp.zeros((4, 6)), name="h")
    w = statemap.ParamState(rows(6, start=1.0), name="w")
    rng = statemap.RandomState(1)

    def f(x):
        h.value = h.value + x * w.value + 0.1 * rng.normal(())
        return jax.lax.psum(x, "data") + jax.lax.axis_index("data")

    def oracle_lane(hv, x, wv, key):
        new, base = jax.random.split(key)
        hn = hv + x * wv + 0.1 * lane_draw(base, "data", ())
        return hn, jax.lax.psum(x, "data") + jax.lax.axis_index("data"), new

    mapping = statemap.shard_map(f, "data", mesh=mesh, state_in_axes=statemap.HiddenState)
    oracle = raw(oracle_lane, (P("data"), P("data"), P(), P()), (P("data"), P("data"), P()), mesh, "data")
    # An input laid out over both axes, as a data + model program keeps it.
    x = jax.device_put(rows(4, 6), NamedSharding(mesh, P("data", "model")))
    hv, key = h.value, rng.value
    for _ in range(2):
        out = sync(mapping(x))
        hv, want, key = sync(oracle(hv, x, w.value, key))
        assert out.shape == (4, 6)
        assert_tree_allclose(out, want)
        assert_tree_allclose(h.value, hv)
        assert_keys_equal(rng.value, key)
    for value in (out, h.value):
        assert value.sharding.mesh == mesh and value.sharding.spec == P("data")
    assert_tree_allclose(out[:, 0], rows(4, 6).sum(0)[0] + jnp.arange(4.0))


def test_devices_subset():
    devs = [jax.devices()[i] for i in (1, 3, 5, 6)]
    h = statemap.HiddenState(jnp.zeros((4, 2)), name="h")

    def f(x):
        h.value = h.value + jax.lax.psum(x, "d")
        return x * 2

    mapping = statemap.shard_map(f, "d", devices=devs, state_in_axes=statemap.HiddenState)
    x = rows(4, 2)
    out = sync(mapping(x))
    assert_tree_allclose(out, x * 2)
    assert_tree_allclose(h.value, jnp.broadcast_to(x.sum(0), (4, 2)))
    assert set(out.devices()) == set(devs) and set(h.value.devices()) == set(devs)
    assert "mesh: {'d': 4}, lanes along 'd'" in str(mapping.explain(x))


def test_axis_size_defaults_to_the_mesh_axis():
    rng = statemap.RandomState(2)
    out = sync(statemap.shard_map(lambda: rng.normal(()), devices=jax.devices()[:3])())
    assert out.shape == (3,)
    assert len(set(np.asarray(out).tolist())) == 3


@pytest.mark.parametrize("how", ["argument", "axis_size"])
def test_axis_size_not_matching_the_mesh_axis_raises(how):
    h = statemap.HiddenState(jnp.zeros(2), name="h")
    rng = statemap.RandomState(0)
    calls = []

    def f(*x):
        calls.append(1)
        h.value = h.value + rng.normal(())

    saved = snapshot([h, rng])
    if how == "argument":
        mapping, args = statemap.shard_map(f, "d"), (rows(4, 2),)
    else:
        mapping, args = statemap.shard_map(f, "d", axis_size=4), ()
    with pytest.raises(ValueError, match=r"axis has size 4, but mesh axis 'd' has 8 devices"):
        mapping(*args)
    assert_unchanged(saved)
    assert calls == []


def test_bad_mesh_and_devices_raise():
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    with pytest.raises(ValueError, match=r"`axis_name` 'batch' is not an axis of the mesh"):
        statemap.shard_map(lambda x: x, "batch", mesh=mesh)
    with pytest.raises(ValueError, match=r"no `axis_name` was given \(axes \('data', 'model'\)\)\. Pass the mesh axis"):
        statemap.shard_map(lambda x: x, mesh=mesh)
    with pytest.raises(ValueError, match=r"pass `mesh` or `devices`, not both"):
        statemap.shard_map(lambda x: x, "data", mesh=mesh, devices=jax.devices()[:4])
    with pytest.raises(ValueError, match=r"pass `mesh` or `devices`, not both"):  # decorator form: at once
        statemap.shard_map(axis_name="data", mesh=mesh, devices=jax.devices()[:4])
    with pytest.raises(TypeError, match=r"`mesh` must be a jax.sharding.Mesh"):
        statemap.shard_map(lambda x: x, "data", mesh=("data",))
    with pytest.raises(TypeError, match=r"`devices` must be a non-empty sequence of jax.Device"):
        statemap.shard_map(lambda x: x, devices=[])


# Nesting.


def test_vmap_inside_shard_map_splits_states_at_both_levels():
    devices, batch, features = 4, 3, 2
    h = statemap.HiddenState(rows(devices, batch, features), name="h")
    w = statemap.ParamState(jnp.full(features, 0.5), name="w")
    rng = statemap.RandomState(6)
    runs = []

    def cell(x):
        runs.append(1)
        h.value = jnp.tanh(h.value * w.value + x) + 0.1 * rng.normal(())
        return jax.lax.psum(h.value.sum(), "d")

    inner = statemap.vmap(cell, axis_name="b", state_in_axes=statemap.HiddenState)
    outer = statemap.shard_map(lambda x: inner(x), "d", devices=jax.devices()[:devices], state_in_axes=statemap.HiddenState)

    def oracle_lane(hv, x, wv, key):
        new, base = jax.random.split(key)
        device_key = jax.random.fold_in(base, jax.lax.axis_index("d"))

        def one(hb, xb, b):
            _, inner_base = jax.random.split(device_key)
            noise = jax.random.normal(jax.random.split(jax.random.fold_in(inner_base, b))[1], ())
            hn = jnp.tanh(hb * wv + xb) + 0.1 * noise
            return hn, jax.lax.psum(hn.sum(), "d")

        hn, out = jax.vmap(one)(hv[0], x[0], jnp.arange(batch))
        return hn[None], out[None], new

    mesh = Mesh(np.array(jax.devices()[:devices]), ("d",))
    oracle = raw(oracle_lane, (P("d"), P("d"), P(), P()), (P("d"), P("d"), P()), mesh)
    hv, key = h.value, rng.value
    for step in range(2):
        x = rows(devices, batch, features, start=step)
        out = sync(outer(x))
        hv, expected, key = sync(oracle(hv, x, w.value, key))
        assert out.shape == (devices, batch)
        assert_tree_allclose(out, expected, rtol=1e-5)
        assert_tree_allclose(h.value, hv, rtol=1e-5)
        assert_keys_equal(rng.value, key)
    assert len(runs) == 1
    assert_concrete([h, w, rng])


def test_shard_map_inside_statemap_jit():
    def make():
        step, states, runs = make_step()
        return step, states, runs

    step_j, states_j, runs = make()
    step_e, states_e, _ = make()
    jitted = statemap.jit(lambda x: step_j(x) * 2)
    for i in range(3):
        x = rows(N, 3, start=i)
        out = sync(jitted(x))
        assert_tree_allclose(out, sync(step_e(x)) * 2, rtol=1e-5)
        for a, b in zip(states_j, states_e):
            assert_tree_allclose(a.value, b.value, rtol=1e-5)
    assert runs == [1]
    assert_concrete(states_j)
    assert states_j[0].value.shape == (N, 3)
