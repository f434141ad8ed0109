"""statemap.cond and statemap.switch, checked against the same Python ``if`` run eagerly.

Every oracle runs the same branch functions on fresh states built from the
same seeds, choosing the branch with a Python ``if`` (or list index) on the
concrete predicate.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import arr, counted
from helpers import assert_concrete, assert_keys_equal, assert_tree_allclose, assert_unchanged, snapshot

import statemap
from statemap.errors import StateTypeError


class Model:
    """States the branches share: one each writes, one only the true branch writes, a key only it draws from."""

    def __init__(self, seed=0, typed=False):
        self.rng = statemap.RandomState(jax.random.key(seed) if typed else seed, name="rng")
        self.acc = statemap.State(jnp.zeros(3), name="acc")
        self.hits = statemap.ShortTermState(jnp.int32(0), name="hits")
        self.scale = statemap.ParamState(jnp.float32(2.0), name="scale")

    @property
    def states(self):
        return [self.rng, self.acc, self.hits, self.scale]

    def noisy(self, x):
        """Writes acc and hits, draws from rng."""
        self.acc.value = self.acc.value + self.scale.value * x + self.rng.normal((3,))
        self.hits.value = self.hits.value + 1
        return self.acc.value.sum()

    def quiet(self, x):
        """Writes acc only, reads scale, draws nothing."""
        self.acc.value = self.acc.value - x
        return (self.scale.value * x).sum()

    def idle(self, x):
        """Touches no state."""
        return -x.sum()


def assert_states_equal(actual, expected):
    """Corresponding states hold the same values (keys bit for bit)."""
    for a, e in zip(actual, expected, strict=True):
        if isinstance(a, statemap.RandomState):
            assert_keys_equal(a.value, e.value)
        else:
            assert_tree_allclose(a.value, e.value)


# cond equals the Python if.


@pytest.mark.parametrize(
    ("preds", "typed"),
    [((True,), False), ((False,), False), ((False, True, True, False), False), ((True, False, True), True)],
    ids=["true", "false", "sequence", "sequence-typed-key"],
)
def test_cond_equals_python_if(preds, typed):
    model, eager = Model(typed=typed), Model(typed=typed)
    for t, pred in enumerate(preds):
        x = arr(3, start=t)
        out = statemap.cond(jnp.asarray(pred), model.noisy, model.quiet, x)
        expected = eager.noisy(x) if pred else eager.quiet(x)
        assert_tree_allclose(out, expected)
        assert_states_equal(model.states, eager.states)
    assert int(model.hits.value) == sum(preds)
    assert_concrete(model.states)


def test_state_written_in_one_branch_keeps_its_value_on_the_other():
    model = Model()
    before = snapshot([model.rng, model.hits])
    out = statemap.cond(False, model.noisy, model.idle, arr(3))
    assert_tree_allclose(out, -arr(3).sum())
    assert_keys_equal(model.rng.value, before[0][1])
    assert int(model.hits.value) == 0
    assert_tree_allclose(model.acc.value, jnp.zeros(3))


def test_random_state_advances_only_when_its_branch_is_taken():
    rng, eager = statemap.RandomState(7), statemap.RandomState(7)
    draws = []
    for pred in [False, True, False, True, True]:
        out = statemap.cond(pred, lambda: rng.uniform((2,)), lambda: jnp.full((2,), -1.0))
        expected = eager.uniform((2,)) if pred else jnp.full((2,), -1.0)
        assert_tree_allclose(out, expected)
        assert_keys_equal(rng.value, eager.value)
        draws.append(out)
    # Three draws, each with a fresh key.
    taken = [d for d in draws if d[0] >= 0]
    assert len({tuple(np.asarray(d).tolist()) for d in taken}) == 3


def test_both_branches_draw_different_amounts():
    rng, eager = statemap.RandomState(1), statemap.RandomState(1)

    def once(r):
        return r.normal()

    def twice(r):
        return r.normal() + r.normal()

    for pred in [True, False, False, True]:
        out = statemap.cond(pred, lambda: once(rng), lambda: twice(rng))
        assert_tree_allclose(out, once(eager) if pred else twice(eager))
        assert_keys_equal(rng.value, eager.value)


def test_operands_are_pytrees_and_outputs_are_pytrees():
    total = statemap.State({"s": jnp.zeros(()), "n": jnp.int32(0)}, name="total")

    def add(ops):
        total.value = {"s": total.value["s"] + ops["x"].sum(), "n": total.value["n"] + 1}
        return {"y": ops["x"] * 2, "n": total.value["n"]}

    def skip(ops):
        return {"y": ops["x"], "n": total.value["n"]}

    ops = {"x": arr(2)}
    out = statemap.cond(True, add, skip, ops)
    assert_tree_allclose(out, {"y": arr(2) * 2, "n": jnp.int32(1)})
    out = statemap.cond(False, add, skip, ops)
    assert_tree_allclose(out, {"y": arr(2), "n": jnp.int32(1)})
    assert_tree_allclose(total.value, {"s": arr(2).sum(), "n": jnp.int32(1)})


def test_several_operands():
    acc = statemap.State(jnp.zeros(2), name="acc")

    def put(a, b):
        acc.value = a * b
        return a + b

    out = statemap.cond(True, put, lambda a, b: a - b, arr(2), arr(2, start=1))
    assert_tree_allclose(out, arr(2) + arr(2, start=1))
    assert_tree_allclose(acc.value, arr(2) * arr(2, start=1))


def test_weakly_typed_write_keeps_the_state_dtype():
    level = statemap.State(jnp.float32(3.0), name="level")

    def reset():
        level.value = 0.0  # a weak-typed Python float
        return level.value

    out = statemap.cond(True, reset, lambda: level.value)
    assert_tree_allclose(out, 0.0)
    assert level.value.dtype == jnp.float32
    assert_tree_allclose(level.value, 0.0)


# switch.


@pytest.mark.parametrize("index", [0, 1, 2])
def test_switch_equals_python_indexing(index):
    model, eager = Model(3), Model(3)
    out = statemap.switch(jnp.int32(index), [model.noisy, model.quiet, model.idle], arr(3))
    expected = [eager.noisy, eager.quiet, eager.idle][index](arr(3))
    assert_tree_allclose(out, expected)
    assert_states_equal(model.states, eager.states)


@pytest.mark.parametrize(("index", "taken"), [(-5, 0), (-1, 0), (3, 2), (100, 2)])
def test_switch_clamps_the_index(index, taken):
    model, eager = Model(5), Model(5)
    out = statemap.switch(index, [model.noisy, model.quiet, model.idle], arr(3))
    expected = [eager.noisy, eager.quiet, eager.idle][taken](arr(3))
    assert_tree_allclose(out, expected)
    assert_states_equal(model.states, eager.states)


def test_switch_sequence_of_calls():
    model, eager = Model(2), Model(2)
    branches, oracle = [model.noisy, model.quiet, model.idle], [eager.noisy, eager.quiet, eager.idle]
    for t, index in enumerate([2, 0, 1, 0, 2]):
        x = arr(3, start=t)
        assert_tree_allclose(statemap.switch(index, branches, x), oracle[index](x))
        assert_states_equal(model.states, eager.states)


def test_switch_with_one_branch():
    acc = statemap.State(jnp.zeros(()), name="acc")

    def add(x):
        acc.value = acc.value + x
        return acc.value

    assert_tree_allclose(statemap.switch(4, [add], jnp.float32(2)), 2.0)
    assert_tree_allclose(acc.value, 2.0)


@pytest.mark.parametrize("branches", [[], [1, 2], "ab", [lambda: 0, None]])
def test_switch_rejects_bad_branches(branches):
    with pytest.raises(TypeError, match=r"statemap.switch: `branches` must be a non-empty sequence of callables"):
        statemap.switch(0, branches)


@pytest.mark.parametrize(("true_fn", "false_fn", "name"), [(1, lambda: 0, "true_fn"), (lambda: 0, None, "false_fn")])
def test_cond_rejects_a_branch_that_is_not_callable(true_fn, false_fn, name):
    with pytest.raises(TypeError, match=rf"statemap.cond: `{name}` must be callable"):
        statemap.cond(True, true_fn, false_fn)


# Inside statemap.vmap lanes.


def test_cond_in_vmap_lanes_with_lane_dependent_predicate():
    n = 4
    h = statemap.HiddenState(arr(n, 3), name="h")
    hits = statemap.HiddenState(jnp.zeros(n, jnp.int32), name="hits")
    scale = statemap.ParamState(jnp.float32(3.0), name="scale")

    def bump(x):
        h.value = h.value + scale.value * x
        hits.value = hits.value + 1
        return h.value.sum()

    def decay(x):
        h.value = 0.5 * h.value
        return -x.sum()

    def lane(x):
        return statemap.cond(x.sum() > 0.9, bump, decay, x)

    xs = arr(n, 3, start=-3)
    h0 = h.value
    out = statemap.vmap(lane, state_in_axes=statemap.HiddenState)(xs)
    # Oracle: the same lane, one member at a time, with a Python if.
    expected_out, expected_h, expected_hits = [], [], []
    for i in range(n):
        x, hi = xs[i], h0[i]
        if float(x.sum()) > 0.9:
            hi = hi + 3.0 * x
            expected_out.append(hi.sum())
            expected_hits.append(1)
        else:
            hi = 0.5 * hi
            expected_out.append(-x.sum())
            expected_hits.append(0)
        expected_h.append(hi)
    assert 0 < sum(expected_hits) < n  # both branches are taken by some lane
    assert_tree_allclose(out, jnp.stack(expected_out))
    assert_tree_allclose(h.value, jnp.stack(expected_h))
    assert_tree_allclose(hits.value, jnp.asarray(expected_hits, jnp.int32))
    assert_tree_allclose(scale.value, 3.0)


def test_cond_in_vmap_lanes_draws_per_lane_keys():
    n = 4
    rng = statemap.RandomState(11, name="rng")
    noise = statemap.HiddenState(jnp.zeros((n, 2)), name="noise")

    def lane(p):
        def draw():
            noise.value = rng.normal((2,))
            return jnp.float32(1)

        return statemap.cond(p, draw, lambda: jnp.float32(0))

    preds = jnp.array([True, False, True, True])
    key0 = rng.value
    out = statemap.vmap(lane, state_in_axes=statemap.HiddenState)(preds)
    assert_tree_allclose(out, preds.astype(jnp.float32))
    # Lane i uses its own key; the state advances once per mapped call.
    new, base = jax.random.split(key0)
    keys = [jax.random.fold_in(base, i) for i in range(n)]
    expected = jnp.stack(
        [jax.random.normal(jax.random.split(k)[1], (2,)) if bool(p) else jnp.zeros(2) for k, p in zip(keys, preds)]
    )
    assert_tree_allclose(noise.value, expected)
    assert_keys_equal(rng.value, new)
    drawn = np.asarray(noise.value)[np.asarray(preds)]
    assert len({tuple(row) for row in drawn.tolist()}) == 3


def test_cond_writing_a_broadcast_state_with_lane_dependent_predicate_is_refused():
    total = statemap.State(jnp.zeros(()), name="total")
    before = snapshot([total])

    def lane(x):
        def add(x):
            total.value = total.value + 1.0
            return x

        return statemap.cond(x > 0, add, lambda x: x, x)

    with pytest.raises(statemap.BatchAxisError, match=r"State 'total'"):
        statemap.vmap(lane)(jnp.array([1.0, -1.0]))
    assert_unchanged(before)


def test_cond_in_vmap_lane_with_unbatched_predicate_writes_broadcast_state_as_is():
    total = statemap.State(jnp.zeros(()), name="total")

    def lane(x, flag):
        def add(x):
            total.value = total.value + 1.0
            return x * 2

        return statemap.cond(flag, add, lambda x: x, x)

    out = statemap.vmap(lane, in_axes=(0, None))(arr(3), jnp.array(True))
    assert_tree_allclose(out, arr(3) * 2)
    assert_tree_allclose(total.value, 1.0)


def test_switch_in_vmap_lanes():
    n = 5
    h = statemap.HiddenState(arr(n, 2), name="h")
    fns = [lambda v: v + 1, lambda v: v * 2, lambda v: -v]

    def lane(i):
        def make(f):
            def branch():
                h.value = f(h.value)
                return h.value.sum()

            return branch

        return statemap.switch(i, [make(f) for f in fns])

    index = jnp.array([0, 1, 2, 7, -3])
    h0 = h.value
    out = statemap.vmap(lane, state_in_axes=statemap.HiddenState)(index)
    expected = jnp.stack([fns[min(max(int(i), 0), 2)](h0[k]) for k, i in enumerate(index)])
    assert_tree_allclose(h.value, expected)
    assert_tree_allclose(out, expected.sum(axis=1))


# Inside statemap.jit.


def test_cond_inside_jit_equals_eager_with_one_python_run():
    model, eager = Model(4), Model(4)

    @counted
    def step(pred, x):
        y = statemap.cond(pred, model.noisy, model.quiet, x)
        return y + model.hits.value

    jitted = statemap.jit(step)
    for t, pred in enumerate([True, False, False, True, True]):
        x = arr(3, start=t)
        out = jitted(jnp.asarray(pred), x)
        expected = (eager.noisy(x) if pred else eager.quiet(x)) + eager.hits.value
        assert_tree_allclose(out, expected)
        assert_states_equal(model.states, eager.states)
    assert step.runs == 1
    assert_concrete(model.states)


def test_switch_inside_jit_with_computed_index():
    model, eager = Model(6), Model(6)
    jitted = statemap.jit(
        lambda x: statemap.switch(jnp.argmax(x), [model.noisy, model.quiet, model.idle], x)
    )
    for x in [arr(3), -arr(3), jnp.array([0.0, 1.0, 0.5]), arr(3, start=2)]:
        out = jitted(x)
        expected = [eager.noisy, eager.quiet, eager.idle][int(jnp.argmax(x))](x)
        assert_tree_allclose(out, expected)
        assert_states_equal(model.states, eager.states)


def test_cond_inside_jit_inside_vmap_lane():
    n = 3
    h = statemap.HiddenState(arr(n, 2), name="h")

    def lane(x):
        def grow():
            h.value = h.value + x
            return jnp.float32(1)

        return statemap.cond(x.sum() > 0.5, grow, lambda: jnp.float32(0))

    step = statemap.jit(statemap.vmap(lane, state_in_axes=statemap.HiddenState))
    h_eager = np.asarray(h.value)
    for t in range(3):
        xs = arr(n, 2, start=t - 1)
        out = step(xs)
        take = np.asarray(xs).sum(axis=1) > 0.5
        h_eager = h_eager + np.where(take[:, None], np.asarray(xs), 0)
        assert_tree_allclose(out, take.astype(np.float32))
        assert_tree_allclose(h.value, h_eager)


def test_nested_cond():
    a = statemap.State(jnp.zeros(()), name="a")
    b = statemap.State(jnp.zeros(()), name="b")

    def outer(p, q):
        def inner_true():
            a.value = a.value + 1
            return a.value

        def inner_false():
            b.value = b.value + 1
            return b.value

        return statemap.cond(p, lambda: statemap.cond(q, inner_true, inner_false), lambda: -1.0 * jnp.ones(()))

    eager_a = eager_b = 0.0
    for p, q in [(True, True), (True, False), (False, True), (True, True)]:
        out = outer(jnp.asarray(p), jnp.asarray(q))
        if p and q:
            eager_a += 1
            expected = eager_a
        elif p:
            eager_b += 1
            expected = eager_b
        else:
            expected = -1.0
        assert_tree_allclose(out, expected)
        assert_tree_allclose((a.value, b.value), (eager_a, eager_b))


# Errors.


def test_branches_writing_different_shapes_raise_state_type_error():
    acc = statemap.State(jnp.zeros(3), name="acc")
    rng = statemap.RandomState(0)
    before = snapshot([acc, rng])

    def grow():
        rng.normal()
        acc.value = jnp.zeros(4)
        return jnp.float32(0)

    with pytest.raises(StateTypeError, match=r"statemap.cond: State 'acc'.*enters as float32\[3\] but leaves as float32\[4\]"):
        statemap.cond(True, grow, lambda: jnp.float32(1))
    assert_unchanged(before)


def test_branches_writing_different_dtypes_raise_state_type_error():
    hits = statemap.State(jnp.int32(0), name="hits")

    def half():
        hits.value = hits.value * 0.5
        return jnp.float32(0)

    def one():
        hits.value = hits.value + 1
        return jnp.float32(0)

    with pytest.raises(StateTypeError, match=r"statemap.switch: State 'hits'.*enters as int32\[\] but leaves as float32\[\].*Branch 1"):
        statemap.switch(0, [one, half])
    assert int(hits.value) == 0


def test_state_type_error_is_a_type_error_and_statemap_error():
    acc = statemap.State(jnp.zeros(3), name="acc")

    def grow():
        acc.value = jnp.zeros((3, 1))
        return jnp.float32(0)

    with pytest.raises(TypeError, match=r"statemap.cond: State 'acc'") as info:
        statemap.cond(False, lambda: jnp.float32(1), grow)
    assert isinstance(info.value, statemap.StatemapError)


def test_branch_creating_a_state_raises_type_error():
    acc = statemap.State(jnp.zeros(()), name="acc")
    before = snapshot([acc])

    def make():
        acc.value = acc.value + 1
        statemap.State(jnp.ones(2), name="fresh")
        return jnp.float32(0)

    with pytest.raises(TypeError, match=r"statemap.cond: the branch 0 creates or returns State 'fresh'.*Create the state outside"):
        statemap.cond(True, make, lambda: jnp.float32(1))
    assert_unchanged(before)


def test_branch_returning_a_state_raises_type_error():
    acc = statemap.State(jnp.zeros(()), name="acc")

    with pytest.raises(TypeError, match=r"statemap.switch: the branch 1 creates or returns State 'acc'"):
        statemap.switch(0, [lambda: jnp.float32(0), lambda: acc])


def test_branch_outputs_that_differ_raise_jax_type_error():
    with pytest.raises(TypeError, match=r"branch"):
        statemap.cond(True, lambda: jnp.zeros(2), lambda: jnp.zeros(3))


def test_a_branch_that_raises_leaves_every_state_unchanged():
    model = Model()
    before = snapshot(model.states)

    def bad(x):
        model.noisy(x)
        raise RuntimeError("broken branch")

    with pytest.raises(RuntimeError, match="broken branch"):
        statemap.cond(False, model.noisy, bad, arr(3))
    assert_unchanged(before)


def test_cond_inside_jit_that_raises_leaves_every_state_unchanged():
    model = Model()
    before = snapshot(model.states)

    def step(x):
        statemap.cond(True, model.noisy, model.quiet, x)
        raise ValueError("after the branch")

    with pytest.raises(ValueError, match="after the branch"):
        statemap.jit(step)(arr(3))
    assert_unchanged(before)


def test_states_passed_as_operands_are_read_and_written_like_closed_over_ones():
    total = statemap.State(jnp.float32(1.0), name="total")

    def add(s, x):
        s.value = s.value + x
        return s.value * 2

    out = statemap.cond(jnp.array(True), add, lambda s, x: x, total, jnp.float32(2.0))
    np.testing.assert_allclose(out, 6.0)
    np.testing.assert_allclose(total.value, 3.0)
    out = statemap.switch(1, [add, lambda s, x: -x], total, jnp.float32(2.0))
    np.testing.assert_allclose(out, -2.0)
    np.testing.assert_allclose(total.value, 3.0)


@pytest.mark.parametrize("pred", [True, False])
def test_a_state_every_branch_keeps_weakly_typed_stays_weak(pred):
    decay = statemap.State(1.0, name="decay")

    def halve():
        decay.value = decay.value * 0.5
        return 0

    statemap.cond(pred, halve, lambda: 0)
    assert decay.value.weak_type
    assert_tree_allclose(decay.value, 0.5 if pred else 1.0)
    assert (jnp.ones(2, jnp.bfloat16) * decay.value).dtype == jnp.bfloat16


def test_a_state_one_branch_makes_strong_is_strong_after_either():
    """As ``jax.lax.cond``: the branches' results promote to one type."""
    level = statemap.State(1.0, name="level")
    statemap.cond(False, lambda: setattr(level, "value", jnp.float32(2)), lambda: None)
    assert not level.value.weak_type and level.value.dtype == jnp.float32
    assert_tree_allclose(level.value, 1.0)
