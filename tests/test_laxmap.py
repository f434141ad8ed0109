"""statemap.map / LaxMapMapping, checked against statemap.vmap and hand-threaded oracles.

``statemap.map`` must give exactly what ``statemap.vmap`` gives for the same
seed (outputs, final states, advanced keys), whatever ``batch_size``: the
oracle of most tests is the same model built twice from the same seed, run
once through each mapping. Per-lane keys are also checked against the
explicit key scheme (``tests/helpers.lane_keys``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import arr, counted
from helpers import assert_concrete, assert_keys_equal, assert_tree_allclose, assert_unchanged, snapshot
from helpers import lane_keys as _lane_keys

import statemap

L = 6  # lanes
# Oracles run compiled: eager jax.random compiles every small op on its own.
lane_keys = jax.jit(_lane_keys, static_argnums=1)


def make_model(seed=0, lanes=L):
    """States of every kind and a step reading and writing them; a fresh copy per call."""
    h = statemap.HiddenState(arr(lanes, 3), name="h")  # split, written
    w = statemap.ParamState(arr(3, start=1.0), name="w")  # broadcast, read
    count = statemap.State(jnp.zeros((), jnp.int32), name="count")  # broadcast, written unbatched
    rng = statemap.RandomState(seed, name="rng")  # per-lane keys

    def step(x, y):
        h.value = jnp.tanh(h.value * w.value + x) + 0.1 * rng.normal((3,))
        count.value = count.value + 1
        return {"sum": h.value.sum() + y, "first": h.value[0]}

    return step, (h, w, count, rng)


def values(states):
    return [s.value for s in states]


SPLIT = {0: statemap.HiddenState}
X, Y = arr(L, 3, start=2.0), arr(L)


@functools.lru_cache(maxsize=None)
def vmap_reference(calls=2):
    """The oracle: outputs and final states of ``calls`` calls of ``statemap.vmap`` (seed 0)."""
    step, states = make_model()
    vmapped = statemap.vmap(step, state_in_axes=SPLIT)
    return [(vmapped(X, Y), values(states)) for _ in range(calls)]


# Same numbers as vmap


@pytest.mark.parametrize("batch_size", [None, 1, 3, 4, 16])  # 1 at a time, divisor, remainder, > L
def test_same_outputs_and_final_states_as_vmap(batch_size):
    step, states = make_model()
    mapped = statemap.LaxMapMapping(step, batch_size=batch_size, state_in_axes=SPLIT)
    for want_out, want_states in vmap_reference():
        assert_tree_allclose(mapped(X, Y), want_out)
        assert_tree_allclose(values(states), want_states)
        assert_keys_equal(states[3].value, want_states[3])
    assert int(states[2].value) == 2  # written as is: one increment per call, not per lane
    assert states[0].value.shape == (L, 3)
    assert_concrete(states)


def test_map_function_same_numbers_as_vmap():
    step, states = make_model()
    got = statemap.map(step, X, Y, batch_size=L, state_in_axes=SPLIT)
    want_out, want_states = vmap_reference()[0]
    assert_tree_allclose(got, want_out)
    assert_tree_allclose(values(states), want_states)


def test_per_lane_keys_match_the_explicit_key_oracle():
    rng = statemap.RandomState(4)
    out = statemap.map(lambda x: x + rng.normal((2,)), jnp.zeros((7, 2)), batch_size=3)
    new, keys = lane_keys(jax.random.PRNGKey(4), 7)
    want = jax.jit(jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[1], (2,))))(keys)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    assert_keys_equal(rng.value, new)
    assert len({tuple(np.asarray(r)) for r in out}) == 7  # lanes never share a key


def test_random_state_advances_once_per_call_and_repeats_per_seed():
    make_key = jax.random.key  # typed (the other tests use legacy keys)
    rng = statemap.RandomState(make_key(1))
    mapping = statemap.LaxMapMapping(lambda x: x + rng.normal(()), batch_size=2)
    first = mapping(jnp.zeros(5))
    second = mapping(jnp.zeros(5))
    assert not np.array_equal(first, second)
    parent = make_key(1)
    for _ in range(2):
        parent, _ = lane_keys(parent, 5)
    assert_keys_equal(rng.value, parent)
    rng.seed(make_key(1))
    np.testing.assert_array_equal(mapping(jnp.zeros(5)), first)


def test_explicitly_broadcast_random_state_gives_every_lane_the_same_key():
    rng = statemap.RandomState(0)
    out = statemap.map(lambda x: x + rng.normal(()), jnp.zeros(5), batch_size=2, state_in_axes={None: rng})
    new, draw = jax.jit(jax.random.split)(jax.random.PRNGKey(0))
    assert_tree_allclose(out, jnp.full(5, jax.jit(jax.random.normal)(draw)))
    assert_keys_equal(rng.value, new)


def test_pytree_arguments_and_outputs():
    x = {"a": arr(5, 2), "b": [arr(5, start=3.0)]}
    out = statemap.map(lambda t: (t["a"].sum(), t["b"][0] * 2), x, batch_size=2)
    assert_tree_allclose(out, (x["a"].sum(1), x["b"][0] * 2))


# Split, broadcast, state axes, policy


def test_state_in_axes_splits_on_axis_1():
    for batch_size in (None, 2, 5):
        h_v = statemap.HiddenState(arr(2, 5, 3), name="h")
        h_m = statemap.HiddenState(arr(2, 5, 3), name="h")

        def step(h, x):
            h.value = h.value * 2 + x
            return h.value.sum(0)

        x = arr(5, 3, start=1.0)
        want = statemap.vmap(functools.partial(step, h_v), state_in_axes={1: h_v})(x)
        got = statemap.map(functools.partial(step, h_m), x, batch_size=batch_size, state_in_axes={1: h_m})
        assert_tree_allclose(got, want)
        assert h_m.value.shape == (2, 5, 3)
        assert_tree_allclose(h_m.value, h_v.value)
        assert_tree_allclose(h_m.value, arr(2, 5, 3) * 2 + x)


def test_state_out_axes_stacks_a_broadcast_state():
    acc = statemap.State(arr(3), name="acc")
    x = arr(5, 3)

    def f(v):
        acc.value = acc.value + v

    statemap.map(f, x, batch_size=2, state_out_axes={1: acc})
    assert acc.value.shape == (3, 5)
    assert_tree_allclose(acc.value, (arr(3) + x).T)


def test_batched_write_to_a_broadcast_state_is_refused_and_changes_nothing():
    acc = statemap.ParamState(jnp.zeros(3), name="acc")
    rng = statemap.RandomState(0)

    def f(x):
        acc.value = acc.value + x + rng.normal(())

    saved = snapshot([acc, rng])
    with pytest.raises(statemap.BatchAxisError, match=r"(?s)statemap.map: .*ParamState 'acc' \(shape \(3,\)\)"):
        statemap.map(f, arr(5, 3), batch_size=2)
    assert_unchanged(saved)


def test_policy_warn_and_ignore_stack_on_axis_0():
    x = arr(5, 3)
    for policy in ("warn", "ignore"):
        acc = statemap.ParamState(jnp.ones(3), name="acc")

        def f(v, acc=acc):
            acc.value = acc.value + v

        if policy == "warn":
            with pytest.warns(UserWarning, match=r"ParamState 'acc'"):
                statemap.map(f, x, batch_size=2, unexpected_out_state_mapping=policy)
        else:
            statemap.map(f, x, batch_size=2, unexpected_out_state_mapping=policy)
        assert acc.value.shape == (5, 3)
        assert_tree_allclose(acc.value, 1 + x)


def test_unknown_policy_raises_at_construction():
    with pytest.raises(ValueError, match=r"`unexpected_out_state_mapping`"):
        statemap.LaxMapMapping(lambda x: x, unexpected_out_state_mapping="drop")


def test_created_states_come_out_stacked_like_vmap():
    def make():
        rng = statemap.RandomState(9)

        def init(scale):
            w = statemap.ParamState(rng.normal((2,)) * scale, name="w", tag="fresh")
            return w, scale * 2

        return init

    scales = arr(5, start=1.0)
    w_v, out_v = statemap.vmap(make())(scales)
    w_m, out_m = statemap.map(make(), scales, batch_size=2)
    assert type(w_m) is statemap.ParamState and w_m.name == "w" and w_m.tag == "fresh"
    assert w_m.value.shape == (5, 2)
    assert_tree_allclose(w_m.value, w_v.value)
    assert_tree_allclose(out_m, scales * 2)
    assert_concrete([w_m])
    assert len({tuple(np.asarray(r)) for r in w_m.value / scales[:, None]}) == 5


# All-or-nothing


def test_error_in_the_function_leaves_every_state_unchanged():
    step, states = make_model()
    saved = snapshot(states)

    def bad(x, y):
        step(x, y)
        raise RuntimeError("boom in a lane")

    mapping = statemap.LaxMapMapping(bad, batch_size=4, state_in_axes=SPLIT)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="boom in a lane"):
            mapping(arr(L, 3), arr(L))
        assert_unchanged(saved)


def test_size_conflict_names_both_sources_and_changes_nothing():
    step, states = make_model()
    saved = snapshot(states)
    with pytest.raises(ValueError, match=r"(?s)inconsistent sizes.*HiddenState 'h'"):
        statemap.map(step, arr(L + 1, 3), arr(L + 1), batch_size=2, state_in_axes=SPLIT)
    assert_unchanged(saved)


def test_no_mapped_input_raises():
    rng = statemap.RandomState(0)
    saved = snapshot([rng])
    with pytest.raises(ValueError, match=r"statemap.map: cannot tell the axis size"):
        statemap.map(lambda: rng.normal(()), batch_size=2)
    assert_unchanged(saved)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_batch_size_raises(bad):
    fn = counted(lambda x: x)
    with pytest.raises(ValueError, match=r"statemap.map: `batch_size` must be a positive int or None"):
        statemap.map(fn, jnp.ones(3), batch_size=bad)
    with pytest.raises(ValueError, match=rf"got {bad!r}"):
        statemap.LaxMapMapping(fn, batch_size=bad)
    assert fn.runs == 0


# Traced once per signature


def test_reused_mapping_traces_once_per_signature_and_sees_current_values():
    h = statemap.HiddenState(arr(L, 3), name="h")
    w = statemap.ParamState(arr(3, start=1.0), name="w")
    count = statemap.State(jnp.zeros((), jnp.int32), name="count")

    @counted
    def step(x):
        h.value = h.value * w.value + x
        count.value = count.value + 1
        return h.value.sum()

    mapping = statemap.LaxMapMapping(step, batch_size=4, state_in_axes=SPLIT)
    hv, x = h.value, arr(L, 3, start=2.0)
    for i in range(3):
        if i == 2:  # changes between calls are seen by the next warm call, not baked in
            w.value = w.value + 1.0
            h.value = hv = hv.at[1].set(5.0)
        hv = hv * w.value + x
        assert_tree_allclose(mapping(x), hv.sum(1))
        assert_tree_allclose(h.value, hv)
    assert int(count.value) == 3
    assert step.runs == 1
    h.value = arr(L + 2, 3)
    assert_tree_allclose(mapping(arr(L + 2, 3)), (arr(L + 2, 3) * w.value + arr(L + 2, 3)).sum(1))
    assert step.runs == 2  # a new signature: traced once more


def test_explain_shows_the_plan_and_runs_nothing():
    h = statemap.HiddenState(arr(L, 2), name="h")
    total = statemap.State(jnp.zeros(()), name="total")
    rng = statemap.RandomState(0)

    @counted
    def step(x):
        h.value = h.value + x + rng.normal(())
        total.value = total.value + 1.0
        return x

    mapping = statemap.LaxMapMapping(step, batch_size=4, state_in_axes=SPLIT)
    saved = snapshot([h, total, rng])
    text = str(mapping.explain(arr(L, 2)))
    assert_unchanged(saved)
    assert step.runs == 1
    assert text.splitlines()[0].startswith(f"statemap.map plan for step: {L} lanes")
    assert "split on axis 0" in text and "per-lane key" in text and "written as is" in text
    mapping(arr(L, 2))
    assert step.runs == 1  # the call reused the explained plan
    assert float(total.value) == 1.0


# Nesting


def test_map_inside_vmap_matches_vmap_of_vmap():
    def make():
        h = statemap.HiddenState(arr(2, 4, 3), name="h")
        rng = statemap.RandomState(2)

        def cell(x):
            h.value = h.value * 0.5 + x + rng.normal((3,))
            return h.value.sum()

        return cell, (h, rng)

    cell_v, states_v = make()
    cell_m, states_m = make()
    inner_v = statemap.vmap(cell_v, state_in_axes=statemap.HiddenState)
    outer_v = statemap.vmap(inner_v, state_in_axes=statemap.HiddenState)
    fn = counted(lambda x: statemap.map(cell_m, x, batch_size=2, state_in_axes=statemap.HiddenState))
    outer_m = statemap.vmap(fn, state_in_axes=statemap.HiddenState)
    x = arr(2, 4, 3)
    for _ in range(2):
        assert_tree_allclose(outer_m(x), outer_v(x), rtol=1e-5)
        assert_tree_allclose(values(states_m), values(states_v), rtol=1e-5)
        assert_keys_equal(states_m[1].value, states_v[1].value)
    assert fn.runs == 1
    assert_concrete(states_m)


def test_map_inside_vmap_sees_the_outer_collectives():
    x = arr(3, 4)
    inner = statemap.LaxMapMapping(lambda v: v - jax.lax.pmean(v, "outer"), batch_size=3)
    out = statemap.vmap(inner, axis_name="outer")(x)
    assert_tree_allclose(out, x - x.mean(0))


def test_map_inside_jit_equals_eager_and_runs_python_once():
    def make():
        return make_model(seed=5)

    step_j, states_j = make()
    step_e, states_e = make()
    fn = counted(step_j)
    jitted = statemap.jit(lambda x, y: statemap.map(fn, x, y, batch_size=4, state_in_axes=SPLIT))
    eager = statemap.LaxMapMapping(step_e, batch_size=4, state_in_axes=SPLIT)
    x, y = arr(L, 3), arr(L)
    keys = [np.asarray(states_j[3].value)]
    for _ in range(2):
        out = jitted(x, y)
        assert_tree_allclose(out, eager(x, y), rtol=1e-5)
        assert_tree_allclose(values(states_j), values(states_e), rtol=1e-5)
        assert_keys_equal(states_j[3].value, states_e[3].value)
        keys.append(np.asarray(states_j[3].value))
    assert fn.runs == 1
    assert len({k.tobytes() for k in keys}) == 3  # the key advanced on every call
    assert int(states_j[2].value) == 2
    assert_concrete(states_j)


def test_public_names():
    assert isinstance(statemap.LaxMapMapping(lambda x: x), statemap.StatefulMapping)
    assert statemap.LaxMapMapping.__doc__ and statemap.map.__doc__
    assert "LaxMapMapping" in statemap.__all__ and "map" in statemap.__all__


@pytest.mark.parametrize("batch_size", [None, 1, 2])
def test_an_empty_axis_gives_empty_outputs_as_jax_lax_map(batch_size):
    total = statemap.State(jnp.zeros(3), name="total")
    xs = jnp.zeros((0, 3))
    out = statemap.map(lambda x: x + total.value, xs, batch_size=batch_size)
    assert out.shape == jax.lax.map(lambda x: x + 1.0, xs).shape == (0, 3)
