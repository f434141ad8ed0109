"""statemap.pmap / PMapMapping, checked against hand-threaded ``jax.pmap`` oracles.

Every oracle passes the states' values explicitly through ``jax.pmap`` and
returns the new values, which is what statemap must do for the user. The
8 CPU devices come from ``tests/conftest.py``. Loops over calls with
collectives sync every step (JAX-NOTES fact 10).
"""

import doctest
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compiles
from helpers import assert_concrete, assert_tree_allclose, assert_unchanged, snapshot

import statemap

N = 8


def rows(*shape, start=0.0):
    """A small float32 array with distinct entries."""
    return jnp.arange(start, start + np.prod(shape), dtype=jnp.float32).reshape(shape) / 10


def key_bits(key):
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key)


# Names and forms.


def test_pmap2_is_pmap():
    assert statemap.pmap2 is statemap.pmap


def test_bare_decorator_matches_jax_pmap():
    @statemap.pmap
    def double(x):
        return x * 2 + 1

    assert isinstance(double, statemap.PMapMapping)
    x = rows(N, 3)
    assert_tree_allclose(double(x), jax.pmap(lambda v: v * 2 + 1)(x))


def test_decorator_with_axis_name_runs_collectives():
    @statemap.pmap(axis_name="i")
    def centred(x):
        return x - jax.lax.pmean(x, "i")

    x = rows(N, 2)
    oracle = jax.pmap(lambda v: v - jax.lax.pmean(v, "i"), axis_name="i")
    assert isinstance(centred, statemap.PMapMapping)
    assert_tree_allclose(centred(x), oracle(x))


def test_direct_mapping_with_state():
    total = statemap.State(jnp.zeros(()), name="total")

    def add(x):
        total.value = total.value + jax.lax.psum(x, "d")
        return x + 1

    x = rows(N)
    out = statemap.PMapMapping(add, axis_name="d")(x)
    assert_tree_allclose(out, x + 1)
    assert_tree_allclose(total.value, jnp.sum(x))


def test_axis_name_is_second_positional():
    mapping = statemap.pmap(lambda x: jax.lax.psum(x, "d"), "d")
    assert mapping.axis_name == "d"
    x = rows(N)
    assert_tree_allclose(mapping(x), jnp.full(N, jnp.sum(x)))


def test_docstring_examples_run():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(statemap.pmap, "statemap.pmap") + finder.find(statemap.PMapMapping, "statemap.PMapMapping")
    assert sum(len(t.examples) for t in tests) >= 10
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_kwargs_are_mapped_on_axis_0():
    x, y = rows(N, 2), rows(N, 2, start=5.0)
    out = statemap.pmap(lambda a, b: a * b)(x, b=y)
    assert_tree_allclose(out, jax.pmap(lambda a, b: a * b)(x, b=y))


# in_axes and out_axes.


def test_in_axes_tuple_with_none():
    x, w = rows(N, 3), rows(3, start=1.0)
    out = statemap.pmap(lambda a, b: a @ b, in_axes=(0, None))(x, w)
    assert_tree_allclose(out, jax.pmap(lambda a, b: a @ b, in_axes=(0, None))(x, w))


@pytest.mark.parametrize("axis", [-1, 1])
def test_negative_and_positive_in_axes(axis):
    x = rows(3, N)  # mapped over its last axis
    out = statemap.pmap(lambda v: v * 2, in_axes=axis)(x)
    oracle = jax.pmap(lambda v: v * 2)(jnp.moveaxis(x, 1, 0))
    assert out.shape == (N, 3)
    assert_tree_allclose(out, oracle)


def test_negative_out_axes():
    x = rows(N, 2, 3)
    out = statemap.pmap(lambda v: v + 1, out_axes=-1)(x)
    oracle = jnp.moveaxis(jax.pmap(lambda v: v + 1)(x), 0, -1)
    assert out.shape == (2, 3, N)
    assert_tree_allclose(out, oracle)


def test_out_axes_none_for_a_collective_result():
    x = rows(N, 2)
    out, total = statemap.pmap(lambda v: (v * 2, jax.lax.psum(v, "d")), "d", out_axes=(0, None))(x)
    assert_tree_allclose(out, x * 2)
    assert total.shape == (2,)
    assert_tree_allclose(total, x.sum(0))


def test_out_axes_none_for_a_device_varying_output_raises():
    # jax.pmap would silently return device 0's value here (JAX-NOTES fact 2).
    acc = statemap.State(jnp.zeros(2), name="acc")
    rng = statemap.RandomState(0)

    def f(x):
        acc.value = acc.value + jax.lax.psum(x, "d")
        return x + rng.normal(())

    saved = snapshot([acc, rng])
    with pytest.raises(ValueError, match=r"varies across the mapped axis, but `out_axes` is None"):
        statemap.pmap(f, "d", out_axes=None)(rows(N, 2))
    assert_unchanged(saved)


def test_bad_axes_raise():
    x = rows(N, 2)
    with pytest.raises(ValueError, match=r"`in_axes` has 2 entries but the function was called with 1"):
        statemap.pmap(lambda v: v, in_axes=(0, 0))(x)
    with pytest.raises(ValueError, match=r"`in_axes` maps argument args\[0\] \(shape \(8, 2\)\) on axis -3"):
        statemap.pmap(lambda v: v, in_axes=-3)(x)
    with pytest.raises(ValueError, match=r"`out_axes` 2 is out of range"):
        statemap.pmap(lambda v: v, out_axes=2)(rows(N))
    with pytest.raises(TypeError, match=r"`in_axes` must be an int, None, or a pytree"):
        statemap.pmap(lambda v: v, in_axes="0")


# static_broadcasted_argnums.


def test_static_argnums_are_compile_time_constants():
    seen = []

    def power(x, n, y):
        seen.append(n)
        for _ in range(n):  # needs a Python int, not a tracer
            x = x * y
        return x

    def oracle_power(x, n, y):
        return x * y**n

    mapping = statemap.pmap(power, static_broadcasted_argnums=1, in_axes=(0, None, None))
    oracle = jax.pmap(oracle_power, static_broadcasted_argnums=1, in_axes=(0, None, None))
    x, y = rows(N, start=1.0), jnp.float32(1.5)
    assert_tree_allclose(mapping(x, 2, y), oracle(x, 2, y))
    assert_tree_allclose(mapping(x, 2, y), oracle(x, 2, y))
    seen.clear()
    assert_tree_allclose(mapping(x, 3, y), oracle(x, 3, y))
    assert seen == [3]  # a new static value is a new trace, seeing the plain int
    seen.clear()
    mapping(x, 2, y)
    mapping(x, 3, y)
    assert seen == []  # both traces are cached


def test_unhashable_static_arg_raises():
    mapping = statemap.pmap(lambda x, shape: x.reshape(shape), static_broadcasted_argnums=(1,))
    with pytest.raises(TypeError, match=r"static argument args\[1\] is a list, which is not hashable"):
        mapping(rows(N, 4), [2, 2])
    assert mapping(rows(N, 4), (2, 2)).shape == (N, 2, 2)


# devices, backend, axis size.


def test_devices_subset():
    devs = [jax.devices()[i] for i in (1, 3, 5, 6)]
    h = statemap.HiddenState(jnp.zeros((4, 2)), name="h")

    def f(x):
        h.value = h.value + jax.lax.psum(x, "d")
        return x * 2

    mapping = statemap.pmap(f, "d", devices=devs, state_in_axes=statemap.HiddenState)
    x = rows(4, 2)
    out = mapping(x)
    assert_tree_allclose(out, x * 2)
    assert_tree_allclose(h.value, jnp.broadcast_to(x.sum(0), (4, 2)))
    assert set(out.devices()) == set(devs)
    assert set(h.value.devices()) == set(devs)


@pytest.mark.parametrize("size", [2, 8])
def test_size_differing_from_devices_raises(size):
    devs = jax.devices()[:4]
    h = statemap.HiddenState(jnp.zeros((size, 2)), name="h")
    rng = statemap.RandomState(0)
    calls = []

    def f(x):
        calls.append(1)
        h.value = h.value + x + rng.normal(())
        return x

    saved = snapshot([h, rng])
    mapping = statemap.pmap(f, devices=devs, state_in_axes=statemap.HiddenState)
    with pytest.raises(ValueError, match=rf"axis has size {size}, but `devices` lists 4 devices"):
        mapping(rows(size, 2))
    assert_unchanged(saved)
    assert calls == []


def test_devices_default_axis_size_is_len_devices():
    devs = jax.devices()[2:5]
    rng = statemap.RandomState(3)
    out = statemap.pmap(lambda: rng.uniform((2,)), devices=devs)()
    assert out.shape == (3, 2)
    assert set(out.devices()) == set(devs)
    assert len({tuple(np.asarray(row)) for row in out}) == 3


def test_bad_devices_and_backend_raise():
    with pytest.raises(TypeError, match=r"`devices` must be a non-empty sequence of jax.Device"):
        statemap.pmap(lambda x: x, devices=[])
    with pytest.raises(TypeError, match=r"`devices` must be a non-empty sequence of jax.Device"):
        statemap.pmap(lambda x: x, devices=["cpu:0"])
    with pytest.raises(TypeError, match=r"`backend` must be a str"):
        statemap.pmap(lambda x: x, backend=0)


def test_backend_cpu():
    x = rows(N, 2)
    out = statemap.pmap(lambda v: jax.lax.psum(v, "d"), "d", backend="cpu")(x)
    assert_tree_allclose(out, jax.pmap(lambda v: jax.lax.psum(v, "d"), "d", backend="cpu")(x))
    assert {d.platform for d in out.devices()} == {"cpu"}


def test_axis_size_without_mapped_input():
    w = statemap.ParamState(rows(3), name="w")
    rng = statemap.RandomState(1)

    def f():
        return w.value + rng.normal(())

    out = statemap.pmap(f, axis_size=4)()
    assert out.shape == (4, 3)
    assert set(out.devices()) == set(jax.devices()[:4])
    noise = out - w.value
    assert_tree_allclose(noise, jnp.broadcast_to(noise[:, :1], (4, 3)))
    assert len(set(np.asarray(noise[:, 0]).tolist())) == 4


def test_axis_size_defaults_to_local_device_count():
    rng = statemap.RandomState(2)
    out = statemap.pmap(lambda: rng.normal(()))()
    assert out.shape == (jax.local_device_count(),) == (N,)
    assert len(set(np.asarray(out).tolist())) == N


def test_more_lanes_than_devices_raises_before_running():
    w = statemap.ParamState(jnp.ones(2), name="w")
    rng = statemap.RandomState(0)
    calls = []

    def f(x):
        calls.append(1)
        w.value = w.value + jax.lax.psum(x, "d") + rng.normal(())
        return x

    saved = snapshot([w, rng])
    with pytest.raises(ValueError, match=r"axis has size 9, but only 8 devices are available"):
        statemap.pmap(f, "d")(rows(N + 1, 2))
    assert_unchanged(saved)
    assert calls == []


def test_more_lanes_than_devices_from_a_split_state_raises():
    h = statemap.HiddenState(jnp.zeros((N + 1, 2)), name="h")
    rng = statemap.RandomState(0)

    def f():
        h.value = h.value + rng.normal(())

    saved = snapshot([h, rng])
    with pytest.raises(ValueError, match=r"axis has size 9, but only 8 devices are available"):
        statemap.pmap(f, state_in_axes=statemap.HiddenState)()
    assert_unchanged(saved)


def test_axis_size_larger_than_devices_raises():
    rng = statemap.RandomState(0)
    saved = snapshot([rng])
    with pytest.raises(ValueError, match=r"axis has size 16, but only 8 devices are available"):
        statemap.pmap(lambda: rng.normal(()), axis_size=16)()
    assert_unchanged(saved)


def test_global_arg_shapes_raises():
    with pytest.raises(ValueError, match=r"`global_arg_shapes` is no longer supported by JAX"):
        statemap.pmap(lambda x: x, global_arg_shapes=((3,),))
    with pytest.raises(ValueError, match=r"`global_arg_shapes`"):
        statemap.PMapMapping(lambda x: x, global_arg_shapes=((3,),))
    with pytest.raises(ValueError, match=r"`global_arg_shapes`"):  # decorator form: before any call

        @statemap.pmap(axis_name="i", global_arg_shapes=((3,),))
        def f(x):
            return x


def test_unknown_policy_raises_at_construction():
    with pytest.raises(ValueError, match=r"unexpected_out_state_mapping"):
        statemap.pmap(lambda x: x, unexpected_out_state_mapping="drop")


def test_donate_argnums():
    x = jax.pmap(lambda v: v * 1)(rows(N, 2))  # already laid out on the devices
    kept = rows(N, 2)
    mapping = statemap.pmap(lambda a, b: a + b, donate_argnums=0)
    out = mapping(x, kept)
    assert x.is_deleted()
    assert not kept.is_deleted()
    assert_tree_allclose(out, rows(N, 2) + kept)


def test_donate_argnums_counts_static_arguments():
    x = jax.pmap(lambda v: v * 1)(rows(N, 2))
    mapping = statemap.pmap(lambda n, a: a * n, static_broadcasted_argnums=0, donate_argnums=1)
    out = mapping(3, x)
    assert x.is_deleted()
    assert_tree_allclose(out, rows(N, 2) * 3)


def test_failure_while_running_leaves_states_untouched():
    h = statemap.HiddenState(jnp.zeros((N, 2)), name="h")
    rng = statemap.RandomState(0)

    def f(x):
        h.value = h.value + x + rng.normal(())
        return x * 2

    mapping = statemap.pmap(f, state_in_axes=statemap.HiddenState, donate_argnums=0)
    x = jax.pmap(lambda v: v * 1)(rows(N, 2))
    mapping(x)
    saved = snapshot([h, rng])
    with pytest.raises(RuntimeError, match=r"(?i)deleted"):
        mapping(x)  # a warm call whose program fails: x was donated by the first call
    assert_unchanged(saved)


# explain.


def test_explain_names_devices_and_changes_nothing():
    devs = [jax.devices()[i] for i in (0, 2, 4, 7)]
    h = statemap.HiddenState(jnp.zeros((4, 2)), name="h")
    w = statemap.ParamState(jnp.ones(2), name="w")
    rng = statemap.RandomState(0)
    runs = []

    def f(x):
        runs.append(1)
        h.value = h.value * w.value + x + rng.normal(())
        w.value = w.value - jax.lax.pmean(x, "d")
        return x

    mapping = statemap.pmap(f, "d", devices=devs, state_in_axes=statemap.HiddenState)
    saved = snapshot([h, w, rng])
    text = str(mapping.explain(rows(4, 2)))
    assert_unchanged(saved)
    assert text.splitlines()[0].startswith("statemap.pmap plan for f: 4 lanes")
    assert f"devices: {', '.join(str(d) for d in devs)}" in text
    assert "cpu:1" not in text
    assert "split on axis 0" in text and "stacked on axis 0" in text
    assert "written as is" in text and "per-lane key" in text
    mapping(rows(4, 2))
    assert runs == [1]  # the call reused the explained plan


def test_explain_shows_a_refused_write():
    acc = statemap.ParamState(jnp.zeros(2), name="acc")

    def f(x):
        acc.value = acc.value + x

    text = str(statemap.pmap(f).explain(rows(N, 2)))
    assert "ParamState 'acc' (2,)" in text
    assert "refused" in text and "cpu:7" in text
    assert_tree_allclose(acc.value, jnp.zeros(2))


def test_explain_default_devices():
    text = str(statemap.pmap(lambda x: x).explain(rows(4)))
    assert "devices: cpu:0, cpu:1, cpu:2, cpu:3" in text
    assert "cpu:4" not in text


def test_explain_when_the_devices_give_the_size():
    rng = statemap.RandomState(0)
    text = str(statemap.pmap(lambda: rng.normal(()), devices=jax.devices()[5:]).explain())
    assert text.splitlines()[0].startswith("statemap.pmap plan for <lambda>: 3 lanes")
    assert "devices: cpu:5, cpu:6, cpu:7" in text
    assert "RandomState (2,)  per-lane key  advanced once" in text
    text = str(statemap.pmap(lambda: rng.normal(())).explain())
    assert ": 8 lanes" in text and "cpu:7" in text


# Write-back: never silently keep device 0's value.


def test_device_varying_write_to_broadcast_state_raises():
    acc = statemap.ParamState(jnp.zeros(2), name="acc")
    rng = statemap.RandomState(0)

    def f(x):
        acc.value = acc.value + x + rng.normal(())
        return x

    saved = snapshot([acc, rng])
    with pytest.raises(statemap.BatchAxisError, match=r"ParamState 'acc'.*\n.*state_out_axes"):
        statemap.pmap(f)(rows(N, 2))
    assert_unchanged(saved)


def test_device_varying_write_under_warn_is_stacked():
    acc = statemap.ParamState(rows(2), name="acc")
    x = rows(N, 2, start=1.0)
    oracle = jax.pmap(lambda a, v: a + v, in_axes=(None, 0))(acc.value, x)

    def f(v):
        acc.value = acc.value + v

    with pytest.warns(UserWarning, match=r"ParamState 'acc'.*stacked along axis 0"):
        statemap.pmap(f, unexpected_out_state_mapping="warn")(x)
    assert acc.value.shape == (N, 2)
    assert_tree_allclose(acc.value, oracle)


def test_device_varying_write_under_ignore_is_stacked_silently():
    acc = statemap.ParamState(rows(2), name="acc")
    x = rows(N, 2, start=1.0)

    def f(v):
        acc.value = acc.value * v

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        statemap.pmap(f, unexpected_out_state_mapping="ignore")(x)
    assert_tree_allclose(acc.value, rows(2) * x)


def test_psummed_write_is_written_as_is():
    acc = statemap.ParamState(rows(2), name="acc")
    x = rows(N, 2, start=1.0)
    oracle = jax.pmap(lambda a, v: a + jax.lax.psum(v, "d"), "d", in_axes=(None, 0), out_axes=None)

    def f(v):
        acc.value = acc.value + jax.lax.psum(v, "d")

    expected = oracle(acc.value, x)
    statemap.pmap(f, "d")(x)
    assert acc.value.shape == (2,)
    assert_tree_allclose(acc.value, expected)


SHIFT = [(i, (i + 1) % N) for i in range(N)]


@pytest.mark.parametrize(
    "update",
    [
        lambda c, v: c + jax.lax.psum(v, "d"),
        lambda c, v: c + jax.lax.pmax(v, "d"),
        lambda c, v: c + jax.lax.all_gather(v, "d").sum(),
    ],
    ids=["psum", "pmax", "all_gather"],
)
def test_collective_results_are_written_as_is(update):
    c = statemap.State(jnp.float32(1.0), name="c")
    x = rows(N, start=1.0)
    expected = jax.pmap(update, "d", in_axes=(None, 0), out_axes=None)(c.value, x)

    def f(v):
        c.value = update(c.value, v)

    statemap.pmap(f, "d")(x)
    assert c.value.shape == ()
    assert_tree_allclose(c.value, expected)


@pytest.mark.parametrize(
    "update",
    [
        lambda c, v: c + jax.lax.axis_index("d"),
        lambda c, v: c + jax.lax.ppermute(v, "d", SHIFT),
    ],
    ids=["axis_index", "ppermute"],
)
def test_device_varying_collective_results_are_refused_or_stacked(update):
    c = statemap.State(jnp.float32(1.0), name="c")
    x = rows(N, start=1.0)
    expected = jax.pmap(update, "d", in_axes=(None, 0))(c.value, x)

    def f(v):
        c.value = update(c.value, v)

    saved = snapshot([c])
    with pytest.raises(statemap.BatchAxisError, match=r"State 'c'"):
        statemap.pmap(f, "d")(x)
    assert_unchanged(saved)
    statemap.pmap(f, "d", state_out_axes={0: c})(x)
    assert c.value.shape == (N,)
    assert_tree_allclose(c.value, expected)


def test_declared_broadcast_output_that_varies_is_refused():
    acc = statemap.ParamState(jnp.zeros(2), name="acc")
    saved = snapshot([acc])

    def f(v):
        acc.value = acc.value + v

    mapping = statemap.pmap(f, state_out_axes={None: statemap.ParamState}, unexpected_out_state_mapping="ignore")
    with pytest.raises(statemap.BatchAxisError, match=r"`state_out_axes` maps it to None"):
        mapping(rows(N, 2))
    assert_unchanged(saved)


# state_in_axes / state_out_axes.


@pytest.mark.parametrize("axis", [1, -1])
def test_state_split_on_a_later_axis_returns_there(axis):
    h = statemap.HiddenState(rows(3, N), name="h")
    x = rows(N, start=2.0)
    oracle = jax.pmap(lambda hv, v: hv * 2 + v, in_axes=(1, 0), out_axes=1)
    expected = oracle(h.value, x)

    def f(v):
        h.value = h.value * 2 + v
        return h.value.sum()

    out = statemap.pmap(f, state_in_axes={axis: statemap.HiddenState})(x)
    assert h.value.shape == (3, N)
    assert_tree_allclose(h.value, expected)
    assert_tree_allclose(out, expected.sum(0))


def test_state_out_axes_negative_moves_a_split_state():
    h = statemap.HiddenState(rows(N, 3), name="h")
    expected = jnp.moveaxis(jax.pmap(lambda hv: hv + 1)(h.value), 0, -1)

    def f():
        h.value = h.value + 1

    statemap.pmap(f, state_in_axes=statemap.HiddenState, state_out_axes={-1: statemap.HiddenState})()
    assert h.value.shape == (3, N)
    assert_tree_allclose(h.value, expected)


def test_state_out_axes_stacks_a_broadcast_state():
    acc = statemap.LongTermState(rows(2), name="acc")
    x = rows(N, 2, start=1.0)
    expected = jax.pmap(lambda a, v: a + v, in_axes=(None, 0), out_axes=1)(acc.value, x)

    def f(v):
        acc.value = acc.value + v

    statemap.pmap(f, state_out_axes={1: "acc-tag", -1: statemap.LongTermState})(x)
    assert acc.value.shape == (2, N)
    assert_tree_allclose(acc.value, expected)


def test_state_in_axes_filters_first_match_wins_and_none_broadcasts():
    a = statemap.State(rows(N, 2), name="a")
    b = statemap.State(rows(N, 2), name="b")
    calls = []

    def f():
        calls.append((a.value.shape, b.value.shape))
        return a.value.sum() + b.value.sum()

    a_before, b_before = a.value, b.value
    out = statemap.pmap(f, state_in_axes={None: b, 0: statemap.State})()
    assert calls == [((2,), (N, 2))]
    assert a.value is a_before and b.value is b_before  # read, not written: untouched
    assert_tree_allclose(out, a.value.sum(1) + b.value.sum())


def test_state_created_inside_comes_out_stacked():
    rng = statemap.RandomState(0)

    def init():
        return statemap.ParamState(rng.normal((2,)), name="w")

    w = statemap.pmap(init)()
    assert isinstance(w, statemap.ParamState) and w.name == "w"
    assert w.value.shape == (N, 2)
    assert_concrete([w])
    assert len({tuple(np.asarray(r)) for r in w.value}) == N


# Per-device keys.


@pytest.mark.parametrize("seed", [0, jax.random.key(7)], ids=["legacy", "typed"])
def test_pmap_and_vmap_give_lane_i_the_same_keys(seed):
    def make():
        rng = statemap.RandomState(seed)
        bias = statemap.ParamState(rows(2), name="bias")

        def noisy(x):
            return x + bias.value + rng.normal((2,)) + rng.uniform(())

        return rng, noisy

    x = rows(N, 2)
    rng_p, noisy_p = make()
    rng_v, noisy_v = make()
    pmapped, vmapped = statemap.pmap(noisy_p), statemap.vmap(noisy_v)
    outs = []
    for _ in range(2):
        out_p, out_v = pmapped(x), vmapped(x)
        np.testing.assert_array_equal(np.asarray(out_p), np.asarray(out_v))
        np.testing.assert_array_equal(key_bits(rng_p.value), key_bits(rng_v.value))
        noise = np.asarray(out_p - x)
        assert len({tuple(r) for r in noise}) == N  # no two devices share a key
        outs.append(np.asarray(out_p))
    assert not np.array_equal(outs[0], outs[1])  # the state advanced between calls


def test_random_state_advances_once_and_deterministically():
    rng = statemap.RandomState(0)
    start = key_bits(rng.value)
    f = statemap.pmap(lambda: rng.normal(()) + rng.normal(()))
    out1 = f()
    after1 = key_bits(rng.value)
    assert not np.array_equal(after1, start)
    rng.seed(0)
    out2 = f()  # same seed, same numbers
    np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))
    np.testing.assert_array_equal(key_bits(rng.value), after1)
    assert len(set(np.asarray(out1).tolist())) == N


def test_per_device_keys_match_the_explicit_key_oracle():
    # The key scheme pinned here: the state advances once, to split(k)[0];
    # device i draws with fold_in(split(k)[1], i) == split(split(k)[1], n)[i]
    # (JAX-NOTES fact 3), exactly as statemap.vmap's lane i does.
    rng = statemap.RandomState(4)
    key = rng.value
    out = statemap.pmap(lambda x: x + rng.normal((2,)))(rows(N, 2))
    new_key, base = jax.random.split(key)

    def lane(k, x):
        _, draw = jax.random.split(k)  # what rng.normal does with the lane's key
        return x + jax.random.normal(draw, (2,))

    expected = jax.pmap(lane)(jax.random.split(base, N), rows(N, 2))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    np.testing.assert_array_equal(key_bits(rng.value), key_bits(new_key))


# Collectives.


def test_data_parallel_sgd_matches_single_device_oracle():
    per_device, features, lr = 2, 3, 0.1
    data = np.random.default_rng(0).normal(size=(N * per_device, features)).astype(np.float32)
    x_all = jnp.asarray(data)
    y_all = x_all @ jnp.array([1.0, -2.0, 0.5]) + 0.3
    w = statemap.ParamState(jnp.zeros(features), name="w")
    b = statemap.ParamState(jnp.zeros(()), name="b")
    runs = []

    def loss(params, x, y):
        wv, bv = params
        return jnp.mean((x @ wv + bv - y) ** 2)

    @statemap.pmap(axis_name="batch")
    def sgd_step(x, y):
        runs.append(1)
        value, grads = jax.value_and_grad(loss)((w.value, b.value), x, y)
        grads = jax.lax.pmean(grads, "batch")
        w.value = w.value - lr * grads[0]
        b.value = b.value - lr * grads[1]
        return jax.lax.pmean(value, "batch")

    params = (jnp.zeros(features), jnp.zeros(()))
    xs, ys = x_all.reshape(N, per_device, features), y_all.reshape(N, per_device)
    for _ in range(5):
        value = jax.block_until_ready(sgd_step(xs, ys))
        expected, grads = jax.value_and_grad(loss)(params, x_all, y_all)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        assert_tree_allclose(value, jnp.full(N, expected), rtol=1e-5)
        assert w.value.shape == (features,) and b.value.shape == ()
        assert_tree_allclose((w.value, b.value), params, rtol=1e-5)
    assert runs == [1]
    assert float(loss(params, x_all, y_all)) < float(expected)


def test_vmap_inside_pmap_splits_states_at_both_levels():
    devices, batch, features = 4, 3, 2
    h = statemap.HiddenState(rows(devices, batch, features), name="h")
    w = statemap.ParamState(jnp.full(features, 0.5), name="w")
    runs = []

    def cell(x):
        runs.append(1)
        h.value = jnp.tanh(h.value * w.value + x)
        return h.value.sum()

    inner = statemap.vmap(cell, axis_name="b", state_in_axes=statemap.HiddenState)
    outer = statemap.pmap(lambda x: inner(x), axis_name="d", state_in_axes=statemap.HiddenState)

    def o_cell(hv, x, wv):
        hn = jnp.tanh(hv * wv + x)
        return hn, hn.sum()

    oracle = jax.pmap(jax.vmap(o_cell, in_axes=(0, 0, None)), in_axes=(0, 0, None))
    hv = h.value
    for step in range(3):
        x = rows(devices, batch, features, start=step)
        out = jax.block_until_ready(outer(x))
        hv, expected = jax.block_until_ready(oracle(hv, x, w.value))
        assert out.shape == (devices, batch)
        assert_tree_allclose(out, expected)
        assert h.value.shape == (devices, batch, features)
        assert_tree_allclose(h.value, hv)
        assert len(h.value.devices()) == devices
    assert len(runs) == 1
    assert_concrete([h, w])


def test_vmap_inside_pmap_with_collectives_at_both_levels():
    devices, batch = 4, 3
    h = statemap.HiddenState(rows(devices, batch), name="h")
    total = statemap.State(jnp.zeros(()), name="total")

    def cell(x):
        h.value = h.value + x - jax.lax.pmean(x, "b")
        total.value = total.value + jax.lax.psum(jax.lax.psum(x, "b"), "d")
        return jax.lax.psum(h.value, "d")

    inner = statemap.vmap(cell, axis_name="b", state_in_axes=statemap.HiddenState)
    outer = statemap.pmap(inner, axis_name="d", state_in_axes=statemap.HiddenState)

    def o_cell(hv, x):
        hn = hv + x - jax.lax.pmean(x, "b")
        return hn, jax.lax.psum(hn, "d")

    oracle = jax.pmap(jax.vmap(o_cell, axis_name="b"), axis_name="d")
    x = rows(devices, batch, start=1.0)
    hv, expected = oracle(h.value, x)
    out = jax.block_until_ready(outer(x))
    assert_tree_allclose(out, expected)
    assert_tree_allclose(h.value, hv)
    assert total.value.shape == ()
    assert_tree_allclose(total.value, x.sum())


def test_nested_random_pmap_of_vmap_matches_vmap_of_vmap():
    def make():
        rng = statemap.RandomState(11)
        return rng, lambda x: x + rng.normal(())

    x = jnp.zeros((4, 3))
    rng_p, f_p = make()
    rng_v, f_v = make()
    out_p = statemap.pmap(statemap.vmap(f_p))(x)
    out_v = statemap.vmap(statemap.vmap(f_v))(x)
    np.testing.assert_array_equal(np.asarray(out_p), np.asarray(out_v))
    np.testing.assert_array_equal(key_bits(rng_p.value), key_bits(rng_v.value))
    assert len(set(np.asarray(out_p).ravel().tolist())) == 12


# All-or-nothing, tracer leaks.


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
    mapping = statemap.pmap(bad, "d", state_in_axes=statemap.HiddenState)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="boom in the lane"):
            mapping(rows(N, 2))
        assert_unchanged(saved)


def test_failing_inner_vmap_leaves_states_untouched():
    h = statemap.HiddenState(rows(4, 3, 2), name="h")
    rng = statemap.RandomState(0)

    def cell(x):
        h.value = h.value + x + rng.normal(())
        raise KeyError("inner")

    inner = statemap.vmap(cell, state_in_axes=statemap.HiddenState)
    outer = statemap.pmap(lambda x: inner(x), state_in_axes=statemap.HiddenState)
    saved = snapshot([h, rng])
    with pytest.raises(KeyError, match="inner"):
        outer(rows(4, 3, 2))
    assert_unchanged(saved)


def test_failure_after_success_keeps_last_good_values():
    h = statemap.HiddenState(jnp.zeros((N, 2)), name="h")
    rng = statemap.RandomState(0)

    def f(x):
        if x.shape == (3,):
            h.value = h.value * 2
            rng.normal(())
            raise ValueError("wrong width")
        h.value = h.value + x + rng.normal(())
        return h.value

    mapping = statemap.pmap(f, state_in_axes=statemap.HiddenState)
    good = mapping(rows(N, 2))
    assert_tree_allclose(h.value, good)
    saved = snapshot([h, rng])
    with pytest.raises(ValueError, match="wrong width"):
        mapping(rows(N, 3))
    assert_unchanged(saved)
    mapping(rows(N, 2))  # still usable
    assert_concrete([h, rng])


def test_no_tracers_left_after_success():
    h = statemap.HiddenState(rows(N, 2), name="h")
    w = statemap.ParamState(jnp.ones(2), name="w")
    r = statemap.ShortTermState(jnp.zeros(2), name="r")
    rng = statemap.RandomState(0)

    def f(x):
        h.value = h.value * w.value + rng.normal(())
        r.value = jax.lax.pmean(h.value, "d")  # written, the same on every device
        return x

    statemap.pmap(f, "d", state_in_axes=statemap.HiddenState)(rows(N, 2))
    assert_concrete([h, w, r, rng])
    assert r.value.shape == (2,)
    assert_tree_allclose(r.value, h.value.mean(0))


# Warm calls: cached plan, no recompile, values stay on the devices.


def make_step(noise=True):
    h = statemap.HiddenState(jnp.zeros((N, 3)), name="h")
    w = statemap.ParamState(jnp.ones(3), name="w")
    rng = statemap.RandomState(0)
    runs = []

    @statemap.pmap(axis_name="d", state_in_axes=statemap.HiddenState)
    def step(x):
        runs.append(1)
        h.value = h.value * 0.5 + x * w.value
        if noise:
            h.value = h.value + 0.01 * rng.normal((3,))
        w.value = w.value - 0.1 * jax.lax.pmean(x, "d")
        return h.value.sum()

    return step, (h, w, rng), runs


def test_warm_calls_run_python_once_and_see_current_values():
    step, (h, w, _), runs = make_step(noise=False)

    def lane(hl, wv, xl):
        hn = hl * 0.5 + xl * wv
        return hn, wv - 0.1 * jax.lax.pmean(xl, "d"), hn.sum()

    oracle = jax.pmap(lane, "d", in_axes=(0, None, 0), out_axes=(0, None, 0))
    hv, wv = h.value, w.value
    for i in range(4):
        x = rows(N, 3, start=i)
        if i == 2:  # changes made between calls are seen by the next warm call
            w.value = w.value + 1.0
            h.value = h.value.at[3].set(5.0)
            wv, hv = wv + 1.0, hv.at[3].set(5.0)
        out = jax.block_until_ready(step(x))
        hv, wv, expected = jax.block_until_ready(oracle(hv, wv, x))
        assert_tree_allclose(out, expected, rtol=1e-5)
        assert_tree_allclose((h.value, w.value), (hv, wv), rtol=1e-5)
    assert runs == [1]


def test_warm_calls_do_not_recompile():
    step, (h, w, rng), runs = make_step()
    x = jax.block_until_ready(rows(N, 3))
    with compiles() as cold:
        jax.block_until_ready(step(x))
    assert cold  # the listener does see statemap's compilations
    # The first call turns the states' values into device-resident arrays; the
    # second call sees them for the first time (hand-threaded jax.pmap does the same,
    # see the next test).
    jax.block_until_ready(step(x))
    keys = {key_bits(rng.value).tobytes()}
    with compiles() as warm:
        for _ in range(4):
            jax.block_until_ready(step(x))
            keys.add(key_bits(rng.value).tobytes())
    assert warm == []
    assert runs == [1]
    assert len(keys) == 5  # the key advanced on every warm call
    assert_tree_allclose(w.value, 1 - 0.1 * 6 * x.mean(0), rtol=1e-5)


def test_warm_calls_without_mapped_input_do_not_recompile():
    rng = statemap.RandomState(0)
    runs = []

    def draw():
        runs.append(1)
        return rng.normal((2,))

    mapping = statemap.pmap(draw, axis_size=4)
    outs = [jax.block_until_ready(mapping()) for _ in range(2)]
    with compiles() as warm:
        outs += [jax.block_until_ready(mapping()) for _ in range(3)]
    assert warm == []
    assert runs == [1]
    assert len({np.asarray(o).tobytes() for o in outs}) == 5  # fresh numbers on every call


def test_second_call_compiles_no_more_than_hand_threaded_pmap():
    step, (h, w, _), runs = make_step(noise=False)
    x = jax.block_until_ready(rows(N, 3))

    def lane(hv, wv, xv):
        hn = hv * 0.5 + xv * wv
        return hn, wv - 0.1 * jax.lax.pmean(xv, "d"), hn.sum()

    oracle = jax.pmap(lane, "d", in_axes=(0, None, 0), out_axes=(0, None, 0))
    hv, wv, _ = jax.block_until_ready(oracle(jnp.zeros((N, 3)), jnp.ones(3), x))
    with compiles() as oracle_second:
        hv, wv, expected = jax.block_until_ready(oracle(hv, wv, x))
    jax.block_until_ready(step(x))
    with compiles() as second:
        out = jax.block_until_ready(step(x))
    assert len(second) <= len(oracle_second)
    assert_tree_allclose(out, expected, rtol=1e-5)
    assert_tree_allclose((h.value, w.value), (hv, wv), rtol=1e-5)
    assert runs == [1]


def test_state_values_stay_on_the_devices():
    step, (h, w, rng), _ = make_step()
    x = rows(N, 3)
    for _ in range(2):
        jax.block_until_ready(step(x))
        assert isinstance(h.value, jax.Array)
        assert len(h.value.devices()) == N
        assert h.value.sharding.shard_shape(h.value.shape) == (1, 3)  # one row per device
        assert isinstance(w.value, jax.Array) and w.value.shape == (3,)
        assert isinstance(rng.value, jax.Array)
    assert_tree_allclose(w.value, 1 - 0.2 * x.mean(0), rtol=1e-5)
    devs = jax.devices()[4:]
    s = statemap.HiddenState(jnp.zeros((4, 2)), name="s")

    def bump():
        s.value = s.value + 1.0

    statemap.pmap(bump, devices=devs, state_in_axes=statemap.HiddenState)()
    assert set(s.value.devices()) == set(devs)
    assert_tree_allclose(s.value, jnp.ones((4, 2)))


def test_a_split_state_moves_between_pmaps_over_other_devices_and_orders():
    """Another pmap's lanes (same count, other devices or order) are not this one's: the state moves."""
    devices = jax.devices()
    h = statemap.HiddenState(jnp.zeros((4, 2)), name="h")

    def bump(x):
        h.value = h.value + x * jax.lax.axis_index("d")
        return h.value.sum()

    mappings = [
        statemap.pmap(bump, "d", devices=lanes, state_in_axes=statemap.HiddenState)
        for lanes in (devices[4:8], devices[0:4], devices[0:4][::-1])
    ]
    expected = np.zeros((4, 2))
    for _ in range(2):  # the second round is warm
        for m in mappings:
            out = m(jnp.ones((4, 2)))
            expected = expected + np.arange(4.0)[:, None]
            assert_tree_allclose(h.value, expected)
            assert_tree_allclose(out, expected.sum(axis=1))
            assert set(h.value.devices()) == set(m.devices)


def test_a_broadcast_state_moves_between_pmaps_and_meshes_over_other_devices():
    """Replicated over another pmap's lanes or another mesh, a shared state is not where jax.pmap reads it."""
    devices = jax.devices()
    total = statemap.State(jnp.zeros(3), name="total")

    def add(x):
        total.value = total.value + jax.lax.psum(x, "d")
        return x

    first = statemap.pmap(add, "d", devices=devices[0:4])
    second = statemap.pmap(add, "d", devices=devices[4:8])
    other_mesh = statemap.shard_map(add, "d", devices=devices[2:6])
    expected = 0.0
    for _ in range(2):  # the second round is warm
        for m in (first, second, other_mesh):
            m(jnp.ones((4, 3)))
            expected += 4.0
            assert_tree_allclose(total.value, jnp.full(3, expected))
    total.value = jax.device_put(total.value, devices[7])  # one device, outside the lanes
    first(jnp.ones((4, 3)))
    assert_tree_allclose(total.value, jnp.full(3, expected + 4.0))
