"""The one module that touches JAX internals, tested on its own (STYLE rule 16).

These tests import the private module on purpose: when JAX moves, they say
which of the few internal calls broke.
"""

import jax
import jax.numpy as jnp
import numpy as np

from statemap import _jax_internals as internals


def _f32(*shape):
    return jax.core.ShapedArray(shape, jnp.float32)


def test_late_inputs_are_appended_after_the_arguments():
    def body(lane_trace, args):
        (x,) = args
        w = lane_trace.new_input(_f32(3))
        return [x * w]

    lane = internals.trace_lane(body, [_f32(3)], "i", 4)
    assert [a.shape for a in lane.in_avals] == [(3,), (3,)]
    out = internals.eval_lane(lane, [jnp.full(3, 2.0), jnp.arange(3.0)])
    np.testing.assert_allclose(out[0], [0.0, 2.0, 4.0])


def test_late_inputs_work_inside_nested_jit_and_grad():
    def body(lane_trace, args):
        (x,) = args
        y = jax.jit(lambda x: x * lane_trace.new_input(_f32(3)))(x)
        g = jax.grad(lambda x: (x * lane_trace.new_input(_f32(3))).sum())(x)
        return [y, g]

    lane = internals.trace_lane(body, [_f32(3)], "i", 4)
    assert len(lane.in_avals) == 3
    y, g = internals.eval_lane(lane, [jnp.ones(3), jnp.full(3, 2.0), jnp.full(3, 5.0)])
    np.testing.assert_allclose(y, 2.0)
    np.testing.assert_allclose(g, 5.0)


def test_collectives_trace_with_the_axis_bound():
    def body(lane_trace, args):
        return [jax.lax.psum(args[0], "i"), jax.lax.psum(1, "i"), jax.lax.axis_index("i")]

    lane = internals.trace_lane(body, [_f32()], "i", 4)
    out = jax.vmap(lambda x: internals.eval_lane(lane, [x]), axis_name="i")(jnp.arange(4.0))
    np.testing.assert_allclose(out[0], 6.0)
    np.testing.assert_array_equal(out[1], 4)
    np.testing.assert_array_equal(out[2], np.arange(4))


def test_effects_are_reported():
    def pure(new_input, args):
        return [args[0] + 1]

    def effectful(new_input, args):
        jax.debug.callback(lambda v: None, args[0])
        return [args[0]]

    assert not internals.trace_lane(pure, [_f32()], "i", 2).has_effects
    assert internals.trace_lane(effectful, [_f32()], "i", 2).has_effects


def test_fast_aval_matches_typeof():
    for x in (jnp.ones((2, 3)), np.ones(4, np.int32), 1.5, 3):
        assert internals.fast_aval(x) == jax.typeof(x)


def test_vmap_batched_tells_which_outputs_carry_the_axis_in_one_trace():
    traces = []

    def fn(x, w):
        traces.append(1)
        return [x * w, w + 1, jax.lax.psum(x, "i"), x.sum() * 0 + jax.lax.axis_index("i")]

    flags = internals.vmap_batched(fn, [jnp.ones((4, 3)), jnp.ones(3)], (0, None), "i", 4)
    assert flags == [True, False, False, True]
    assert len(traces) == 1


def test_under_staging_trace():
    assert not internals.under_staging_trace()
    seen = []
    jax.jit(lambda x: seen.append(internals.under_staging_trace()) or x)(1.0)
    jax.vmap(lambda x: seen.append(internals.under_staging_trace()) or x)(jnp.ones(2))
    assert seen == [True, False]


SETTING_VALUES = {
    "jax_enable_x64": True,
    "jax_numpy_rank_promotion": "raise",
    "jax_numpy_dtype_promotion": "strict",
    "jax_default_matmul_precision": "highest",
    "jax_default_prng_impl": "rbg",
    "jax_threefry_partitionable": False,
    "jax_softmax_custom_jvp": True,
    "jax_random_seed_offset": 7,
    "jax_explicit_x64_dtypes": "allow",
    "jax_default_device": jax.devices()[1],
}


def test_trace_settings_follow_every_setting_and_jit_keys_on_all_but_the_unkeyed_one():
    """The shortcut trusts ``jax.jit`` to retrace when any of these changes, except the PRNG implementation."""
    traces = []

    @jax.jit
    def f(x):
        traces.append(1)
        return x + 1

    x = jnp.ones(2)
    f(x)
    for name, value in SETTING_VALUES.items():
        before_settings, before_unkeyed, before = internals.trace_settings(), internals.unkeyed_settings(), len(traces)
        old = getattr(jax.config, name)
        jax.config.update(name, value)
        try:
            assert internals.trace_settings() != before_settings, name
            f(x)
            keyed = len(traces) > before
            assert keyed == (internals.unkeyed_settings() == before_unkeyed), name
        finally:
            jax.config.update(name, old)
        f(x)


def test_unkeyed_settings_are_none_inside_a_transform():
    assert internals.at_eval_trace() and internals.unkeyed_settings() is not None
    seen = []

    def f(x):
        seen.append((internals.at_eval_trace(), internals.unkeyed_settings()))
        return x

    jax.jit(f)(1.0)
    jax.vmap(f)(jnp.ones(2))
    jax.grad(f)(1.0)
    assert seen == [(False, None)] * 3
