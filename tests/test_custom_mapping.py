"""A third mapping written only through StatefulMapping's hooks behaves like vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statemap
from helpers import SequentialMapping, assert_tree_allclose


def _model():
    h = statemap.HiddenState(jnp.arange(8.0).reshape(4, 2), name="h")
    w = statemap.ParamState(jnp.array([0.5, -1.0]), name="w")
    rng = statemap.RandomState(3)
    runs = []

    def step(x):
        runs.append(1)
        h.value = jnp.tanh(h.value * w.value + x) + 0.1 * rng.normal((2,))
        return h.value.sum()

    return h, w, rng, runs, step


def _run_with(mapping_type, **kw):
    h, w, rng, runs, step = _model()
    mapping = mapping_type(step, state_in_axes={0: statemap.HiddenState}, **kw)
    x = jnp.ones((4, 2))
    outs = [mapping(x) for _ in range(3)]
    return outs, h.value, w.value, rng.value, len(runs)


def test_sequential_mapping_matches_vmap_on_outputs_states_and_keys():
    seq = _run_with(SequentialMapping)
    vec = _run_with(statemap.VMapMapping)
    assert_tree_allclose(seq[:4], vec[:4], rtol=1e-5, atol=1e-6)
    assert seq[4] == vec[4] == 1


def test_sequential_mapping_matches_a_pure_jax_oracle():
    outs, h, _, rng, _ = _run_with(SequentialMapping)
    h0, w0, key = jnp.arange(8.0).reshape(4, 2), jnp.array([0.5, -1.0]), jax.random.PRNGKey(3)
    for _ in range(3):
        key, base = jax.random.split(key)
        lane_keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(base, i))[1])(jnp.arange(4))
        noise = jax.vmap(lambda k: jax.random.normal(k, (2,)))(lane_keys)
        h0 = jnp.tanh(h0 * w0 + 1.0) + 0.1 * noise
    np.testing.assert_allclose(outs[-1], h0.sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(h, h0, rtol=1e-5)
    np.testing.assert_array_equal(rng, key)


def test_sequential_mapping_applies_the_write_policy():
    total = statemap.State(jnp.zeros(()), name="total")

    def add(x):
        total.value = total.value + x

    with pytest.raises(statemap.BatchAxisError, match=r"State 'total'"):
        SequentialMapping(add)(jnp.arange(3.0))
    assert float(total.value) == 0.0
    with pytest.warns(UserWarning, match=r"State 'total'"):
        SequentialMapping(add, unexpected_out_state_mapping="warn")(jnp.arange(3.0))
    np.testing.assert_allclose(total.value, [0.0, 1.0, 2.0])


def test_sequential_mapping_uses_its_own_axis_size_rule():
    with pytest.raises(ValueError, match=r"SequentialMapping: nothing gives the axis size"):
        SequentialMapping(lambda: statemap.random.normal())()
    assert SequentialMapping(lambda: jnp.ones(2), axis_size=3)().shape == (3, 2)


def test_explain_works_for_a_custom_mapping():
    h, _, _, _, step = _model()
    text = str(SequentialMapping(step, state_in_axes={0: statemap.HiddenState}).explain(jnp.ones((4, 2))))
    assert "SequentialMapping plan for step: 4 lanes" in text
    assert "HiddenState 'h' (4, 2)  split on axis 0  stacked on axis 0" in text


def test_a_mapping_without_its_hooks_cannot_be_built():
    class Incomplete(statemap.StatefulMapping):
        pass

    with pytest.raises(TypeError, match=r"abstract"):
        Incomplete(lambda x: x)
