"""statemap.scan, for_loop, fori_loop and while_loop, checked against Python loops.

Every oracle runs the same body in a Python loop on fresh states built from
the same seed, or threads the states' values by hand through ``jax.lax``.
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
from statemap.errors import StateTypeError

N = 3
T = 4

# Oracles run compiled: eager jax.random compiles every small op on its own.
lane_keys = jax.jit(_lane_keys, static_argnums=1)


class Unit:
    """A leaky unit: reads a weight, writes a hidden state and a counter, draws noise."""

    def __init__(self, seed=0, typed=False):
        self.rng = statemap.RandomState(jax.random.key(seed) if typed else seed, name="rng")
        self.h = statemap.HiddenState(jnp.zeros(N), name="h")
        self.w = statemap.ParamState(arr(N, start=1), name="w")
        self.count = statemap.ShortTermState(jnp.int32(0), name="count")

    @property
    def states(self):
        return [self.rng, self.h, self.w, self.count]

    def step(self, x):
        noise = self.rng.normal((N,))
        self.h.value = 0.5 * self.h.value + self.w.value * x + noise
        self.count.value = self.count.value + 1
        return noise

    def scan_body(self, carry, x):
        noise = self.step(x)
        return carry + self.h.value.sum(), (noise, self.h.value)


def assert_states_equal(actual, expected):
    """Corresponding states hold the same values (keys bit for bit)."""
    for a, e in zip(actual, expected, strict=True):
        if isinstance(a, statemap.RandomState):
            assert_keys_equal(a.value, e.value)
        else:
            assert_tree_allclose(a.value, e.value, rtol=1e-5, atol=1e-5)


def python_scan(body, init, xs, reverse=False):
    """The Python loop ``statemap.scan`` must equal."""
    carry, ys = init, [None] * len(xs)
    order = range(len(xs) - 1, -1, -1) if reverse else range(len(xs))
    for i in order:
        carry, ys[i] = body(carry, xs[i])
    return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)


def assert_distinct_rows(noise):
    rows = {tuple(np.asarray(r).round(6)) for r in noise}
    assert len(rows) == len(noise), noise


# scan


@pytest.mark.parametrize(
    "kwargs, typed",
    [({}, False), ({"reverse": True, "unroll": 2}, True)],
    ids=["forward", "reverse-unrolled-typed-key"],
)
def test_scan_equals_the_python_loop(kwargs, typed):
    unit, oracle = Unit(0, typed), Unit(0, typed)
    xs = arr(T, N)
    carry, (noise, hs) = statemap.scan(unit.scan_body, jnp.float32(0), xs, **kwargs)
    expected = python_scan(oracle.scan_body, jnp.float32(0), xs, reverse=kwargs.get("reverse", False))
    assert_tree_allclose((carry, (noise, hs)), expected, rtol=1e-5, atol=1e-5)
    assert_states_equal(unit.states, oracle.states)
    assert_distinct_rows(noise)
    assert_tree_allclose(unit.h.value, hs[0] if kwargs.get("reverse") else hs[-1])
    assert int(unit.count.value) == T
    assert_concrete(unit.states)


def test_scan_with_length_and_no_xs():
    rng, eager = statemap.RandomState(2), statemap.RandomState(2)
    total = statemap.State(jnp.float32(0), name="total")

    def body(carry, x):
        assert x is None
        draw = rng.uniform()
        total.value = total.value + draw
        return carry + 1, draw

    n, draws = statemap.scan(body, 0, length=T)
    expected = jnp.stack([eager.uniform() for _ in range(T)])
    assert int(n) == T
    assert_tree_allclose(draws, expected)
    assert_tree_allclose(total.value, expected.sum(), rtol=1e-5)
    assert_keys_equal(rng.value, eager.value)


def test_read_only_states_are_inputs_not_constants():
    unit, oracle = Unit(0), Unit(0)

    @counted
    def run(xs):
        return statemap.scan(unit.scan_body, jnp.float32(0), xs)

    jitted = statemap.jit(run)
    xs = arr(T, N)
    for scale in [1.0, -2.0]:
        unit.w.value = oracle.w.value = jnp.full(N, scale, jnp.float32)
        assert_tree_allclose(jitted(xs), python_scan(oracle.scan_body, jnp.float32(0), xs), rtol=1e-5, atol=1e-5)
        assert_states_equal(unit.states, oracle.states)
    assert run.runs == 1


def test_scan_body_must_return_a_pair():
    with pytest.raises(TypeError, match=r"statemap.scan: the body must return a pair `\(carry, y\)`, got float32\[\]"):
        statemap.scan(lambda c, x: c + x, jnp.float32(0), arr(T))


# for_loop


def test_for_loop_equals_the_python_loop():
    unit, oracle = Unit(3), Unit(3)
    xs, scales = arr(T, N), arr(T, start=1)

    def body(x, scale):
        return scale * unit.step(x)

    ys = statemap.for_loop(body, xs, scales)
    expected = jnp.stack([scales[t] * oracle.step(xs[t]) for t in range(T)])
    assert_tree_allclose(ys, expected, rtol=1e-5, atol=1e-5)
    assert_states_equal(unit.states, oracle.states)
    assert_distinct_rows(ys)


def test_for_loop_with_length_and_no_xs():
    w = statemap.ParamState(jnp.float32(0.5), name="w")
    h = statemap.HiddenState(jnp.float32(1), name="h")

    def step():
        h.value = h.value * w.value + 1
        return h.value

    expected, value = [], 1.0
    for _ in range(T):
        value = value * 0.5 + 1
        expected.append(value)
    assert_tree_allclose(statemap.for_loop(step, length=T), jnp.asarray(expected))
    assert_tree_allclose(h.value, expected[-1])


# fori_loop


def test_fori_loop_equals_the_python_loop():
    unit, oracle = Unit(5), Unit(5)
    trace = statemap.State(jnp.zeros(T + 2), name="trace")
    eager_trace = statemap.State(jnp.zeros(T + 2), name="trace")

    def body(unit, trace, i, acc):
        noise = unit.step(i.astype(jnp.float32))
        trace.value = trace.value.at[i].set(noise.sum())
        return acc + noise

    acc = statemap.fori_loop(2, T + 2, functools.partial(body, unit, trace), jnp.zeros(N))
    expected = jnp.zeros(N)
    for i in range(2, T + 2):
        expected = body(oracle, eager_trace, jnp.int32(i), expected)
    assert_tree_allclose(acc, expected, rtol=1e-5, atol=1e-5)
    assert_tree_allclose(trace.value, eager_trace.value, rtol=1e-5, atol=1e-5)
    assert_states_equal(unit.states, oracle.states)
    assert len(set(np.asarray(trace.value[2:]).round(6))) == T


def test_fori_loop_reads_the_current_value_of_a_read_only_state():
    w = statemap.ParamState(jnp.float32(2), name="w")
    run = statemap.jit(lambda n: statemap.fori_loop(0, 3, lambda i, x: x * w.value + n, jnp.float32(1)))
    assert_tree_allclose(run(jnp.float32(0)), 8.0)
    w.value = jnp.float32(3)
    assert_tree_allclose(run(jnp.float32(0)), 27.0)


# while_loop


def test_while_loop_condition_reads_a_state_the_body_writes():
    rng, eager_rng = statemap.RandomState(6), statemap.RandomState(6)
    total, eager_total = statemap.State(jnp.float32(0), name="total"), statemap.State(jnp.float32(0), name="total")
    limit = statemap.ParamState(jnp.float32(2.0), name="limit")

    def make(rng, total):
        def body(n):
            total.value = total.value + rng.uniform()
            return n + 1

        return (lambda n: total.value < limit.value), body

    n = statemap.while_loop(*make(rng, total), jnp.int32(0))
    cond, body = make(eager_rng, eager_total)
    expected = jnp.int32(0)
    while cond(expected):
        expected = body(expected)
    assert int(n) == int(expected) > 2
    assert_tree_allclose(total.value, eager_total.value)
    assert_keys_equal(rng.value, eager_rng.value)


def test_while_loop_that_never_runs_changes_nothing():
    total = statemap.State(jnp.float32(5), name="total")
    rng = statemap.RandomState(0)

    def body(n):
        total.value = total.value + rng.uniform()
        return n + 1

    saved = snapshot([rng])
    assert int(statemap.while_loop(lambda n: total.value < 1, body, 0)) == 0
    assert_tree_allclose(total.value, 5.0)
    assert_keys_equal(rng.value, saved[0][1])


def test_while_loop_condition_writing_a_state_is_refused():
    flag = statemap.State(jnp.int32(0), name="flag")

    def cond(n):
        flag.value = flag.value + 1
        return n < 3

    saved = snapshot([flag])
    with pytest.raises(
        statemap.StatemapError,
        match=r"statemap.while_loop: `cond_fun` writes State 'flag'.*may only read states\. Write it in `body_fun`",
    ):
        statemap.while_loop(cond, lambda n: n + 1, 0)
    assert_unchanged(saved)


# Bad bodies.


LOOPS = {
    "scan": lambda body: statemap.scan(lambda c, x: (body(c), None), jnp.float32(0), arr(T)),
    "for_loop": lambda body: statemap.for_loop(lambda x: body(x), arr(T)),
    "fori_loop": lambda body: statemap.fori_loop(0, T, lambda i, v: body(v), jnp.float32(0)),
    "while_loop": lambda body: statemap.while_loop(lambda v: v < 3, lambda v: body(v) + 1, jnp.float32(0)),
}


@pytest.mark.parametrize("loop", LOOPS)
def test_body_changing_a_state_shape_is_refused(loop):
    h = statemap.HiddenState(jnp.zeros(N), name="h")
    rng = statemap.RandomState(0)

    def body(v):
        rng.uniform()
        h.value = jnp.concatenate([h.value, h.value[:1]])
        return v

    saved = snapshot([h, rng])
    with pytest.raises(
        StateTypeError,
        match=rf"statemap.{loop}: HiddenState 'h'.*enters as float32\[3\] but leaves as float32\[4\]\. "
        r"A loop body must leave",
    ):
        LOOPS[loop](body)
    assert_unchanged(saved)


@pytest.mark.parametrize("loop", LOOPS)
def test_body_changing_a_state_dtype_is_refused(loop):
    count = statemap.ShortTermState(jnp.int32(0), name="count")

    def body(v):
        count.value = count.value + 0.5
        return v

    message = rf"statemap.{loop}: ShortTermState 'count'.*enters as int32\[\] but leaves as float32\[\]"
    with pytest.raises(StateTypeError, match=message):
        LOOPS[loop](body)
    assert int(count.value) == 0


@pytest.mark.parametrize("loop", LOOPS)
def test_body_changing_a_state_structure_is_refused(loop):
    params = statemap.State({"a": jnp.zeros(N)}, name="params")
    other = statemap.State(jnp.ones(N), name="other")

    def body(v):
        params.value = {"a": params.value["a"] + 1, "b": params.value["a"] * 2}
        other.value = other.value + 1
        return v

    saved = snapshot([params, other])
    with pytest.raises(StateTypeError, match=rf"statemap.{loop}: State 'params'"):
        LOOPS[loop](body)
    assert_unchanged(saved)


@pytest.mark.parametrize("loop", LOOPS)
def test_body_creating_a_state_is_refused(loop):
    made = []

    def body(v):
        made.append(statemap.State(v, name="inner"))
        return v

    message = rf"statemap.{loop}: the body creates or returns State 'inner'.*Create the state outside"
    with pytest.raises(TypeError, match=message):
        LOOPS[loop](body)
    assert_concrete(made)


def test_body_returning_a_state_is_refused():
    outer = statemap.State(jnp.zeros(()), name="outer")
    with pytest.raises(TypeError, match=r"statemap.scan: the body creates or returns State 'outer'"):
        statemap.scan(lambda c, x: (c, outer), jnp.float32(0), arr(T))
    with pytest.raises(TypeError, match=r"statemap.fori_loop: the body creates or returns State 'outer'"):
        statemap.fori_loop(0, 2, lambda i, v: outer, jnp.float32(0))


def test_a_body_that_raises_changes_nothing():
    unit = Unit(0)

    def body(c, x):
        unit.step(x)
        raise ValueError("boom in the body")

    saved = snapshot(unit.states)
    with pytest.raises(ValueError, match="boom in the body"):
        statemap.scan(body, jnp.float32(0), arr(T, N))
    assert_unchanged(saved)


# Nesting.


def test_nested_loops_equal_nested_python_loops():
    unit, oracle = Unit(7), Unit(7)

    def outer(u, fori, carry, x):
        inner = fori(0, 2, lambda i, acc: acc + u.step(x).sum(), jnp.float32(0))
        return carry + inner, u.h.value

    def python_fori(lower, upper, body, init):
        for i in range(lower, upper):
            init = body(i, init)
        return init

    xs = arr(T, N)
    body = functools.partial(outer, unit, statemap.fori_loop)
    got = statemap.jit(lambda xs: statemap.scan(body, jnp.float32(0), xs))(xs)
    expected = python_scan(functools.partial(outer, oracle, python_fori), jnp.float32(0), xs)
    assert_tree_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert_states_equal(unit.states, oracle.states)
    assert int(unit.count.value) == 2 * T


class LIFEnsemble:
    """Members of noisy leaky integrate-and-fire neurons, one vmapped step."""

    def __init__(self, members, neurons, seed):
        self.v = statemap.HiddenState(jnp.zeros((members, neurons)), name="v")
        self.spikes = statemap.HiddenState(jnp.zeros((members, neurons)), name="spikes")
        self.tau = statemap.ParamState(jnp.float32(5.0), name="tau")
        self.rng = statemap.RandomState(seed, name="noise")
        self.step = statemap.vmap(self._step, in_axes=None, state_in_axes=statemap.HiddenState)

    @property
    def states(self):
        return [self.v, self.spikes, self.tau, self.rng]

    def _step(self, current):
        noise = self.rng.normal(self.v.value.shape)
        v = self.v.value + (current - self.v.value) / self.tau.value + 0.3 * noise
        fired = v > 1.0
        self.v.value = jnp.where(fired, 0.0, v)
        self.spikes.value = self.spikes.value + fired
        return fired.sum()


def test_jit_for_loop_vmap_of_a_lif_ensemble_equals_warm_python_calls():
    members, neurons, steps = 3, 5, 6
    net, oracle = LIFEnsemble(members, neurons, 8), LIFEnsemble(members, neurons, 8)
    currents = jnp.linspace(0.5, 2.0, steps, dtype=jnp.float32)
    simulate = statemap.jit(lambda ts: statemap.for_loop(net.step, ts))
    for _ in range(2):  # the second run starts from where the first left off
        counts = simulate(currents)
        expected = jnp.stack([oracle.step(currents[t]) for t in range(steps)])
        np.testing.assert_array_equal(counts, expected)
        assert_states_equal(net.states, oracle.states)
    assert counts.shape == (steps, members)
    assert float(net.spikes.value.sum()) > 0


def test_scan_inside_a_vmap_lane_equals_vmap_of_lax_scan():
    members = 3
    rng = statemap.RandomState(9, name="rng")
    h = statemap.HiddenState(arr(members, N), name="h")
    w = statemap.ParamState(arr(N, start=2), name="w")

    def body(carry, x):
        h.value = jnp.tanh(h.value * w.value + x + rng.normal((N,)))
        return carry + h.value.sum(), h.value

    run = statemap.vmap(lambda xs: statemap.scan(body, jnp.float32(0), xs), state_in_axes=statemap.HiddenState)

    def pure_lane(key, h0, xs):
        def step(state, x):
            key, hv, carry = state
            key, k = jax.random.split(key)
            hv = jnp.tanh(hv * w.value + x + jax.random.normal(k, (N,)))
            return (key, hv, carry + hv.sum()), hv

        (_, hv, carry), hs = jax.lax.scan(step, (key, h0, jnp.float32(0)), xs)
        return (carry, hs), hv

    oracle = jax.jit(jax.vmap(pure_lane))
    xs = arr(members, T, N)
    parent, pure_h = rng.value, h.value
    for _ in range(2):
        out = run(xs)
        parent, keys = lane_keys(parent, members)
        expected, pure_h = oracle(keys, pure_h, xs)
        assert_tree_allclose(out, expected, rtol=1e-5, atol=1e-5)
        assert_tree_allclose(h.value, pure_h, rtol=1e-5, atol=1e-5)
        assert_keys_equal(rng.value, parent)
        assert len({tuple(np.asarray(hs[0]).round(6)) for hs in out[1]}) == members


def test_a_state_created_inside_jit_is_written_by_a_loop_there():
    def program(x):
        acc = statemap.State(jnp.zeros(N), name="acc")
        statemap.for_loop(lambda xt: setattr(acc, "value", acc.value * 0.5 + xt), x)
        return acc

    xs = arr(T, N)
    expected = jnp.zeros(N)
    for t in range(T):
        expected = expected * 0.5 + xs[t]
    jitted = statemap.jit(program)
    for _ in range(2):
        acc = jitted(xs)
        assert isinstance(acc, statemap.State)
        assert_tree_allclose(acc.value, expected, rtol=1e-5)


def test_statemap_jit_inside_a_loop_body():
    unit, oracle = Unit(10), Unit(10)
    step = statemap.jit(unit.step)
    xs = arr(T, N)
    ys = statemap.for_loop(step, xs)
    assert_tree_allclose(ys, jnp.stack([oracle.step(xs[t]) for t in range(T)]), rtol=1e-5, atol=1e-5)
    assert_states_equal(unit.states, oracle.states)


def test_fori_loop_with_a_traced_bound_inside_jit():
    unit, oracle = Unit(11), Unit(11)

    @counted
    def run(n):
        return statemap.fori_loop(0, n, lambda i, acc: acc + unit.step(jnp.ones(N)), jnp.zeros(N))

    jitted = statemap.jit(run)
    for n in [2, 3]:
        expected = jnp.zeros(N)
        for _ in range(n):
            expected = expected + oracle.step(jnp.ones(N))
        assert_tree_allclose(jitted(jnp.int32(n)), expected, rtol=1e-5, atol=1e-5)
        assert_states_equal(unit.states, oracle.states)
    assert run.runs == 1


def test_while_loop_with_a_per_lane_condition_inside_vmap():
    total = statemap.HiddenState(jnp.zeros(3), name="total")
    limits = jnp.asarray([0.5, 1.5, 3.0], jnp.float32)

    def lane(limit, step):
        def body(n):
            total.value = total.value + step
            return n + 1

        return statemap.while_loop(lambda n: total.value < limit, body, jnp.int32(0))

    steps = jnp.asarray([0.25, 0.5, 1.0], jnp.float32)
    counts = statemap.vmap(lane, state_in_axes=statemap.HiddenState)(limits, steps)
    expected_counts, expected_totals = [], []
    for limit, step in zip(limits.tolist(), steps.tolist()):
        n, t = 0, 0.0
        while t < limit:
            t, n = t + step, n + 1
        expected_counts.append(n)
        expected_totals.append(t)
    np.testing.assert_array_equal(counts, expected_counts)
    assert_tree_allclose(total.value, jnp.asarray(expected_totals, jnp.float32))


def test_a_weakly_typed_state_in_a_loop():
    h, eager = statemap.State(jnp.full(N, 1.0), name="h"), statemap.State(jnp.full(N, 1.0), name="h")

    def body(state, x):
        state.value = state.value * 0.5 + x
        return state.value

    ys = statemap.for_loop(functools.partial(body, h), arr(T))
    expected = jnp.stack([body(eager, arr(T)[t]) for t in range(T)])
    assert_tree_allclose(ys, expected)
    assert_tree_allclose(h.value, eager.value)
    assert h.value.dtype == jnp.float32


def test_for_loop_over_a_pytree_of_xs():
    seen = statemap.State(jnp.zeros(()), name="seen")

    def body(x):
        seen.value = seen.value + x["a"].sum() * x["b"]
        return seen.value

    xs = {"a": arr(T, N), "b": arr(T, start=1)}
    ys = statemap.for_loop(body, xs)
    total, expected = jnp.float32(0), []
    for t in range(T):
        total = total + xs["a"][t].sum() * xs["b"][t]
        expected.append(total)
    assert_tree_allclose(ys, jnp.stack(expected), rtol=1e-5)


@pytest.mark.parametrize("start", [0, 0.0], ids=["int", "float"])
def test_a_state_holding_a_python_scalar_in_a_loop(start):
    count, eager = statemap.State(start, name="count"), statemap.State(start, name="count")

    def body(state, x):
        state.value = state.value + 1
        return x

    statemap.for_loop(functools.partial(body, count), arr(T))
    for t in range(T):
        body(eager, arr(T)[t])
    assert_tree_allclose(count.value, eager.value)


WEAK_LOOPS = {
    "for_loop": lambda body: statemap.for_loop(lambda x: body(), jnp.arange(3)),
    "scan": lambda body: statemap.scan(lambda c, x: (body(), None), 0, jnp.arange(3)),
    "fori_loop": lambda body: statemap.fori_loop(0, 3, lambda i, v: (body(), v)[1], 0),
    "while_loop": lambda body: statemap.while_loop(lambda n: n < 3, lambda n: (body(), n + 1)[1], 0),
}


@pytest.mark.parametrize("loop", list(WEAK_LOOPS))
def test_a_state_the_body_keeps_weakly_typed_leaves_weakly_typed(loop):
    """As the Python loop: a weakly typed scalar decayed by Python numbers stays weak, and promotes as one."""
    decay, eager = statemap.State(jnp.asarray(1.0), name="decay"), statemap.State(jnp.asarray(1.0), name="decay")

    def body(state):
        state.value = state.value * 0.5
        return state.value

    WEAK_LOOPS[loop](lambda: body(decay))
    for _ in range(3):
        body(eager)
    assert decay.value.weak_type and eager.value.weak_type
    assert_tree_allclose(decay.value, eager.value)
    assert (jnp.ones(2, jnp.bfloat16) * decay.value).dtype == jnp.bfloat16


@pytest.mark.parametrize("loop", list(WEAK_LOOPS))
def test_a_weakly_typed_state_the_body_makes_strong_leaves_strong(loop):
    level = statemap.State(1.0, name="level")

    def body():
        level.value = level.value + jnp.float32(1)
        return level.value

    WEAK_LOOPS[loop](body)
    assert not level.value.weak_type and level.value.dtype == jnp.float32
    assert_tree_allclose(level.value, 4.0)
