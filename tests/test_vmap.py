"""statemap.vmap / VMapMapping, checked against hand-threaded ``jax.vmap`` oracles.

Every oracle passes the states' values explicitly through ``jax.vmap`` and
returns their new values, which is what statemap must do for the user.
"""

import functools
import gc
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import arr, counted
from helpers import (
    assert_concrete,
    assert_keys_equal,
    assert_tree_allclose,
    assert_unchanged,
    key_bits,
    snapshot,
)
from helpers import lane_keys as _lane_keys

import statemap

B = 3


def normal_draw(key, shape=()):
    """What ``RandomState.normal(shape)`` returns for a state holding ``key``."""
    return jax.random.normal(jax.random.split(key)[1], shape)


# Oracles run compiled: eager jax.random compiles every small op on its own.
lane_keys = jax.jit(_lane_keys, static_argnums=1)


@functools.partial(jax.jit, static_argnums=1)
def lane_normals(keys, shape=()):
    """What each lane's ``RandomState.normal(shape)`` returns, given the lanes' keys."""
    return jax.vmap(normal_draw, in_axes=(0, None))(keys, shape)


def _write(state, value):
    state.value = value
    return value.sum()


def line_of(text, label):
    """The one line of an explanation that mentions ``label``."""
    found = [line for line in text.splitlines() if line.startswith(label)]
    assert len(found) == 1, (label, text)
    return found[0]


# Broadcast reads and split states


def test_broadcast_reads():
    w = statemap.ParamState(arr(4, start=1), name="w")
    b = statemap.ParamState({"b": jnp.float32(0.5), "c": arr(4)}, name="b")
    saved = snapshot([w, b])
    x = arr(B, 4)
    out = statemap.vmap(lambda x: x * w.value + b.value["b"] - b.value["c"])(x)
    want = jax.vmap(lambda x, w, b: x * w + b["b"] - b["c"], in_axes=(0, None, None))(x, w.value, b.value)
    assert_tree_allclose(out, want)
    assert_unchanged(saved)


@pytest.mark.parametrize(
    "axis, shape",
    [(0, (B, 2, 4)), (1, (2, B, 4)), (2, (2, 4, B)), (-1, (2, 4, B)), (-2, (2, B, 4)), (-3, (B, 2, 4))],
)
def test_split_state_comes_back_on_its_axis(axis, shape):
    h0 = arr(*shape)
    h = statemap.HiddenState(h0, name="h")
    x = arr(B, start=1)

    def step(x):
        h.value = jnp.tanh(h.value) * 2 + x
        return h.value.sum()

    out = statemap.vmap(step, state_in_axes={axis: statemap.HiddenState})(x)

    def oracle(h, x):
        new = jnp.tanh(h) * 2 + x
        return new.sum(), new

    want_out, want_h = jax.vmap(oracle, in_axes=(axis, 0), out_axes=(0, axis))(h0, x)
    assert_tree_allclose(out, want_out)
    assert h.value.shape == shape
    assert_tree_allclose(h.value, want_h)
    assert_concrete([h])


def test_split_state_read_only_is_unchanged():
    h = statemap.HiddenState(arr(B, 2), name="h")
    saved = snapshot([h])
    out = statemap.vmap(lambda x: h.value * x, state_in_axes=statemap.HiddenState)(arr(B, start=1))
    assert_tree_allclose(out, jax.vmap(lambda h, x: h * x)(h.value, arr(B, start=1)))
    assert_unchanged(saved)


def test_split_pytree_state_splits_every_leaf():
    h0 = {"a": arr(B, 2), "b": [arr(4, B)]}
    h = statemap.HiddenState(h0, name="h")
    # A leaf-wise axis is the same for every leaf: axis -1 is axis 1 of both.
    m = statemap.vmap(lambda: h.value["a"].sum() + h.value["b"][0].sum(), state_in_axes={-1: statemap.HiddenState})
    with pytest.raises(ValueError, match=r"inconsistent sizes"):
        m()
    h1 = {"a": arr(2, B), "b": [arr(4, B)]}
    h.value = h1

    def step():
        h.value = jax.tree.map(lambda v: v + 1, h.value)
        return h.value["a"].sum() + h.value["b"][0].sum()

    out = statemap.vmap(step, state_in_axes={-1: statemap.HiddenState})()

    def oracle(h):
        new = jax.tree.map(lambda v: v + 1, h)
        return new["a"].sum() + new["b"][0].sum(), new

    want_out, want_h = jax.vmap(oracle, in_axes=(-1,), out_axes=(0, -1))(h1)
    assert_tree_allclose(out, want_out)
    assert_tree_allclose(h.value, {"a": arr(2, B) + 1, "b": [arr(4, B) + 1]})
    assert_tree_allclose(h.value, want_h)


@pytest.mark.parametrize(
    "make_spec",
    [
        pytest.param(lambda h: statemap.HiddenState, id="bare type"),
        pytest.param(lambda h: "rnn", id="bare tag"),
        pytest.param(lambda h: h, id="the state"),
        pytest.param(lambda h: [h], id="iterable of states"),
        pytest.param(lambda h: (statemap.LongTermState, "rnn"), id="tuple"),
        pytest.param(lambda h: (lambda path, s: path == ("h",)), id="predicate on path"),
        pytest.param(lambda h: statemap.filters.PathContains("h"), id="PathContains"),
        pytest.param(lambda h: {0: "rnn"}, id="dict"),
        pytest.param(lambda h: {1: statemap.LongTermState, 0: statemap.HiddenState}, id="second entry"),
    ],
)
def test_state_in_axes_filter_forms(make_spec):
    h = statemap.HiddenState(arr(B, 2), name="h", tag="rnn")
    w = statemap.ParamState(arr(2), name="w")
    x = arr(B, 2)
    out = statemap.vmap(lambda x: h.value * w.value + x, state_in_axes=make_spec(h))(x)
    want = jax.vmap(lambda h, w, x: h * w + x, in_axes=(0, None, 0))(h.value, w.value, x)
    assert_tree_allclose(out, want)


def test_state_in_axes_first_matching_entry_wins():
    h = statemap.HiddenState(arr(4, B), name="h", tag="rnn")
    x = arr(B)
    # Axis 0 would have size 4 and clash with x; the first entry (axis 1) must win.
    out = statemap.vmap(lambda x: h.value * x, state_in_axes={1: "rnn", 0: statemap.HiddenState})(x)
    assert_tree_allclose(out, jax.vmap(lambda h, x: h * x, in_axes=(1, 0))(h.value, x))


def test_state_in_axes_none_broadcasts_explicitly():
    h = statemap.HiddenState(arr(B, 2), name="h", tag="keep")
    g = statemap.HiddenState(arr(B, 2, start=5), name="g")
    x = arr(B, 2)
    spec = {None: "keep", 0: statemap.HiddenState}
    out = statemap.vmap(lambda x: (h.value + g.value) * x, state_in_axes=spec)(x)
    want = jax.vmap(lambda h, g, x: (h + g) * x, in_axes=(None, 0, 0))(h.value, g.value, x)
    assert out.shape == (B, B, 2)
    assert_tree_allclose(out, want)


# state_out_axes


def test_state_out_axes_moves_a_split_state():
    h = statemap.HiddenState(arr(B, 2), name="h")
    x = arr(B, start=1)

    def step(x):
        h.value = h.value * x
        return x

    statemap.vmap(step, state_in_axes={0: statemap.HiddenState}, state_out_axes={1: statemap.HiddenState})(x)
    _, want = jax.vmap(lambda h, x: (x, h * x), out_axes=(0, 1))(arr(B, 2), x)
    assert h.value.shape == (2, B)
    assert_tree_allclose(h.value, want)


@pytest.mark.parametrize("axis, shape", [(0, (B, 2, 4)), (1, (2, B, 4)), (-1, (2, 4, B)), (2, (2, 4, B))])
def test_state_out_axes_stacks_a_broadcast_state(axis, shape):
    acc = statemap.LongTermState(arr(2, 4), name="acc")
    x = arr(B, start=1)

    def step(x):
        acc.value = acc.value * x
        return x + 1

    out = statemap.vmap(step, state_out_axes={axis: statemap.LongTermState})(x)
    want_out, want_acc = jax.vmap(lambda a, x: (x + 1, a * x), in_axes=(None, 0), out_axes=(0, axis))(
        arr(2, 4), x
    )
    assert_tree_allclose(out, want_out)
    assert acc.value.shape == shape
    assert_tree_allclose(acc.value, want_acc)


def test_state_out_axes_bare_filter_means_axis_zero_and_write_only_states_work():
    out_state = statemap.ShortTermState(jnp.zeros(()), name="last")
    x = arr(B, 2)

    def step(x):
        out_state.value = x * 2  # written, never read
        return x.sum()

    out = statemap.vmap(step, state_out_axes=out_state)(x)
    assert_tree_allclose(out, x.sum(axis=1))
    assert_tree_allclose(out_state.value, x * 2)


def test_state_out_axes_none_refuses_a_batched_write():
    s = statemap.LongTermState(jnp.zeros(()), name="mean")
    saved = snapshot([s])

    def step(x):
        s.value = x.sum()
        return x

    m = statemap.vmap(step, state_out_axes={None: statemap.LongTermState}, unexpected_out_state_mapping="ignore")
    with pytest.raises(statemap.BatchAxisError, match=r"LongTermState 'mean'.*`state_out_axes` maps it to None"):
        m(arr(B, 2))
    assert_unchanged(saved)


def test_state_out_axes_none_allows_an_unbatched_write():
    s = statemap.LongTermState(jnp.zeros(()), name="total")

    def step(x):
        s.value = jax.lax.psum(x.sum(), "i")
        return x

    statemap.vmap(step, axis_name="i", state_out_axes={None: statemap.LongTermState})(arr(B, 2))
    assert_tree_allclose(s.value, arr(B, 2).sum())


# Unbatched writes are written as is


def test_psum_and_pmean_writes_are_written_as_is():
    total = statemap.LongTermState(jnp.float32(1.0), name="total")
    mean = statemap.LongTermState(jnp.zeros(2), name="mean")
    x = arr(B, 2)

    def step(x):
        total.value = total.value + jax.lax.psum(x.sum(), "i")
        mean.value = jax.lax.pmean(x, "i")
        return x * 2

    out = statemap.vmap(step, axis_name="i")(x)

    def oracle(t, x):
        return x * 2, t + jax.lax.psum(x.sum(), "i"), jax.lax.pmean(x, "i")

    want = jax.vmap(oracle, in_axes=(None, 0), out_axes=(0, None, None), axis_name="i")(jnp.float32(1.0), x)
    assert_tree_allclose((out, total.value, mean.value), want)
    assert total.value.shape == () and mean.value.shape == (2,)


def test_unbatched_scan_counter_is_written_as_is():
    count = statemap.ShortTermState(jnp.int32(5), name="count")
    acc = statemap.HiddenState(jnp.zeros((B, 2)), name="acc")
    x = arr(B, 2)

    def step(x):
        def body(carry, _):
            c, a = carry
            return (c + 1, a + x), None

        (count.value, acc.value), _ = jax.lax.scan(body, (count.value, acc.value), None, length=4)
        return acc.value.sum()

    out = statemap.vmap(step, state_in_axes={0: statemap.HiddenState})(x)

    def oracle(c, a, x):
        def body(carry, _):
            c, a = carry
            return (c + 1, a + x), None

        (c, a), _ = jax.lax.scan(body, (c, a), None, length=4)
        return a.sum(), c, a

    want = jax.vmap(oracle, in_axes=(None, 0, 0), out_axes=(0, None, 0))(jnp.int32(5), jnp.zeros((B, 2)), x)
    assert_tree_allclose((out, count.value, acc.value), want)
    assert count.value.shape == () and int(count.value) == 9


def test_writes_from_broadcast_values_are_written_as_is():
    w = statemap.ParamState(arr(2, start=1), name="w")
    c = statemap.ShortTermState(jnp.zeros(2), name="c")

    def step(x):
        c.value = w.value * 2 + 1
        w.value = jnp.ones(2)
        return x

    statemap.vmap(step)(arr(B, 2))
    assert_tree_allclose(c.value, arr(2, start=1) * 2 + 1)
    assert_tree_allclose(w.value, jnp.ones(2))


# Write policy


def batched_write(s):
    def step(x):
        s.value = s.value + x
        return x.sum()

    return step


def test_policy_raise_is_the_default_and_names_the_state():
    s = statemap.LongTermState(jnp.zeros(2), name="running")
    saved = snapshot([s])
    m = statemap.vmap(batched_write(s))
    for _ in range(2):  # cold and warm
        with pytest.raises(statemap.BatchAxisError, match=r"LongTermState 'running' \(shape \(2,\)\)") as info:
            m(arr(B, 2))
        assert_unchanged(saved)
    message = str(info.value)
    assert message.startswith("statemap.vmap:")
    assert "state_out_axes={0: <filter>}" in message
    assert "unexpected_out_state_mapping='warn'" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, statemap.StatemapError)


def test_policy_raise_lists_every_refused_state():
    a = statemap.LongTermState(jnp.zeros(()), name="first")
    b = statemap.ShortTermState(jnp.zeros(()), tag="second")

    def step(x):
        a.value = x.sum()
        b.value = x.mean()
        return x

    with pytest.raises(statemap.BatchAxisError, match=r"(?s)LongTermState 'first'.*ShortTermState tagged 'second'"):
        statemap.vmap(step, unexpected_out_state_mapping="raise")(arr(B, 2))


def test_policy_warn_stacks_on_axis_zero_with_a_warning():
    s = statemap.LongTermState(arr(2), name="running")
    m = statemap.vmap(batched_write(s), unexpected_out_state_mapping="warn")
    x = arr(B, 2, start=1)
    with pytest.warns(UserWarning, match=r"LongTermState 'running'.*stacked along axis 0"):
        out = m(x)
    want_out, want_s = jax.vmap(lambda s, x: (x.sum(), s + x), in_axes=(None, 0))(arr(2), x)
    assert_tree_allclose((out, s.value), (want_out, want_s))
    assert s.value.shape == (B, 2)
    # Every call warns, warm calls included.
    s.value = arr(2)
    with pytest.warns(UserWarning, match=r"LongTermState 'running'"):
        m(x)
    assert_tree_allclose(s.value, want_s)


def test_policy_ignore_stacks_silently():
    # pytest's filterwarnings=error turns any warning into a failure here.
    s = statemap.LongTermState(arr(2), name="running")
    x = arr(B, 2, start=1)
    out = statemap.vmap(batched_write(s), unexpected_out_state_mapping="ignore")(x)
    want_out, want_s = jax.vmap(lambda s, x: (x.sum(), s + x), in_axes=(None, 0))(arr(2), x)
    assert_tree_allclose((out, s.value), (want_out, want_s))


@pytest.mark.parametrize("bad", ["loud", "RAISE", None, 0])
def test_invalid_policy_is_rejected_at_construction(bad):
    fn = counted(lambda x: x)
    with pytest.raises(ValueError, match=r"`unexpected_out_state_mapping` must be 'raise', 'warn' or 'ignore', got"):
        statemap.vmap(fn, unexpected_out_state_mapping=bad)
    with pytest.raises(ValueError, match=r"statemap\.vmap: `unexpected_out_state_mapping`"):
        statemap.VMapMapping(fn, unexpected_out_state_mapping=bad)
    with pytest.raises(ValueError, match=r"`unexpected_out_state_mapping`"):
        statemap.vmap(unexpected_out_state_mapping=bad)(fn)
    assert fn.runs == 0


# Random states


@pytest.fixture(params=["legacy", "typed"])
def make_key(request):
    return {"legacy": jax.random.PRNGKey, "typed": jax.random.key}[request.param]


def test_random_state_gives_each_lane_its_own_key(make_key):
    rng = statemap.RandomState(make_key(0), name="rng")
    m = statemap.vmap(lambda x: x + rng.normal((2,)))
    x = jnp.zeros((B, 2))
    parent = make_key(0)
    for _ in range(3):
        out = m(x)
        parent, keys = lane_keys(parent, B)
        want = lane_normals(keys, (2,))
        assert_tree_allclose(out, want)
        # The parent advanced exactly once.
        assert_keys_equal(rng.value, parent)
        assert len({tuple(np.asarray(row)) for row in out}) == B
    assert_concrete([rng])


def test_random_keys_per_lane_are_exactly_lane_keys(make_key):
    rng = statemap.RandomState(make_key(3))
    out = statemap.vmap(lambda: rng.next_key(), axis_size=4)()
    new, keys = lane_keys(make_key(3), 4)
    assert_keys_equal(out, jax.jit(jax.vmap(lambda k: jax.random.split(k)[1]))(keys))
    assert_keys_equal(rng.value, new)
    assert len({tuple(row) for row in key_bits(out)}) == 4


def test_reading_a_random_state_sees_the_lane_key_and_advances_it_once():
    rng = statemap.RandomState(0)
    out = statemap.vmap(lambda x: rng.value, in_axes=0)(jnp.zeros(B))
    new, keys = lane_keys(jax.random.PRNGKey(0), B)
    assert_keys_equal(out, keys)
    assert_keys_equal(rng.value, new)


def test_several_draws_per_lane_follow_the_key_chain():
    rng = statemap.RandomState(1)

    def step(x):
        return rng.normal(()) + x, rng.uniform((2,))

    a, b = statemap.vmap(step)(jnp.zeros(B))

    def oracle(k):
        k, s1 = jax.random.split(k)
        _, s2 = jax.random.split(k)
        return jax.random.normal(s1, ()), jax.random.uniform(s2, (2,))

    new, keys = lane_keys(jax.random.PRNGKey(1), B)
    assert_tree_allclose((a, b), jax.jit(jax.vmap(oracle))(keys))
    assert_keys_equal(rng.value, new)


def test_several_random_states_advance_independently():
    r1, r2 = statemap.RandomState(1, name="r1"), statemap.RandomState(2, name="r2")
    untouched = statemap.RandomState(3)
    saved = snapshot([untouched])
    out = statemap.vmap(lambda: (r1.normal(), r2.normal()), axis_size=B)()
    new1, keys1 = lane_keys(jax.random.PRNGKey(1), B)
    new2, keys2 = lane_keys(jax.random.PRNGKey(2), B)
    assert_tree_allclose(out, (lane_normals(keys1), lane_normals(keys2)))
    assert_keys_equal(r1.value, new1)
    assert_keys_equal(r2.value, new2)
    assert_unchanged(saved)


def test_random_results_are_deterministic_per_seed_and_reseeding_repeats_them():
    # One mapping throughout (its random-bit generator compiles once): a fresh
    # state and a reseeded one hold the same key, so they must draw the same.
    rng = statemap.RandomState(7)
    m = statemap.vmap(lambda x: x * rng.uniform((2,)))

    def run(seed):
        rng.seed(seed)
        return [m(jnp.ones((B, 2))) for _ in range(2)], rng.value

    assert_keys_equal(rng.value, statemap.RandomState(7).value)
    (a1, a2), ka = run(7)
    (b1, b2), kb = run(7)
    (c1, _), _ = run(8)
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    assert not np.array_equal(a1, a2)
    assert not np.array_equal(a1, c1)
    assert_keys_equal(ka, kb)


def test_explicitly_broadcast_random_state_gives_every_lane_the_same_key():
    rng = statemap.RandomState(0, name="shared")
    out = statemap.vmap(lambda x: x + rng.normal(), state_in_axes={None: statemap.RandomState})(jnp.zeros(B))
    want = normal_draw(jax.random.PRNGKey(0))
    assert_tree_allclose(out, jnp.full(B, want))
    # Every lane wrote the same advanced key, so it is written as is.
    assert_keys_equal(rng.value, jax.random.split(jax.random.PRNGKey(0))[0])


def test_random_draws_combine_with_split_states():
    h = statemap.HiddenState(arr(B, 2), name="h")
    rng = statemap.RandomState(5)

    def step(x):
        h.value = h.value + x + rng.normal((2,))
        return h.value.sum()

    out = statemap.vmap(step, state_in_axes={0: statemap.HiddenState})(arr(B, 2, start=3))
    new, keys = lane_keys(jax.random.PRNGKey(5), B)

    @jax.jit
    @jax.vmap
    def oracle(h, x, k):
        h = h + x + normal_draw(k, (2,))
        return h.sum(), h

    want_out, want_h = oracle(arr(B, 2), arr(B, 2, start=3), keys)
    assert_tree_allclose((out, h.value), (want_out, want_h))
    assert_keys_equal(rng.value, new)


def test_module_default_random_state_works_under_vmap():
    saved = statemap.random.DEFAULT.value
    try:
        statemap.random.seed(2)
        out = statemap.vmap(lambda x: x + statemap.random.normal(), axis_size=B)(jnp.zeros(B))
        new, keys = lane_keys(jax.random.PRNGKey(2), B)
        assert_tree_allclose(out, lane_normals(keys))
        assert_keys_equal(statemap.random.DEFAULT.value, new)
    finally:
        statemap.random.DEFAULT.value = saved


# States created inside


def test_created_states_come_out_stacked_on_axis_zero():
    made = []

    def init(x):
        p = statemap.ParamState(x * 2, name="p", tag="fresh")
        made.append(p)
        return p

    m = statemap.vmap(init)
    x = arr(B, 2)
    out = m(x)
    assert out is made[0]
    assert type(out) is statemap.ParamState and out.name == "p" and out.tag == "fresh"
    assert_tree_allclose(out.value, x * 2)
    assert_concrete([out])

    warm = m(x + 1)  # no new Python run: a new object with the new values
    assert len(made) == 1
    assert warm is not out and type(warm) is statemap.ParamState and warm.name == "p"
    assert_tree_allclose(warm.value, (x + 1) * 2)
    assert_tree_allclose(out.value, x * 2)


@pytest.mark.parametrize("kind", ["vmap", "pmap"])
def test_state_out_axes_places_created_states(kind):
    """As for a written state: stacked on the axis it names, or as is (None) if every lane made the same."""
    make = statemap.vmap if kind == "vmap" else statemap.pmap
    rng = statemap.RandomState(0, name="rng")

    def init(x):
        w = statemap.ParamState(rng.normal((3,)), name="w")
        d = statemap.ShortTermState(x * jnp.ones(3), name="d")
        shared = statemap.LongTermState(jnp.arange(3.0), tag="shared")
        return w, d, shared

    m = make(init, state_out_axes={1: statemap.ShortTermState, None: "shared"})
    x = jnp.arange(4.0)
    for call in range(2):  # the traced call and a warm one
        w, d, shared = m(x + call)
        assert w.value.shape == (4, 3)
        assert_tree_allclose(d.value, jnp.ones((3, 1)) * (x + call))
        assert_tree_allclose(shared.value, jnp.arange(3.0))
    assert "stacked on axis 1" in str(m.explain(x)) and "written as is" in str(m.explain(x))


def test_state_out_axes_none_refuses_a_created_state_that_varies():
    rng = statemap.RandomState(0, name="rng")
    before = snapshot([rng])
    m = statemap.vmap(lambda x: statemap.State(x, tag="shared"), state_out_axes={None: "shared"})
    with pytest.raises(statemap.BatchAxisError, match=r"State tagged 'shared'.*`state_out_axes` maps it to None"):
        m(jnp.arange(4.0))
    assert_unchanged(before)


def test_created_states_inside_containers_are_the_same_objects():
    def init(x):
        p = statemap.ParamState({"w": x * 2, "b": x.sum()}, name="p")
        q = statemap.HiddenState(jnp.zeros(4), name="q")
        return {"p": p, "pair": [p, x.sum()], "q": (q,)}

    m = statemap.vmap(init)
    x = arr(B, 2)
    for shift in (0.0, 1.0):  # cold, then warm
        out = m(x + shift)
        assert out["p"] is out["pair"][0]
        assert out["p"] is not out["q"][0]
        assert_tree_allclose(out["p"].value, {"w": (x + shift) * 2, "b": (x + shift).sum(axis=1)})
        assert_tree_allclose(out["pair"][1], (x + shift).sum(axis=1))
        assert type(out["q"][0]) is statemap.HiddenState
        assert_tree_allclose(out["q"][0].value, jnp.zeros((B, 4)))


def test_created_states_make_an_ensemble_with_per_lane_random_init():
    rng = statemap.RandomState(0)

    def init():
        return statemap.ParamState(rng.normal((2,)), name="w")

    w = statemap.vmap(init, axis_size=4)()
    new, keys = lane_keys(jax.random.PRNGKey(0), 4)
    assert w.value.shape == (4, 2)
    assert_tree_allclose(w.value, lane_normals(keys, (2,)))
    assert_keys_equal(rng.value, new)


def test_created_state_read_and_written_inside_is_not_an_input():
    def init(x):
        s = statemap.ShortTermState(jnp.zeros(()), name="s")
        s.value = s.value + x.sum()
        return s, s.value * 2

    s, doubled = statemap.vmap(init)(arr(B, 2))
    assert_tree_allclose(s.value, arr(B, 2).sum(axis=1))
    assert_tree_allclose(doubled, arr(B, 2).sum(axis=1) * 2)


# Arguments: in_axes, out_axes, keywords


def test_in_axes_pytree_prefix():
    params = {"a": arr(B, 2), "b": arr(2, start=7)}
    x = arr(2, B)

    def f(params, x):
        return params["a"] * params["b"] + x

    in_axes = ({"a": 0, "b": None}, 1)
    out = statemap.vmap(f, in_axes=in_axes)(params, x)
    assert_tree_allclose(out, jax.vmap(f, in_axes=in_axes)(params, x))


@pytest.mark.parametrize(
    "in_axes, shapes",
    [
        ((None, 0), ((2,), (B, 2))),
        ([0, None], ((B, 2), (2,))),
        (-1, ((2, B), (2, B))),
        ((-2, 1), ((B, 2), (2, B))),
        (1, ((2, B), (2, B))),
    ],
)
def test_in_axes_none_negative_and_lists(in_axes, shapes):
    w = statemap.ParamState(jnp.float32(3.0))
    a, b = arr(*shapes[0]), arr(*shapes[1], start=1)

    def f(a, b):
        return a * b + w.value

    out = statemap.vmap(f, in_axes=in_axes)(a, b)
    assert_tree_allclose(out, jax.vmap(lambda a, b: a * b + 3.0, in_axes=in_axes)(a, b))


def test_out_axes_pytree():
    x = arr(B, 2)

    def f(x):
        return {"u": x * 2, "v": (x + 1, jax.lax.psum(x, "i"))}

    out_axes = {"u": 0, "v": (1, None)}
    out = statemap.vmap(f, axis_name="i", out_axes=out_axes)(x)
    want = jax.vmap(f, axis_name="i", out_axes=out_axes)(x)
    assert_tree_allclose(out, want)
    assert out["v"][0].shape == (2, B) and out["v"][1].shape == (2,)


def test_out_axes_negative():
    x = arr(B, 2)
    out = statemap.vmap(lambda x: x * 2, out_axes=-1)(x)
    assert_tree_allclose(out, jax.vmap(lambda x: x * 2, out_axes=-1)(x))


def test_out_axes_none_for_a_batched_output_is_a_value_error():
    with pytest.raises(ValueError, match=r"statemap\.vmap: output leaf 0 varies across the mapped axis"):
        statemap.vmap(lambda x: x * 2, out_axes=None)(arr(B))


def test_keyword_arguments_are_mapped_on_axis_zero():
    w = statemap.ParamState(arr(2))

    def f(x, *, y, z):
        return x * y["a"] + z + w.value

    x, y, z = arr(2, B), {"a": arr(B, 2)}, arr(B, 2, start=3)
    out = statemap.vmap(f, in_axes=1)(x, y=y, z=z)
    want = jax.vmap(lambda x, *, y, z: x * y["a"] + z + arr(2), in_axes=1)(x, y=y, z=z)
    assert_tree_allclose(out, want)


def test_function_returning_none():
    s = statemap.HiddenState(arr(B), name="s")

    def f(x):
        s.value = s.value + x

    assert statemap.vmap(f, state_in_axes=s)(arr(B)) is None
    assert_tree_allclose(s.value, arr(B) * 2)


def test_function_returning_a_non_array_is_a_type_error():
    s = statemap.HiddenState(arr(B), name="s")
    saved = snapshot([s])

    def f(x):
        s.value = s.value + x
        return "done"

    with pytest.raises(TypeError, match=r"statemap\.vmap: the function returned a str \('done'\)"):
        statemap.vmap(f, state_in_axes=s)(arr(B))
    assert_unchanged(saved)


# Axis name, axis size, spmd_axis_name


def test_axis_name_collectives():
    w = statemap.ParamState(jnp.float32(2.0))
    x = arr(B, 2)

    def f(x):
        return (
            jax.lax.psum(x, "i") * w.value,
            jax.lax.pmean(x, "i"),
            jax.lax.axis_index("i"),
            jax.lax.all_gather(x.sum(), "i"),
        )

    out = statemap.vmap(f, axis_name="i")(x)
    want = jax.vmap(lambda x: f(x), axis_name="i")(x)
    assert_tree_allclose(out, want)
    np.testing.assert_array_equal(out[2], np.arange(B))


def test_axis_size_without_mapped_inputs():
    w = statemap.ParamState(arr(2))
    x = arr(2, start=1)
    out = statemap.vmap(lambda x: x * jax.lax.axis_index("i") + w.value, in_axes=None, axis_size=4, axis_name="i")(x)
    want = jax.vmap(lambda x: x * jax.lax.axis_index("i") + arr(2), in_axes=None, axis_size=4, axis_name="i")(x)
    assert out.shape == (4, 2)
    assert_tree_allclose(out, want)


def test_axis_size_with_no_arguments():
    out = statemap.vmap(lambda: jax.lax.axis_index("i") * 2, axis_size=5, axis_name="i")()
    np.testing.assert_array_equal(out, np.arange(5) * 2)


def test_axis_size_that_agrees_with_the_arguments():
    out = statemap.vmap(lambda x: x + 1, axis_size=B)(arr(B))
    assert_tree_allclose(out, arr(B) + 1)


def test_no_mapped_input_and_no_axis_size_is_a_value_error():
    w = statemap.ParamState(arr(2))
    saved = snapshot([w])
    with pytest.raises(ValueError, match=r"statemap\.vmap: cannot tell the axis size.*`axis_size=n`"):
        statemap.vmap(lambda x: x * w.value, in_axes=None)(arr(2))
    assert_unchanged(saved)


def test_a_state_argument_the_function_does_not_read_gives_no_size_and_the_error_says_so():
    a = statemap.ParamState(jnp.zeros((2, 3)), name="a")
    with pytest.raises(ValueError, match=r"a State passed as an argument gives the size only if the function reads it"):
        statemap.vmap(lambda m: m, in_axes=0)(a)


def test_axis_size_that_disagrees_is_a_value_error_listing_both():
    with pytest.raises(ValueError, match=r"inconsistent sizes") as info:
        statemap.vmap(lambda x: x, axis_size=4)(arr(B))
    assert "* argument args[0] has axis 0 of size 3 (shape (3,), dtype float32)" in str(info.value)
    assert "`axis_size`" in str(info.value) and "4" in str(info.value)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_axis_size_is_rejected_at_construction(bad):
    with pytest.raises(ValueError, match=r"statemap\.vmap: `axis_size` must be a positive int or None"):
        statemap.vmap(lambda x: x, axis_size=bad)


def test_split_state_gives_the_axis_size():
    h = statemap.HiddenState(arr(2, 5), name="h")
    out = statemap.vmap(lambda: h.value * 2, state_in_axes={1: statemap.HiddenState})()
    assert_tree_allclose(out, jax.vmap(lambda h: h * 2, in_axes=1)(h.value))


@pytest.mark.parametrize("spmd_axis_name", ["data", ("data", "model")])
def test_spmd_axis_name_is_accepted(spmd_axis_name):
    w = statemap.ParamState(arr(2))
    x = arr(B, 2)
    m = statemap.vmap(lambda x: x * w.value, spmd_axis_name=spmd_axis_name)
    assert_tree_allclose(m(x), jax.vmap(lambda x: x * arr(2), spmd_axis_name=spmd_axis_name)(x))


# Nesting


def test_nested_vmap_splits_states_at_both_levels():
    A = 2
    h0 = arr(A, B, 2)
    h = statemap.HiddenState(h0, name="h")
    w = statemap.ParamState(jnp.float32(0.5), name="w")
    xs = arr(A, B, 2, start=1)

    def cell(x):
        h.value = h.value * w.value + x
        return h.value.sum()

    inner = statemap.vmap(cell, state_in_axes={0: statemap.HiddenState})
    outer = statemap.vmap(lambda xs: inner(xs), state_in_axes={0: statemap.HiddenState})
    out = outer(xs)

    def oracle_cell(h, x):
        new = h * 0.5 + x
        return new.sum(), new

    want_out, want_h = jax.vmap(jax.vmap(oracle_cell))(h0, xs)
    assert_tree_allclose((out, h.value), (want_out, want_h))
    assert_concrete([h, w])

    # A warm outer call runs the compiled program with the current values.
    out2 = outer(xs)
    want_out2, want_h2 = jax.vmap(jax.vmap(oracle_cell))(want_h, xs)
    assert_tree_allclose((out2, h.value), (want_out2, want_h2))


def test_nested_vmap_with_different_axes_and_inner_mapping_built_inside():
    A = 2
    h0 = arr(A, 2, B)
    h = statemap.HiddenState(h0, name="h")
    x = arr(B, start=1)

    def outer_lane(x):
        def cell(x):
            h.value = h.value + x
            return h.value * 2

        return statemap.vmap(cell, state_in_axes={1: statemap.HiddenState}, out_axes=1)(x)

    out = statemap.vmap(outer_lane, in_axes=None, state_in_axes={0: statemap.HiddenState})(x)

    def oracle_cell(h, x):
        return (h + x) * 2, h + x

    inner = jax.vmap(oracle_cell, in_axes=(1, 0), out_axes=(1, 1))
    want_out, want_h = jax.vmap(inner, in_axes=(0, None))(h0, x)
    assert_tree_allclose((out, h.value), (want_out, want_h))


def test_nested_vmap_random_keys_per_lane_at_both_levels():
    A = 2
    rng = statemap.RandomState(0)
    inner = statemap.vmap(lambda: rng.normal(), axis_size=B)
    out = statemap.vmap(lambda: inner(), axis_size=A)()
    new, outer_keys = lane_keys(jax.random.PRNGKey(0), A)

    @jax.jit
    @jax.vmap
    def outer_oracle(k):
        _, keys = lane_keys(k, B)
        return lane_normals(keys)

    assert out.shape == (A, B)
    assert_tree_allclose(out, outer_oracle(outer_keys))
    assert_keys_equal(rng.value, new)
    assert len(set(np.asarray(out).ravel().tolist())) == A * B


def test_nested_vmap_inner_broadcast_write_stacked_by_outer():
    A = 2
    total = statemap.LongTermState(jnp.zeros(()), name="total")
    xs = arr(A, B)

    def lane(x):
        total.value = total.value + jax.lax.psum(x, "inner")
        return x

    inner = statemap.vmap(lane, axis_name="inner")
    statemap.vmap(lambda xs: inner(xs), unexpected_out_state_mapping="ignore")(xs)
    assert_tree_allclose(total.value, xs.sum(axis=1))


# explain()


def explain_setup():
    h = statemap.HiddenState(arr(B, 2), name="h")
    w = statemap.ParamState(arr(2), name="w")
    rng = statemap.RandomState(0, name="rng")
    total = statemap.LongTermState(jnp.zeros(()), name="total")
    acc = statemap.ShortTermState(jnp.zeros(2), name="acc")
    unread = statemap.State(jnp.zeros(()), name="unread")

    @counted
    def step(x):
        h.value = h.value * w.value + x + rng.normal((2,))
        total.value = total.value + jax.lax.psum(x.sum(), "i")
        acc.value = acc.value + x
        fresh = statemap.ParamState(x * 3, name="fresh")
        return h.value.sum(), fresh

    states = [h, w, rng, total, acc, unread]
    return states, step


def test_explain_lists_every_state_and_the_axis_size_source():
    (_, _, _, _, acc, _), step = explain_setup()
    m = statemap.vmap(step, axis_name="i", state_in_axes={0: statemap.HiddenState}, state_out_axes={1: "never", 0: acc})
    text = str(m.explain(arr(B, 2)))
    assert text.splitlines()[0] == (
        "statemap.vmap plan for step: 3 lanes (axis size from argument args[0], axis 0)"
    )
    assert "split on axis 0" in line_of(text, "HiddenState 'h'")
    assert "stacked on axis 0" in line_of(text, "HiddenState 'h'")
    assert "broadcast" in line_of(text, "ParamState 'w'") and "unchanged" in line_of(text, "ParamState 'w'")
    assert "per-lane key" in line_of(text, "RandomState 'rng'")
    assert "advanced once" in line_of(text, "RandomState 'rng'")
    assert "written as is" in line_of(text, "LongTermState 'total'")
    assert "stacked on axis 0" in line_of(text, "ShortTermState 'acc'")
    assert "created inside" in line_of(text, "ParamState 'fresh'")
    assert "stacked on axis 0" in line_of(text, "ParamState 'fresh'")
    assert "unread" not in text


def test_explain_does_not_run_or_change_anything_and_the_call_reuses_the_plan():
    states, step = explain_setup()
    h, w, rng, total, acc, _ = states
    saved = snapshot(states)
    m = statemap.vmap(step, axis_name="i", state_in_axes={0: statemap.HiddenState}, state_out_axes={0: acc})
    x = arr(B, 2)
    explanation = m.explain(x)
    assert step.runs == 1
    assert_unchanged(saved)
    assert str(m.explain(x)) == str(explanation)  # a second explain reuses the plan too
    assert step.runs == 1

    out, fresh = m(x)
    assert step.runs == 1
    new, keys = lane_keys(jax.random.PRNGKey(0), B)

    @jax.jit
    @jax.vmap
    def oracle(h, x, k):
        h = h * w.value + x + normal_draw(k, (2,))
        return h.sum(), h

    want_out, want_h = oracle(arr(B, 2), x, keys)
    assert_tree_allclose((out, h.value), (want_out, want_h))
    assert_tree_allclose(fresh.value, x * 3)
    assert_tree_allclose(total.value, x.sum())
    assert_tree_allclose(acc.value, x)
    assert_keys_equal(rng.value, new)


def test_explain_does_not_run_the_program():
    ran = []
    w = statemap.ParamState(arr(2), name="w")

    def step(x):
        jax.debug.callback(lambda v: ran.append(np.asarray(v)), x)
        return x * w.value

    m = statemap.vmap(step)
    m.explain(arr(B, 2))
    assert ran == []
    assert_tree_allclose(m(arr(B, 2)), arr(B, 2) * arr(2))
    assert len(ran) >= 1


def test_explain_shows_a_refusal_without_raising():
    s = statemap.LongTermState(jnp.zeros(2), name="running")
    saved = snapshot([s])
    m = statemap.vmap(batched_write(s))
    text = str(m.explain(arr(B, 2)))
    assert "refused" in line_of(text, "LongTermState 'running'")
    assert "state_out_axes={0: <filter>}" in text
    assert_unchanged(saved)
    with pytest.raises(statemap.BatchAxisError, match=r"LongTermState 'running'"):
        m(arr(B, 2))
    assert_unchanged(saved)


def test_explain_shows_a_warning_without_warning():
    s = statemap.LongTermState(jnp.zeros(2), name="running")
    fn = counted(batched_write(s))
    m = statemap.vmap(fn, unexpected_out_state_mapping="warn")
    text = str(m.explain(arr(B, 2)))  # filterwarnings=error: explain itself must not warn
    assert "stacked on axis 0" in line_of(text, "LongTermState 'running'")
    assert "warning:" in text and "'warn'" in text
    with pytest.warns(UserWarning, match=r"LongTermState 'running'"):
        m(arr(B, 2))
    assert fn.runs == 1


def test_explain_names_axis_size_and_state_sources():
    out = str(statemap.vmap(lambda: jnp.zeros(()), axis_size=4).explain())
    assert "4 lanes (axis size from `axis_size`)" in out.splitlines()[0]
    h = statemap.HiddenState(arr(2, 5), name="h")
    text = str(statemap.vmap(lambda: h.value, state_in_axes={-1: h}).explain())
    assert "5 lanes" in text.splitlines()[0] and "HiddenState 'h'" in text.splitlines()[0]
    assert "split on axis -1" in line_of(text, "HiddenState 'h' (2, 5)")


def test_explain_raises_what_the_call_would():
    with pytest.raises(ValueError, match=r"inconsistent sizes"):
        statemap.vmap(lambda x, y: x + y).explain(arr(B), arr(B + 1))


# All-or-nothing


class Boom(Exception):
    pass


def test_user_error_leaves_every_state_unchanged():
    h = statemap.HiddenState(arr(B, 2), name="h")
    w = statemap.ParamState(arr(2), name="w")
    rng = statemap.RandomState(0, name="rng")
    typed_rng = statemap.RandomState(jax.random.key(1), name="typed")
    made = []
    saved = snapshot([h, w, rng, typed_rng])

    def step(x):
        h.value = h.value + x + rng.normal((2,)) + typed_rng.uniform((2,))
        w.value = w.value * 2
        made.append(statemap.ParamState(x))
        raise Boom("user code failed")

    m = statemap.vmap(step, state_in_axes={0: statemap.HiddenState})
    with pytest.raises(Boom, match="user code failed"):
        m(arr(B, 2))
    assert_unchanged(saved)
    assert_concrete(made)
    # The mapping and the states still work afterwards.
    with pytest.raises(Boom):
        m(arr(B, 2))
    assert_unchanged(saved)
    out = statemap.vmap(lambda x: x * w.value)(arr(B, 2))
    assert_tree_allclose(out, arr(B, 2) * arr(2))


def test_user_error_inside_nested_jit_leaves_states_unchanged():
    h = statemap.HiddenState(arr(B, 2), name="h")
    rng = statemap.RandomState(0)
    saved = snapshot([h, rng])

    @jax.jit
    def inner(x):
        _ = (x, h.value, rng.value)  # reads: writes inside a raw jax.jit are refused
        raise Boom("inside jit")

    def step(x):
        h.value = h.value + x + rng.normal((2,))
        return inner(x)

    with pytest.raises(Boom, match="inside jit"):
        statemap.vmap(step, state_in_axes={0: statemap.HiddenState})(arr(B, 2))
    assert_unchanged(saved)


def test_error_on_a_retrace_for_new_state_shapes_leaves_states_unchanged():
    h = statemap.HiddenState(arr(B, 2), name="h")
    rng = statemap.RandomState(0)

    def step(x):
        if h.value.shape[-1] != 2:
            raise Boom("wrong width")
        h.value = h.value + x + rng.normal((2,))
        return x

    m = statemap.vmap(step, state_in_axes={0: statemap.HiddenState})
    m(arr(B, 2))
    h.value = arr(B, 4)
    saved = snapshot([h, rng])
    with pytest.raises(Boom, match="wrong width"):
        m(arr(B, 2))
    assert_unchanged(saved)


def test_policy_error_leaves_every_state_unchanged():
    h = statemap.HiddenState(arr(B, 2), name="h")
    rng = statemap.RandomState(0)
    s = statemap.LongTermState(jnp.zeros(2), name="running")
    saved = snapshot([h, rng, s])

    def step(x):
        h.value = h.value + rng.normal((2,))
        s.value = s.value + x
        return x

    m = statemap.vmap(step, state_in_axes={0: statemap.HiddenState})
    for _ in range(2):
        with pytest.raises(statemap.BatchAxisError, match=r"LongTermState 'running'"):
            m(arr(B, 2))
        assert_unchanged(saved)


def test_size_mismatch_lists_every_source_and_leaves_states_unchanged():
    h = statemap.HiddenState(arr(4, 2), name="h")
    rng = statemap.RandomState(0)
    saved = snapshot([h, rng])

    def step(x, y):
        h.value = h.value + x + rng.normal((2,))
        return y

    m = statemap.vmap(step, state_in_axes={0: statemap.HiddenState})
    with pytest.raises(ValueError, match=r"inconsistent sizes") as info:
        m(arr(B, 2), {"k": arr(B)})
    message = str(info.value)
    assert "* argument args[0] has axis 0 of size 3 (shape (3, 2), dtype float32)" in message
    assert "* argument args[1]['k'] has axis 0 of size 3 (shape (3,), dtype float32)" in message
    state_line = line_of(message, "  * HiddenState 'h'")
    assert state_line.endswith("has axis 0 of size 4 (shape (4, 2), dtype float32)")
    assert message.startswith("statemap.vmap")
    assert_unchanged(saved)


def test_size_mismatch_between_arguments_names_both():
    with pytest.raises(ValueError, match=r"(?s)argument args\[0\].*size 3.*argument kwargs\['y'\].*size 5"):
        statemap.vmap(lambda x, y: x)(arr(B), y=arr(5))


def test_state_trace_around_a_call_sees_its_touches_and_can_undo_it():
    h = statemap.HiddenState(arr(B, 2), name="h")
    w = statemap.ParamState(arr(2), name="w")
    rng = statemap.RandomState(0)
    m = statemap.vmap(lambda x: _write(h, h.value * w.value + x + rng.normal()), state_in_axes=h)
    saved = snapshot([h, w, rng])
    for _ in range(2):  # cold and warm
        with statemap.StateTrace() as trace:
            m(arr(B))
        assert set(trace.states) == {h, w, rng}
        assert set(trace.written) == {h, rng}
        assert_concrete([h, w, rng])
        trace.restore()
        assert_unchanged(saved)


def test_other_threads_never_see_a_tracer_while_the_function_is_traced():
    h = statemap.HiddenState(arr(B, 2), name="h")
    before = h.value
    tracing, seen = threading.Event(), []

    def reader():
        assert tracing.wait(10)
        seen.append(h.value)

    def step(x):
        h.value = h.value + x
        tracing.set()
        thread.join(10)
        return x

    thread = threading.Thread(target=reader)
    thread.start()
    statemap.vmap(step, state_in_axes=h)(arr(B, 2))
    assert seen == [before]
    assert_tree_allclose(h.value, arr(B, 2) * 2)


# Traced once, compiled, current values


def test_traced_once_across_warm_calls_and_values_follow_the_states():
    h = statemap.HiddenState(arr(B, 2), name="h")
    w = statemap.ParamState(arr(2), name="w")
    rng = statemap.RandomState(0)

    @counted
    def step(x):
        h.value = h.value * w.value + x + rng.uniform((2,))
        return h.value.sum()

    m = statemap.vmap(step, state_in_axes={0: statemap.HiddenState})

    @jax.jit
    def oracle(h, w, x, key):
        new_key, keys = lane_keys(key, B)
        new_h = jax.vmap(lambda h, x, k: h * w + x + jax.random.uniform(jax.random.split(k)[1], (2,)))(h, x, keys)
        return new_h.sum(axis=1), new_h, new_key

    hv, key = arr(B, 2), jax.random.PRNGKey(0)
    for i in range(4):
        x = arr(B, 2, start=i)
        if i == 2:
            w.value = arr(2, start=5)  # a new value, same shape: no retrace
        if i == 3:
            h.value = hv = arr(B, 2, start=-3)
        want_out, hv, key = oracle(hv, w.value, x, key)
        out = m(x)
        assert_tree_allclose((out, h.value), (want_out, hv), rtol=1e-5)
        assert_keys_equal(rng.value, key)
    assert step.runs == 1


def test_state_shape_or_dtype_change_retraces_with_correct_results():
    h = statemap.HiddenState(arr(B, 2), name="h")
    fn = counted(lambda x: _write(h, h.value + x))
    m = statemap.vmap(fn, state_in_axes=h)
    x = arr(B)
    m(x)
    assert fn.runs == 1
    h.value = arr(B, 5)
    out = m(x)
    assert fn.runs == 2
    assert_tree_allclose(out, (arr(B, 5) + x[:, None]).sum(axis=1))
    assert_tree_allclose(h.value, arr(B, 5) + x[:, None])
    assert_concrete([h])
    m(x)
    assert fn.runs == 2
    h.value = arr(B, 5).astype(jnp.float16)
    out = m(x)
    assert fn.runs == 3
    assert h.value.dtype == jnp.float32  # x is float32, so h + x promotes
    assert_tree_allclose(h.value, arr(B, 5).astype(jnp.float16).astype(jnp.float32) + x[:, None], rtol=1e-3)


def test_returning_to_an_earlier_state_shape_reuses_its_plan():
    h = statemap.HiddenState(arr(B, 2), name="h")
    fn = counted(lambda x: _write(h, h.value + x))
    m = statemap.vmap(fn, state_in_axes=h)
    x = arr(B)
    m(x)
    h.value = arr(B, 5)
    m(x)
    assert fn.runs == 2
    h.value = arr(B, 2)
    m(x)
    assert_tree_allclose(h.value, arr(B, 2) + x[:, None])
    h.value = arr(B, 5)
    m(x)
    assert_tree_allclose(h.value, arr(B, 5) + x[:, None])
    assert fn.runs == 2


def test_new_argument_shapes_and_dtypes_retrace():
    w = statemap.ParamState(jnp.float32(2.0))
    fn = counted(lambda x: x * w.value)
    m = statemap.vmap(fn)
    m(arr(B))
    m(arr(B, start=1))
    assert fn.runs == 1
    assert_tree_allclose(m(arr(B + 1)), arr(B + 1) * 2)
    assert fn.runs == 2
    assert_tree_allclose(m(arr(B, 2)), arr(B, 2) * 2)
    assert fn.runs == 3
    out = m(jnp.arange(B, dtype=jnp.int32))
    assert fn.runs == 4
    np.testing.assert_array_equal(out, np.arange(B) * 2.0)
    m(arr(B))
    assert fn.runs == 4


def test_nested_jit_reads_see_current_values():
    w = statemap.ParamState(jnp.float32(2.0), name="w")
    fn = counted(lambda x: jax.jit(lambda x: x * w.value)(x))
    m = statemap.vmap(fn)
    x = arr(B)
    assert_tree_allclose(m(x), x * 2)
    w.value = jnp.float32(5.0)
    assert_tree_allclose(m(x), x * 5)
    assert fn.runs == 1


def test_shared_jitted_helper_reading_a_state_in_two_mappings():
    w = statemap.ParamState(jnp.float32(2.0), name="w")

    @jax.jit
    def scale(x):
        return x * w.value

    m1 = statemap.vmap(lambda x: scale(x))
    m2 = statemap.vmap(lambda x: scale(x) + 1)
    assert_tree_allclose(m1(arr(B)), arr(B) * 2)
    w.value = jnp.float32(3.0)
    assert_tree_allclose(m2(arr(B)), arr(B) * 3 + 1)
    assert_tree_allclose(m1(arr(B)), arr(B) * 3)
    assert_tree_allclose(m1(arr(B + 1)), arr(B + 1) * 3)


def test_grad_inside_the_mapped_function_reads_current_values():
    w = statemap.ParamState(arr(2, start=1), name="w")
    fn = counted(lambda x: jax.grad(lambda x: jnp.sum(jnp.sin(x) * w.value))(x))
    m = statemap.vmap(fn)
    x = arr(B, 2)
    assert_tree_allclose(m(x), jnp.cos(x) * arr(2, start=1))
    w.value = arr(2, start=4)
    assert_tree_allclose(m(x), jnp.cos(x) * arr(2, start=4))
    assert fn.runs == 1


def test_grad_of_a_state_value_per_lane():
    w = statemap.ParamState(arr(2, start=1), name="w")

    def per_example_grad(x, y):
        return jax.grad(lambda w: (jnp.dot(x, w) - y) ** 2)(w.value)

    x, y = arr(B, 2), arr(B)
    out = statemap.vmap(per_example_grad)(x, y)
    want = jax.vmap(jax.grad(lambda w, x, y: (jnp.dot(x, w) - y) ** 2), in_axes=(None, 0, 0))(arr(2, start=1), x, y)
    assert_tree_allclose(out, want)


def test_scan_inside_reads_current_values():
    w = statemap.ParamState(jnp.float32(0.5), name="w")

    def f(x):
        def body(c, _):
            return c * w.value + 1, c

        return jax.lax.scan(body, x, None, length=3)[0]

    m = statemap.vmap(f)
    x = arr(B)

    def oracle(x, w):
        for _ in range(3):
            x = x * w + 1
        return x

    assert_tree_allclose(m(x), oracle(x, 0.5))
    w.value = jnp.float32(2.0)
    assert_tree_allclose(m(x), oracle(x, 2.0))


# Caches and garbage collection


def test_a_mapping_and_its_states_can_be_garbage_collected():
    def scope():
        s = statemap.ParamState(jnp.float32(2.0))
        m = statemap.vmap(lambda x: x * s.value)
        m(arr(B))
        m.explain(arr(B))
        return weakref.ref(s), weakref.ref(m)

    state_ref, mapping_ref = scope()
    gc.collect()
    assert state_ref() is None
    assert mapping_ref() is None


def test_no_plan_keeps_a_dead_state_alive():
    holder = {}
    fn = counted(lambda x: x * holder["s"].value)
    m = statemap.vmap(fn)
    holder["s"] = statemap.ParamState(jnp.float32(2.0))
    assert_tree_allclose(m(arr(B)), arr(B) * 2)
    ref = weakref.ref(holder["s"])
    del holder["s"]
    gc.collect()
    assert ref() is None
    holder["s"] = statemap.ParamState(jnp.float32(3.0))
    assert_tree_allclose(m(arr(B)), arr(B) * 3)
    assert fn.runs == 2


def test_no_plan_keeps_a_dead_created_state_alive():
    m = statemap.vmap(lambda x: statemap.ParamState(x))
    out = m(arr(B))
    ref = weakref.ref(out)
    del out
    gc.collect()
    assert ref() is None
    assert_tree_allclose(m(arr(B)).value, arr(B))


def test_the_plan_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(statemap.VMapMapping, "plan_capacity", 100)
    fn = counted(lambda x: x)
    m = statemap.vmap(fn)
    # numpy arguments: building 200 jax arrays of new shapes would compile 200 programs.
    with pytest.warns(UserWarning, match=r"more than 100 call signatures.*`statemap\.StatefulTransform\.plan_capacity"):
        for n in range(1, 201):
            m.explain(np.zeros((n,), np.float32))
    assert fn.runs == 200
    m.explain(np.zeros((200,), np.float32))  # the newest signature is kept
    assert fn.runs == 200
    m.explain(np.zeros((1,), np.float32))  # the oldest was evicted
    assert fn.runs == 201


# Errors


def test_in_axes_with_the_wrong_number_of_entries():
    with pytest.raises(ValueError, match=r"statemap\.vmap: `in_axes` has 3 entries but the function was called with 2"):
        statemap.vmap(lambda a, b: a, in_axes=(0, 0, 0))(arr(B), arr(B))


def test_in_axes_that_is_not_a_prefix():
    with pytest.raises(ValueError, match=r"statemap\.vmap: `in_axes` .* is not a pytree prefix of the positional arguments"):
        statemap.vmap(lambda p: p["a"], in_axes=({"a": 0, "c": 0},))({"a": arr(B), "b": arr(B)})


@pytest.mark.parametrize("bad", [1.5, "0", (0, "x"), {"a": 0.0}])
def test_in_axes_and_out_axes_of_the_wrong_type_fail_at_construction(bad):
    with pytest.raises(TypeError, match=r"statemap\.vmap: `in_axes` must be an int, None, or a pytree"):
        statemap.vmap(lambda x: x, in_axes=bad)
    with pytest.raises(TypeError, match=r"statemap\.vmap: `out_axes` must be an int, None, or a pytree"):
        statemap.vmap(lambda x: x, out_axes=bad)


@pytest.mark.parametrize("axis", [2, -3])
def test_in_axes_out_of_range(axis):
    with pytest.raises(ValueError, match=rf"`in_axes` maps argument args\[0\] \(shape \(3, 2\)\) on axis {axis}, which is out of range"):
        statemap.vmap(lambda x: x, in_axes=axis)(arr(B, 2))


def test_in_axes_on_a_scalar_argument():
    with pytest.raises(ValueError, match=r"argument args\[1\]\['s'\] on axis 0, but it is a scalar \(shape \(\)\)"):
        statemap.vmap(lambda x, y: x)(arr(B), {"s": jnp.float32(1.0)})


def test_out_axes_out_of_range():
    with pytest.raises(ValueError, match=r"statemap\.vmap: `out_axes` 3 is out of range"):
        statemap.vmap(lambda x: x, out_axes=3)(arr(B, 2))


@pytest.mark.parametrize(
    "args, kwargs, name",
    [
        ((arr(B), "abc"), {}, r"argument args\[1\] is a str"),
        (({"a": arr(B), "b": object()},), {}, r"argument args\[0\]\['b'\] is a object"),
        ((arr(B),), {"y": "s"}, r"argument kwargs\['y'\] is a str"),
    ],
)
def test_non_array_argument_is_a_type_error_naming_it(args, kwargs, name):
    with pytest.raises(TypeError, match=rf"statemap\.vmap: {name}"):
        statemap.vmap(lambda *a, **k: a[0])(*args, **kwargs)


@pytest.mark.parametrize("axis", [2, -3])
def test_state_split_on_an_out_of_range_axis(axis):
    h = statemap.HiddenState(arr(B, 2), name="h")
    saved = snapshot([h])

    def step(x):
        h.value = h.value + 1
        return x

    with pytest.raises(
        statemap.BatchAxisError,
        match=rf"statemap\.vmap: `state_in_axes` splits HiddenState 'h' \(shape \(3, 2\)\) on axis {axis}, which is out of range",
    ):
        statemap.vmap(step, state_in_axes={axis: h})(arr(B))
    assert_unchanged(saved)


def test_state_stacked_on_an_out_of_range_axis():
    s = statemap.LongTermState(jnp.zeros(2), name="s")
    saved = snapshot([s])
    with pytest.raises(statemap.BatchAxisError, match=r"`state_out_axes` stacks LongTermState 's' \(shape \(2,\)\) on axis 2"):
        statemap.vmap(batched_write(s), state_out_axes={2: s})(arr(B, 2))
    assert_unchanged(saved)


@pytest.mark.parametrize("argname", ["state_in_axes", "state_out_axes"])
@pytest.mark.parametrize("bad", [3.5, {0: 3.5}, {0: [statemap.State, 2.0]}])
def test_bad_filter_fails_at_construction(argname, bad):
    with pytest.raises(TypeError, match=rf"statemap\.vmap: `{argname}` for axis 0: .*(3\.5|2\.0)"):
        statemap.vmap(lambda x: x, **{argname: bad})


@pytest.mark.parametrize("argname", ["state_in_axes", "state_out_axes"])
def test_bad_state_axes_key_fails_at_construction(argname):
    with pytest.raises(TypeError, match=rf"statemap\.vmap: `{argname}` keys must be ints or None, got 'a'"):
        statemap.vmap(lambda x: x, **{argname: {"a": statemap.State}})


def test_fn_must_be_callable():
    with pytest.raises(TypeError, match=r"statemap\.vmap: `fn` must be callable, got int: 3"):
        statemap.vmap(3)


def test_axis_name_must_be_hashable():
    with pytest.raises(TypeError, match=r"statemap\.vmap: `axis_name` must be hashable, got \['i'\]"):
        statemap.vmap(lambda x: x, axis_name=["i"])


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError):
        statemap.vmap(lambda x: x, in_axis=0)


# Forms


def test_decorator_forms_and_aliases():
    w = statemap.ParamState(jnp.float32(2.0))

    @statemap.vmap
    def plain(x):
        """Doc."""
        return x * w.value

    @statemap.vmap(in_axes=1, out_axes=1)
    def configured(x):
        return x * w.value

    assert isinstance(plain, statemap.VMapMapping) and isinstance(configured, statemap.VMapMapping)
    assert isinstance(plain, statemap.StatefulMapping)
    assert plain.__name__ == "plain" and plain.__doc__ == "Doc."
    assert_tree_allclose(plain(arr(B)), arr(B) * 2)
    assert_tree_allclose(configured(arr(2, B)), arr(2, B) * 2)
    assert statemap.vmap2 is statemap.vmap


def test_vmap_mapping_built_directly():
    h = statemap.HiddenState(arr(B, 2), name="h")

    def step(x):
        h.value = h.value + x
        return h.value.sum()

    m = statemap.VMapMapping(step, state_in_axes={0: statemap.HiddenState}, axis_name="i")
    out = m(arr(B, 2))
    assert_tree_allclose(out, (arr(B, 2) * 2).sum(axis=1))
    assert_tree_allclose(h.value, arr(B, 2) * 2)


def test_explain_shows_a_state_holding_a_python_number():
    count = statemap.State(0, name="count")
    text = str(statemap.vmap(lambda x: x + count.value).explain(arr(B)))
    assert "State 'count' ()" in text


@pytest.mark.parametrize(
    "in_axes, args",
    [
        ((0, [{"a": None}], 0), (jnp.arange(3.0), [{"a": jnp.float32(2)}], jnp.ones(3))),
        (([0, None],), ([jnp.arange(3.0), jnp.float32(5)],)),
        (({"x": 0, "y": None},), ({"x": jnp.arange(3.0), "y": jnp.float32(1)},)),
    ],
    ids=["list of dicts", "list", "dict"],
)
def test_in_axes_with_lists_and_dicts_as_in_jax_vmap(in_axes, args):
    def f(*a):
        return sum(jax.tree.leaves(a))

    np.testing.assert_allclose(statemap.vmap(f, in_axes=in_axes)(*args), jax.vmap(f, in_axes=in_axes)(*args))


def test_out_axes_as_a_list():
    f = lambda x: [x, x * 2]  # noqa: E731
    x = jnp.arange(6.0).reshape(2, 3)
    got, want = statemap.vmap(f, out_axes=[0, 1])(x), jax.vmap(f, out_axes=[0, 1])(x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w)


class Ensemble:
    """A model whose forward pass is a ``statemap.vmap`` method, as a ``jax.vmap``-decorated one binds."""

    def __init__(self, scale):
        self.w = statemap.ParamState(jnp.full(3, scale), name="w")

    @functools.partial(statemap.vmap, in_axes=(None, 0), static_argnums=0)
    def apply(self, x):
        return x * self.w.value


def test_a_mapped_method_binds_its_instance():
    a, b = Ensemble(2.0), Ensemble(3.0)
    x = arr(B, 3)
    for _ in range(2):
        assert_tree_allclose(a.apply(x), x * 2.0)
        assert_tree_allclose(b.apply(x), x * 3.0)
    assert isinstance(Ensemble.apply, statemap.VMapMapping)
