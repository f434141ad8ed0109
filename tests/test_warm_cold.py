"""A warm call runs exactly the program a cold call would build.

Every test calls a mapping twice, changing between the calls something that
changes what JAX would trace (a weak type, a static value's type, a JAX
setting, a state's identity or value kind), and checks the warm result
against an eager or pure-JAX oracle computed from the current inputs.
"""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import counted
from helpers import assert_concrete, assert_tree_allclose

import statemap


def assert_same_array(actual, expected):
    """Same dtype, same weak type and the same values."""
    actual, expected = jnp.asarray(actual), jnp.asarray(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert jax.typeof(actual).weak_type == jax.typeof(expected).weak_type
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


# Weak types.


def test_weak_state_then_strong_state_retraces():
    s = statemap.State(100)  # a Python int: weakly typed int32
    f = statemap.vmap(lambda x: x + s.value)
    x = jnp.full((2,), 100, jnp.int8)
    assert_same_array(f(x), jax.vmap(lambda x: x + 100)(x))
    s.value = jnp.int32(100)
    assert_same_array(f(x), jax.vmap(lambda x: x + jnp.int32(100))(x))
    assert f(x).dtype == jnp.int32


def test_strong_state_then_weak_state_retraces():
    s = statemap.State(jnp.float32(0.5))
    f = statemap.vmap(lambda x: x * s.value)
    x = jnp.arange(3, dtype=jnp.bfloat16)
    assert_same_array(f(x), x * jnp.float32(0.5))
    s.value = 0.5
    assert_same_array(f(x), x * 0.5)
    assert f(x).dtype == jnp.bfloat16


def test_weak_written_state_keeps_jax_promotion():
    count = statemap.State(0)
    x = jnp.ones((2,), jnp.int8)

    @statemap.vmap
    def step(x):
        count.value = count.value + 1
        return x + count.value

    assert_same_array(step(x), x + 1)
    assert jax.typeof(count.value).weak_type  # weak + weak stays weak, as in JAX
    assert_same_array(step(x), x + 2)
    count.value = jnp.int32(2)
    assert_same_array(step(x), x + jnp.int32(3))
    assert_same_array(count.value, jnp.int32(3))


def test_weak_argument_then_strong_argument():
    s = statemap.State(jnp.ones(2, jnp.int8))
    f = statemap.vmap(lambda x: s.value + x, in_axes=None, axis_size=2)
    assert_same_array(f(3), jax.vmap(lambda x: jnp.ones(2, jnp.int8) + x, in_axes=None, axis_size=2)(3))
    assert_same_array(
        f(jnp.int32(3)), jax.vmap(lambda x: jnp.ones(2, jnp.int8) + x, in_axes=None, axis_size=2)(jnp.int32(3))
    )


# Static arguments: keyed by value and type.


@pytest.mark.parametrize("order", [(2, 2.0, True), (True, 2.0, 2), (2.0, 2, True)])
def test_pmap_static_values_of_equal_value_and_different_type(order):
    n = 2
    x = jnp.arange(n, dtype=jnp.int32)
    mapping = statemap.pmap(lambda x, k: x * k, static_broadcasted_argnums=1, devices=jax.devices()[:n])
    oracle = jax.pmap(lambda x, k: x * k, static_broadcasted_argnums=1, devices=jax.devices()[:n])
    for k in order + order:
        assert_same_array(mapping(x, k), oracle(x, k))


def test_pmap_static_flag_compared_by_identity_runs_the_right_branch():
    n = 2
    scale = statemap.State(jnp.float32(3.0))

    def step(x, flag):
        return x * scale.value if flag is True else x + scale.value

    mapping = statemap.pmap(step, static_broadcasted_argnums=1, devices=jax.devices()[:n])
    x = jnp.arange(n, dtype=jnp.float32)
    for flag in (True, 1, True, 1):
        expected = x * 3.0 if flag is True else x + 3.0
        assert_same_array(mapping(x, flag), expected)


# Trace-time JAX settings.


def test_enable_x64_is_part_of_the_plan():
    half = statemap.State(jnp.int32(2))
    f = statemap.vmap(lambda x: x * half.value + 0.5)
    x = jnp.arange(3, dtype=jnp.int32)
    oracle = jax.vmap(lambda x, h: x * h + 0.5, in_axes=(0, None))
    assert_same_array(f(x), oracle(x, half.value))
    with jax.enable_x64(True):
        out = f(x)
        assert out.dtype == jnp.float64
        assert_same_array(out, oracle(x, half.value))
    assert_same_array(f(x), oracle(x, half.value))


def test_numpy_rank_promotion_is_part_of_the_plan():
    bias = statemap.State(jnp.ones((1, 3)))
    f = statemap.vmap(lambda x: x + bias.value)
    x = jnp.ones((2, 3))
    assert_same_array(f(x), jax.vmap(lambda x: x + jnp.ones((1, 3)))(x))
    with jax.numpy_rank_promotion("raise"):
        with pytest.raises(ValueError, match="jax_numpy_rank_promotion"):
            jax.vmap(lambda x: x + jnp.ones((1, 3)))(x)
        with pytest.raises(ValueError, match="jax_numpy_rank_promotion"):
            f(x)
    assert_same_array(f(x), jax.vmap(lambda x: x + jnp.ones((1, 3)))(x))


def test_numpy_dtype_promotion_is_part_of_the_plan():
    offset = statemap.State(jnp.int32(1))
    f = statemap.vmap(lambda x: x + offset.value)
    x = jnp.ones(2, jnp.int8)
    assert_same_array(f(x), x + jnp.int32(1))
    with jax.numpy_dtype_promotion("strict"):
        with pytest.raises(jax.dtypes.TypePromotionError, match="strict"):
            jax.vmap(lambda x: x + jnp.int32(1))(x)
        with pytest.raises(jax.dtypes.TypePromotionError, match="strict"):
            f(x)
    assert_same_array(f(x), x + jnp.int32(1))


def test_default_matmul_precision_is_part_of_the_plan():
    w = statemap.State(jnp.eye(2))
    fn = counted(lambda x: x @ w.value)
    f = statemap.vmap(fn)
    x = jnp.ones((3, 2))
    f(x)
    f(x)
    assert fn.runs == 1
    with jax.default_matmul_precision("highest"):
        assert_same_array(f(x), x)
        assert fn.runs == 2  # traced anew, as jax.jit would
    f(x)
    assert fn.runs == 2


def test_default_prng_impl_is_part_of_the_plan():
    f = statemap.vmap(lambda x: x + jax.random.key_data(jax.random.key(1)).size, axis_size=2, in_axes=None)
    oracle = jax.vmap(lambda x: x + jax.random.key_data(jax.random.key(1)).size, axis_size=2, in_axes=None)
    x = jnp.uint32(1)
    assert_same_array(f(x), oracle(x))
    before = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        assert_same_array(f(x), oracle(x))
    finally:
        jax.config.update("jax_default_prng_impl", before)
    assert_same_array(f(x), oracle(x))


# States returned by the function.


def test_inner_warm_call_inside_an_outer_lane_announces_created_states():
    inner = statemap.vmap(lambda y: statemap.State(y * 2.0, name="made"))
    outer = statemap.vmap(lambda x: inner(x))
    for shape in [(2, 3), (4, 3), (4, 3), (2, 3)]:  # (4, 3): the inner plan is warm inside a new outer trace
        x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
        made = outer(x)
        assert isinstance(made, statemap.State) and made.name == "made"
        assert_concrete([made])
        assert_tree_allclose(made.value, jax.vmap(jax.vmap(lambda y: y * 2.0))(x))


def test_inner_warm_call_in_a_container_inside_an_outer_lane():
    seed = statemap.State(jnp.float32(1.0))
    inner = statemap.vmap(lambda y: {"w": statemap.ParamState(y + seed.value, name="w"), "y": y})
    outer = statemap.vmap(lambda x: inner(x), in_axes=1)
    x = jnp.ones((3, 2))
    first = outer(x)
    second = outer(jnp.ones((3, 4)))  # a new outer signature, the same inner lane signature
    for out, x in [(first, jnp.ones((3, 2))), (second, jnp.ones((3, 4)))]:
        assert isinstance(out["w"], statemap.ParamState)
        assert_tree_allclose(out["w"].value, jnp.moveaxis(x, 1, 0) + 1.0)
        assert_tree_allclose(out["y"], jnp.moveaxis(x, 1, 0))
    assert first["w"] is not second["w"]


def test_returned_untouched_state_replaced_and_collected_is_retraced():
    holder = {"s": statemap.State(jnp.ones(2), name="first")}
    f = statemap.vmap(lambda x: (x * 2.0, holder["s"]))
    x = jnp.arange(3.0)
    out, returned = f(x)
    assert returned is holder["s"]
    holder["s"] = statemap.State(jnp.zeros(2), name="second")
    del returned
    gc.collect()
    out, returned = f(x)
    assert returned is holder["s"] and returned.name == "second"
    assert_tree_allclose(out, x * 2.0)


# None is an empty pytree.


def test_lazy_init_of_a_none_state_under_vmap():
    cache = statemap.State(None, name="cache")

    @statemap.vmap
    def step(x):
        if cache.value is None:
            cache.value = jnp.zeros(3)
        cache.value = cache.value + 1.0
        return x + cache.value.sum()

    def oracle(x, cache):
        cache = jnp.zeros(3) if cache is None else cache
        cache = cache + 1.0
        return jax.vmap(lambda x: x + cache.sum())(x), cache

    x = jnp.arange(2.0)
    for reset in (False, False, True, False):
        if reset:
            cache.value = None
        expected, expected_cache = oracle(x, cache.value)
        assert_tree_allclose(step(x), expected)
        assert_tree_allclose(cache.value, expected_cache)


def test_writing_none_to_a_state_under_vmap():
    s = statemap.State(jnp.ones(2), name="s")
    empty = statemap.State(None, name="empty")

    def clear(x):
        s.value = None
        empty.value = None
        return x * 2.0

    f = statemap.vmap(clear)
    for _ in range(2):
        assert_tree_allclose(f(jnp.arange(3.0)), jnp.arange(3.0) * 2.0)
        assert s.value is None and empty.value is None
        s.value = jnp.ones(2)


def test_none_leaves_inside_a_state_under_vmap():
    s = statemap.State({"a": None, "b": jnp.ones(2)}, name="s")

    def step(x):
        s.value = {"a": None, "b": s.value["b"] * 2.0 + jax.lax.psum(x, "i")}
        return x + s.value["b"]

    f = statemap.vmap(step, axis_name="i")
    x = jnp.arange(3.0)
    for _ in range(2):
        b = s.value["b"] * 2.0 + x.sum()
        assert_tree_allclose(f(x), x[:, None] + b)
        assert s.value["a"] is None
        assert_tree_allclose(s.value["b"], b)


# NumPy outputs.


@pytest.mark.parametrize(
    "extra",
    [np.zeros(2), np.float32(1.5), np.arange(3, dtype=np.int16), np.bool_(True), 2.5, (np.ones((2, 2)), 3)],
    ids=["ndarray", "float32-scalar", "int16", "bool", "python-float", "tuple"],
)
def test_numpy_outputs_are_broadcast_as_jax_vmap_does(extra):
    s = statemap.State(jnp.float32(2.0))
    f = statemap.vmap(lambda x: (x * s.value, extra))
    oracle = jax.vmap(lambda x: (x * 2.0, extra))
    x = jnp.arange(3.0)
    for _ in range(2):
        out, expected = f(x), oracle(x)
        assert jax.tree.structure(out) == jax.tree.structure(expected)
        for a, e in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
            assert_same_array(a, e)


def test_numpy_outputs_with_out_axes_none():
    f = statemap.vmap(lambda x: (x, np.arange(2.0)), out_axes=(0, None))
    out = f(jnp.arange(3.0))
    expected = jax.vmap(lambda x: (x, np.arange(2.0)), out_axes=(0, None))(jnp.arange(3.0))
    for a, e in zip(out, expected):
        assert_same_array(a, e)


# pmap moves misplaced inputs, deciding on every call.


def test_pmap_moves_a_committed_split_state_each_call_it_needs_it():
    n = 4
    devs = jax.devices()[:n]
    h = statemap.HiddenState(jax.device_put(jnp.arange(n * 2.0).reshape(n, 2), devs[0]), name="h")

    def step(x):
        h.value = h.value + x
        return h.value * 2.0

    m = statemap.pmap(step, devices=devs, state_in_axes=statemap.HiddenState)
    x = jnp.ones((n, 2))
    expected_h = np.arange(n * 2.0).reshape(n, 2)
    for commit_to in (devs[0], None, devs[2]):
        if commit_to is not None:
            h.value = jax.device_put(h.value, commit_to)  # committed to one device: pmap rejects it as is
        expected_h = expected_h + 1.0
        assert_tree_allclose(m(x), expected_h * 2.0)
        assert_tree_allclose(h.value, expected_h)
        assert len(h.value.devices()) == n  # the written state stays sharded on the devices


def test_pmap_moves_a_broadcast_state_sharded_by_another_pmap():
    n = 4
    devs = jax.devices()[:n]
    w = statemap.ParamState(jnp.arange(n * 2.0).reshape(n, 2), name="w")
    shard = statemap.pmap(lambda: setattr(w, "value", w.value * 1.0), devices=devs, state_in_axes={0: w})
    read = statemap.pmap(lambda x: x + w.value.sum(), devices=devs)
    x = jnp.arange(float(n))
    for _ in range(2):
        shard()  # w is now split over the devices, one row each
        assert len(w.value.sharding.device_set) == n and not w.value.sharding.is_fully_replicated
        assert_tree_allclose(read(x), x + np.arange(n * 2.0).sum())


def test_pmap_called_inside_vmap_after_moving_an_input():
    n = 2
    devs = jax.devices()[:n]
    scale = statemap.State(jnp.float32(3.0), name="scale")
    inner = statemap.pmap(lambda x: x * scale.value, devices=devs)
    x = jax.device_put(jnp.ones((n, 3)), devs[0])  # committed to one device: this call moves it
    assert_tree_allclose(inner(x), x * 3.0)
    outer = statemap.vmap(inner, in_axes=1, out_axes=1)
    xs = jnp.arange(n * 5 * 3.0).reshape(n, 5, 3)
    assert_tree_allclose(outer(xs), xs * 3.0)
    assert_tree_allclose(inner(jnp.ones((n, 3))), np.full((n, 3), 3.0))


# vmap's static arguments and positional in_axes/out_axes.


def test_vmap_takes_in_axes_and_out_axes_positionally():
    w = statemap.State(jnp.float32(2.0))
    f = statemap.vmap(lambda x, y: x * y * w.value, (1, None), 1)
    x, y = jnp.arange(6.0).reshape(2, 3), jnp.float32(3.0)
    assert_same_array(f(x, y), jax.vmap(lambda x, y: x * y * 2.0, (1, None), 1)(x, y))
    g = statemap.VMapMapping(lambda x: x * w.value, 1, 0)
    assert_same_array(g(x), jax.vmap(lambda x: x * 2.0, 1, 0)(x))


def test_vmap_static_argnums_values_and_types_are_plans():
    s = statemap.State(jnp.arange(3, dtype=jnp.int32))
    seen = []

    def power(x, k):
        seen.append(type(k))
        return x**k + s.value

    f = statemap.vmap(power, static_argnums=1)
    x = jnp.arange(1, 4, dtype=jnp.int32)
    for k in (2, 2.0, True, 3, 2, 2.0, True):
        expected = jax.vmap(lambda x: x**k + jnp.arange(3, dtype=jnp.int32))(x)
        assert_same_array(f(x, k), expected)
    assert seen == [int, float, bool, int]  # a new plan per (value, type), warm calls reuse them


def test_vmap_static_argnames_by_keyword_and_by_position():
    scale = statemap.ParamState(jnp.float32(2.0), name="scale")
    runs = []

    def layer(x, training=False):
        runs.append(training)
        return x * scale.value if training else x - scale.value

    f = statemap.vmap(layer, static_argnames="training")
    x = jnp.arange(3.0)
    assert_same_array(f(x, training=True), x * 2.0)
    assert_same_array(f(x, True), x * 2.0)  # the same parameter, passed by position: still static
    assert_same_array(f(x, training=False), x - 2.0)
    assert_same_array(f(x), x - 2.0)  # its default
    assert runs == [True, True, False, False]  # as jax.jit: by keyword, by position, default are apart
    for training in (True, False):
        assert_same_array(f(x, training=training), x * 2.0 if training else x - 2.0)
    assert len(runs) == 4


def test_vmap_static_argnums_also_static_by_keyword():
    f = statemap.vmap(lambda x, k: x * k, static_argnums=1)
    x = jnp.arange(3, dtype=jnp.int32)
    assert_same_array(f(x, k=2.0), x * 2.0)
    assert_same_array(f(x, k=2), x * 2)
    g = statemap.vmap(lambda x, k=3: x * k, static_argnums=1)
    assert_same_array(g(x), x * 3)  # left to its default: not an argument out of range


def test_vmap_static_keyword_values_of_equal_value_and_different_type():
    f = statemap.vmap(lambda x, *, k: x * k, static_argnames="k")
    x = jnp.arange(3, dtype=jnp.int32)
    for k in (2, 2.0, True, 2):
        assert_same_array(f(x, k=k), jax.vmap(lambda x: x * k)(x))


def test_vmap_static_arguments_that_fn_does_not_take():
    with pytest.raises(ValueError, match=r"statemap\.vmap: `static_argnums` names argument 2, but `fn` takes 2 positional arguments \(x, k\)"):
        statemap.vmap(lambda x, k: x, static_argnums=2)
    with pytest.raises(ValueError, match=r"statemap\.vmap: `static_argnames` names 'kk', which `fn` does not take as a keyword \(it takes x, k\)"):
        statemap.vmap(lambda x, k: x, static_argnames="kk")
    with pytest.raises(ValueError, match=r"`static_argnames` names 'x'"):
        statemap.vmap(static_argnames="x")(lambda x, /: x)
    statemap.vmap(lambda *a, **kw: a[0], static_argnums=5, static_argnames="anything")  # takes them all


def test_vmap_static_argument_out_of_range_at_call():
    f = statemap.vmap(lambda *xs: xs[0], static_argnums=2)
    with pytest.raises(ValueError, match=r"statemap\.vmap: `static_argnums` names argument 2, but the function was called with 1 positional"):
        f(jnp.ones(3))


def test_vmap_unhashable_static_arguments_name_the_argument():
    f = statemap.vmap(lambda x, shape, *, pad=(): x, static_argnums=1, static_argnames="pad")
    with pytest.raises(TypeError, match=r"statemap\.vmap: static argument args\[1\] is a list, which is not hashable"):
        f(jnp.ones(3), [1])
    with pytest.raises(TypeError, match=r"statemap\.vmap: static argument kwargs\['pad'\] is a dict, which is not hashable"):
        f(jnp.ones(3), (1,), pad={})


def test_vmap_static_argument_types_are_checked_at_construction():
    with pytest.raises(TypeError, match=r"statemap\.vmap: `static_argnames` must be a str or a tuple of str"):
        statemap.vmap(lambda x: x, static_argnames=1)
    with pytest.raises(TypeError, match=r"statemap\.vmap: `static_argnums` must be an int or a tuple of ints"):
        statemap.vmap(lambda x: x, static_argnums="k")


# Which State objects a plan holds.


def test_explain_shows_the_state_objects_a_plan_holds():
    params = {"w": statemap.ParamState(jnp.ones(2), name="w")}
    keep = statemap.State(jnp.zeros(()), name="keep")
    apply = statemap.vmap(lambda x: (x * params["w"].value, keep))
    x = jnp.ones((3, 2))
    apply(x)
    old = params["w"]
    params["w"] = statemap.ParamState(jnp.full(2, 5.0), name="w")  # replaced; the old object is still alive
    explanation = apply.explain(x)
    assert explanation.states == (old, keep)
    text = str(explanation)
    assert text.splitlines()[1].split() == ["state", "enters", "leaves", "object"]
    assert hex(id(old)) in text and hex(id(params["w"])) not in text
    assert hex(id(keep)) in text and "not read" in text
    # The documented remedy: restore values in place, and the plan sees them.
    params["w"] = old
    old.value = jnp.full(2, 5.0)
    out, returned = apply(x)
    assert_tree_allclose(out, x * 5.0)
    assert returned is keep


def test_state_passed_as_an_argument_may_be_replaced():
    step = statemap.vmap(lambda x, w: x * w.value, in_axes=(0, None))
    x = jnp.ones((3, 2))
    first = statemap.ParamState(jnp.ones(2), name="w")
    assert_tree_allclose(step(x, first), x)
    second = statemap.ParamState(jnp.full(2, 4.0), name="w")
    assert_tree_allclose(step(x, second), x * 4.0)
    assert step.explain(x, second).states == (second,)


# States are identities, whatever their __eq__.


class ByName(statemap.State):
    """A State subclass that compares by name (and so is unhashable)."""

    __slots__ = ()

    def __eq__(self, other):
        return isinstance(other, ByName) and other.name == self.name


class HashedByName(ByName):
    __slots__ = ()

    def __hash__(self):
        return hash(self.name)


@pytest.mark.parametrize("cls", [ByName, HashedByName])
def test_state_trace_keeps_states_equal_by_name_apart(cls):
    a, b = cls(jnp.zeros(2), name="w"), cls(jnp.ones(2), name="w")
    assert a == b
    with statemap.StateTrace() as trace:
        a.value = a.value + 1.0
        _ = b.value
    assert trace.states[0] is a and trace.states[1] is b and len(trace.states) == 2
    assert len(trace.written) == 1 and trace.written[0] is a
    trace.restore()
    assert_tree_allclose(a.value, jnp.zeros(2))
    assert_tree_allclose(b.value, jnp.ones(2))


@pytest.mark.parametrize("cls", [ByName, HashedByName])
def test_states_equal_by_name_passed_as_arguments_stay_apart(cls):
    a, b = cls(jnp.zeros(2), name="w"), cls(jnp.ones(2), name="w")

    def step(x, a, b):
        a.value = a.value + 1.0
        return x + b.value

    f = statemap.vmap(step, in_axes=(0, None, None))
    x = jnp.arange(3.0)[:, None]
    for i in range(2):
        assert_tree_allclose(f(x, a, b), x + jnp.ones(2))
        assert_tree_allclose(a.value, jnp.full(2, i + 1.0))
        assert_tree_allclose(b.value, jnp.ones(2))


def test_mappings_that_split_states_equal_by_name_have_plans_of_their_own():
    """Two mappings of one function share a plan cache only if their filters select the same objects."""
    a, b = HashedByName(jnp.arange(6.0).reshape(3, 2), name="h"), HashedByName(jnp.full((3, 2), 10.0), name="h")

    def read(x):
        return a.value.sum() + 100 * b.value.sum() + x

    x = jnp.zeros(3)
    split_a = statemap.vmap(read, state_in_axes={0: a})
    split_b = statemap.vmap(read, state_in_axes={0: b})
    for _ in range(2):
        assert_tree_allclose(split_a(x), jax.vmap(lambda ai: ai.sum() + 100 * b.value.sum())(a.value))
        assert_tree_allclose(split_b(x), jax.vmap(lambda bi: a.value.sum() + 100 * bi.sum())(b.value))


@pytest.mark.parametrize("filter", [list, statemap.filters.Any], ids=["list", "Any"])
def test_a_filter_of_states_equal_by_name_keeps_each(filter):
    a, b = HashedByName(jnp.zeros((3, 2)), name="h"), HashedByName(jnp.ones((3, 2)), name="h")

    def add(x):
        a.value = a.value + x
        b.value = b.value + 2 * x
        return x

    chosen = filter([a, b]) if filter is list else filter(a, b)
    x = jnp.arange(6.0).reshape(3, 2)
    statemap.vmap(add, state_in_axes={0: chosen})(x)
    assert_tree_allclose(a.value, x)
    assert_tree_allclose(b.value, 1 + 2 * x)


@pytest.mark.parametrize("kind", ["vmap", "jit"])
def test_clear_cache_after_replacing_a_state_object(kind):
    """A replaced object, the old one still alive: warm calls read the old one until the plans go."""
    params = {"w": statemap.ParamState(jnp.ones(2), name="w")}
    runs = []

    def apply(x):
        runs.append(1)
        return x * params["w"].value

    make = statemap.vmap if kind == "vmap" else statemap.jit
    x = jnp.ones((3, 2))
    for _ in range(3):
        make(apply)(x)  # built inline: one plan cache for all
    old, params["w"] = params["w"], statemap.ParamState(jnp.full(2, 5.0), name="w")
    assert_tree_allclose(make(apply)(x), x * old.value)  # documented: the plan holds the old object
    make(apply).clear_cache()
    for _ in range(3):
        assert_tree_allclose(make(apply)(x), x * 5.0)
    assert len(runs) == 2
