import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_keys_equal as assert_same_key
from helpers import assert_tree_allclose

import statemap


def typed(key):
    return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def key_bits(key):
    return np.asarray(jax.random.key_data(key) if typed(key) else key)


# The three ways to make a RandomState, and the key each starts from.
KINDS = {
    "int": (lambda: 3, lambda: jax.random.PRNGKey(3)),
    "legacy": (lambda: jax.random.PRNGKey(3), lambda: jax.random.PRNGKey(3)),
    "typed": (lambda: jax.random.key(3), lambda: jax.random.key(3)),
}


@pytest.fixture(params=sorted(KINDS))
def kind(request):
    return KINDS[request.param]


@pytest.fixture
def default_state():
    """Leave statemap.random.DEFAULT as it was."""
    saved = statemap.random.DEFAULT.value
    yield statemap.random.DEFAULT
    statemap.random.DEFAULT.value = saved


# Construction


def test_is_a_state():
    assert issubclass(statemap.RandomState, statemap.State)


def test_initial_key(kind):
    make, key = kind
    rng = statemap.RandomState(make(), name="rng", tag="noise")
    assert_same_key(rng.value, key())
    assert rng.name == "rng" and rng.tag == "noise"


def test_int_seed_gives_a_legacy_key():
    rng = statemap.RandomState(np.int32(5))
    assert rng.value.dtype == jnp.uint32 and rng.value.shape == (2,)
    assert_same_key(rng.value, jax.random.PRNGKey(5))


def test_no_seed_gives_a_fresh_legacy_key():
    a, b = statemap.RandomState(), statemap.RandomState()
    assert a.value.shape == (2,) and a.value.dtype == np.uint32
    assert not np.array_equal(np.asarray(a.value), np.asarray(b.value))
    a.normal((2,))  # the key works


def test_repr():
    assert repr(statemap.RandomState(0, name="rng")) == "RandomState(name='rng', value=uint32[2])"


@pytest.mark.parametrize(
    "bad",
    ["x", 1.5, True, jnp.zeros(3, jnp.uint32), jnp.zeros(2, jnp.int32), jnp.zeros((2, 2), jnp.uint32)],
)
def test_bad_seed_or_key_is_a_type_error(bad):
    with pytest.raises(TypeError, match=r"statemap\.RandomState: `seed_or_key` must be an int seed, None, a typed key"):
        statemap.RandomState(bad)


def test_a_batch_of_typed_keys_is_not_a_key():
    with pytest.raises(TypeError, match=r"`seed_or_key` must be"):
        statemap.RandomState(jax.random.split(jax.random.key(0), 3))


# Keys


def test_next_key_splits_and_advances(kind):
    make, key = kind
    rng = statemap.RandomState(make())
    expected_state, expected_key = jax.random.split(key())
    got = rng.next_key()
    assert_same_key(got, expected_key)
    assert_same_key(rng.value, expected_state)
    expected_state, expected_key = jax.random.split(expected_state)
    assert_same_key(rng.next_key(), expected_key)
    assert_same_key(rng.value, expected_state)


def test_split_key_returns_n_keys_and_advances_once(kind):
    make, key = kind
    rng = statemap.RandomState(make())
    keys = jax.random.split(key(), 4)
    got = rng.split_key(3)
    assert got.shape[0] == 3
    assert_same_key(got, keys[1:])
    assert_same_key(rng.value, keys[0])


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3"])
def test_split_key_needs_a_positive_int(bad):
    rng = statemap.RandomState(0)
    before = rng.value
    with pytest.raises(ValueError, match=r"statemap\.RandomState\.split_key: `n` must be a positive int, got"):
        rng.split_key(bad)
    assert rng.value is before


def test_seed_resets(kind):
    make, key = kind
    rng = statemap.RandomState(make())
    first = rng.normal((3,))
    rng.seed(3)
    assert_same_key(rng.value, key())
    np.testing.assert_array_equal(rng.normal((3,)), first)


def test_seed_with_a_key_takes_that_key():
    rng = statemap.RandomState(0)
    rng.seed(jax.random.key(7))
    assert_same_key(rng.value, jax.random.key(7))
    rng.seed(jax.random.PRNGKey(8))
    assert_same_key(rng.value, jax.random.PRNGKey(8))


def test_seed_without_argument_gives_a_fresh_key():
    rng = statemap.RandomState(0)
    rng.seed()
    assert not np.array_equal(key_bits(rng.value), key_bits(jax.random.PRNGKey(0)))


def test_seed_without_argument_keeps_a_typed_key_typed():
    rng = statemap.RandomState(jax.random.key(0))
    rng.seed()
    assert typed(rng.value)


def test_bad_seed_is_a_type_error():
    rng = statemap.RandomState(0)
    before = rng.value
    with pytest.raises(TypeError, match=r"statemap\.RandomState\.seed: `seed_or_key` must be"):
        rng.seed("zero")
    assert rng.value is before


# Draws equal jax.random's with the key next_key would give.


def expected_draw(key, draw):
    _, sub = jax.random.split(key)
    return draw(sub)


DRAWS = {
    "normal": (
        lambda rng: rng.normal((2, 3)),
        lambda k: jax.random.normal(k, (2, 3)),
    ),
    "normal_scalar": (lambda rng: rng.normal(), lambda k: jax.random.normal(k, ())),
    "normal_int_shape_dtype": (
        lambda rng: rng.normal(4, jnp.float16),
        lambda k: jax.random.normal(k, (4,), jnp.float16),
    ),
    "uniform": (
        lambda rng: rng.uniform((5,), minval=-2.0, maxval=3.0),
        lambda k: jax.random.uniform(k, (5,), minval=-2.0, maxval=3.0),
    ),
    "uniform_default": (lambda rng: rng.uniform(), lambda k: jax.random.uniform(k, ())),
    "randint": (
        lambda rng: rng.randint((6,), 2, 9),
        lambda k: jax.random.randint(k, (6,), 2, 9),
    ),
    "bernoulli": (
        lambda rng: rng.bernoulli((7,), 0.3),
        lambda k: jax.random.bernoulli(k, 0.3, (7,)),
    ),
    "bernoulli_default": (lambda rng: rng.bernoulli(), lambda k: jax.random.bernoulli(k, 0.5, ())),
}


@pytest.mark.parametrize("name", sorted(DRAWS))
def test_draws_equal_jax_random(kind, name):
    make, key = kind
    draw, oracle = DRAWS[name]
    rng = statemap.RandomState(make())
    got = draw(rng)
    want = expected_draw(key(), oracle)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert_same_key(rng.value, jax.random.split(key())[0])


def test_consecutive_draws_differ_and_follow_the_key_chain():
    rng = statemap.RandomState(0)
    a, b = rng.normal((3,)), rng.normal((3,))
    assert not np.array_equal(a, b)
    k1, _ = jax.random.split(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(b, expected_draw(k1, lambda k: jax.random.normal(k, (3,))))


def test_same_seed_same_numbers(kind):
    make, _ = kind
    a, b = statemap.RandomState(make()), statemap.RandomState(make())
    for _ in range(3):
        np.testing.assert_array_equal(a.uniform((4,)), b.uniform((4,)))
    assert_tree_allclose(a.value, b.value)
    assert not np.array_equal(statemap.RandomState(1).normal((4,)), statemap.RandomState(2).normal((4,)))


def test_draw_ranges():
    rng = statemap.RandomState(0)
    x = rng.randint((200,), 0, 3)
    assert set(np.unique(np.asarray(x))) == {0, 1, 2}
    assert bool(rng.bernoulli((5,), 1.0).all()) and not bool(rng.bernoulli((5,), 0.0).any())


@pytest.mark.parametrize(
    "call, method",
    [
        (lambda r: r.normal((2, -1)), "normal"),
        (lambda r: r.normal("3"), "normal"),
        (lambda r: r.uniform((2.0,)), "uniform"),
        (lambda r: r.randint((True,), 0, 3), "randint"),
        (lambda r: r.bernoulli([[2]]), "bernoulli"),
    ],
)
def test_bad_shape_is_a_type_error(call, method):
    rng = statemap.RandomState(0)
    with pytest.raises(TypeError, match=rf"statemap\.RandomState\.{method}: `shape` must be an int or a tuple"):
        call(rng)


def test_draws_inside_jit_advance_the_state_like_outside():
    outside = statemap.RandomState(0)
    inside = statemap.RandomState(0)
    want = outside.normal((2,))

    @jax.jit
    def draw(key):
        inside.value = key
        x = inside.normal((2,))
        return x, inside.value

    x, new_key = draw(inside.value)
    inside.value = new_key
    np.testing.assert_array_equal(x, want)
    assert_same_key(inside.value, outside.value)


# statemap.random


def test_module_all_is_pinned():
    assert statemap.random.__all__ == [
        "DEFAULT",
        "bernoulli",
        "next_key",
        "normal",
        "randint",
        "seed",
        "split_key",
        "uniform",
    ]


def test_default_is_a_named_random_state():
    assert isinstance(statemap.random.DEFAULT, statemap.RandomState)
    assert statemap.random.DEFAULT.name == "statemap.random.DEFAULT"


def test_module_seed_and_next_key(default_state):
    statemap.random.seed(4)
    assert_same_key(default_state.value, jax.random.PRNGKey(4))
    new, sub = jax.random.split(jax.random.PRNGKey(4))
    assert_same_key(statemap.random.next_key(), sub)
    assert_same_key(default_state.value, new)


def test_module_seed_with_a_typed_key(default_state):
    statemap.random.seed(jax.random.key(4))
    assert_same_key(default_state.value, jax.random.key(4))
    np.testing.assert_array_equal(
        statemap.random.normal((2,)), statemap.RandomState(jax.random.key(4)).normal((2,))
    )


def test_module_split_key(default_state):
    statemap.random.seed(4)
    keys = jax.random.split(jax.random.PRNGKey(4), 3)
    assert_same_key(statemap.random.split_key(2), keys[1:])
    assert_same_key(default_state.value, keys[0])


@pytest.mark.parametrize(
    "module_draw, method_draw",
    [
        (lambda: statemap.random.normal((2,)), lambda r: r.normal((2,))),
        (lambda: statemap.random.normal(3, jnp.float16), lambda r: r.normal(3, jnp.float16)),
        (lambda: statemap.random.uniform((3,), minval=1.0, maxval=2.0), lambda r: r.uniform((3,), minval=1.0, maxval=2.0)),
        (lambda: statemap.random.randint((4,), 0, 10), lambda r: r.randint((4,), 0, 10)),
        (lambda: statemap.random.bernoulli((5,), 0.25), lambda r: r.bernoulli((5,), 0.25)),
    ],
)
def test_module_draws_equal_a_seeded_state(default_state, module_draw, method_draw):
    statemap.random.seed(11)
    reference = statemap.RandomState(11)
    for _ in range(2):
        got, want = module_draw(), method_draw(reference)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert_same_key(default_state.value, reference.value)


def test_module_seed_is_repeatable(default_state):
    statemap.random.seed(0)
    a = statemap.random.uniform((3,))
    statemap.random.seed(0)
    np.testing.assert_array_equal(statemap.random.uniform((3,)), a)


def test_module_errors(default_state):
    with pytest.raises(TypeError, match=r"statemap\.RandomState\.seed: `seed_or_key` must be"):
        statemap.random.seed("zero")
    with pytest.raises(ValueError, match=r"`n` must be a positive int, got 0"):
        statemap.random.split_key(0)


NESTINGS = {
    "vmap(pmap)": lambda f, a, b: statemap.vmap(statemap.pmap(f, axis_name=b), axis_name=a),
    "vmap(shard_map)": lambda f, a, b: statemap.vmap(
        statemap.shard_map(f, b, devices=jax.devices()[:4]), axis_name=a
    ),
    "map(pmap)": lambda f, a, b: lambda x: statemap.map(statemap.pmap(f, axis_name=b), x),
    "jit(vmap(pmap))": lambda f, a, b: statemap.jit(statemap.vmap(statemap.pmap(f, axis_name=b), axis_name=a)),
}


@pytest.mark.parametrize("nesting", list(NESTINGS))
def test_unnamed_nested_mappings_of_different_kinds_give_every_lane_its_own_key(nesting):
    """Unnamed, each kind binds its own private axis: the same keys as with names of one's own."""
    rng = statemap.RandomState(0, name="rng")
    draw = lambda x: x + rng.normal(())  # noqa: E731
    x = jnp.zeros((2, 4))
    rng.seed(0)
    unnamed = np.asarray(NESTINGS[nesting](draw, None, None)(x))
    rng.seed(0)
    named = np.asarray(NESTINGS[nesting](draw, "outer", "inner")(x))
    assert len(set(unnamed.ravel().tolist())) == unnamed.size
    np.testing.assert_array_equal(unnamed, named)


@pytest.fixture
def rbg_default():
    before = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        yield
    finally:
        jax.config.update("jax_default_prng_impl", before)


def test_legacy_keys_of_another_default_implementation_work_everywhere(rbg_default):
    """Under ``rbg`` a legacy key is ``uint32[4]``: seeded, given, or fresh."""
    for rng in (statemap.RandomState(0), statemap.RandomState(jax.random.PRNGKey(0)), statemap.RandomState()):
        assert rng.value.shape == (4,) and rng.value.dtype == jnp.uint32
        key = rng.value
        draws = statemap.vmap(lambda x: x + rng.normal(()))(jnp.zeros(3))
        base = jax.random.split(key)[1]
        # Under jax.vmap, as statemap.vmap draws (rbg's bits differ from one key at a time).
        expected = jax.vmap(lambda i: jax.random.normal(jax.random.split(jax.random.fold_in(base, i))[1], ()))(
            jnp.arange(3)
        )
        np.testing.assert_allclose(draws, expected, rtol=1e-6)
        assert_same_key(rng.value, jax.random.split(key)[0])


def test_seed_keeps_a_typed_keys_implementation():
    rng = statemap.RandomState(jax.random.key(0, impl="rbg"))
    first = rng.normal(())
    rng.seed(0)
    assert str(rng.value.dtype) == "key<rbg>"
    assert rng.normal(()) == first
