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
