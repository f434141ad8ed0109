"""statemap.jit / JitTransform, checked against the same function run eagerly.

Every oracle either runs the Python function without ``statemap.jit`` on
fresh states built from the same seed, or threads the states' values by hand
through ``jax.jit``. Loops over calls with collectives sync every step.
"""

import functools

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import arr, counted
from helpers import (
    assert_concrete,
    assert_keys_equal,
    assert_tree_allclose,
    assert_unchanged,
    lane_keys,
    snapshot,
)

import statemap


class Noisy:
    """A leaky unit with membrane noise and a step counter: reads, writes and draws."""

    def __init__(self, seed, n=3, typed=False):
        key = jax.random.key(seed) if typed else seed
        self.rng = statemap.RandomState(key, name="rng")
        self.v = statemap.HiddenState(jnp.zeros(n), name="v")
        self.tau = statemap.ParamState(jnp.float32(0.5), name="tau")
        self.steps = statemap.ShortTermState(jnp.int32(0), name="steps")

    @property
    def states(self):
        return [self.rng, self.v, self.tau, self.steps]

    def __call__(self, x):
        self.v.value = self.tau.value * self.v.value + x + 0.1 * self.rng.normal(self.v.value.shape)
        self.steps.value = self.steps.value + 1
        return self.v.value.sum(), self.rng.uniform()


@functools.partial(jax.jit, static_argnums=1)
def lane_normals(parent, lanes):
    """The advanced parent, and what each lane's ``RandomState.normal((2,))`` draws."""
    new, keys = lane_keys(parent, lanes)
    return new, jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[1], (2,)))(keys)


def assert_states_equal(actual, expected):
    """Two lists of corresponding states hold the same values (keys bit for bit)."""
    for a, e in zip(actual, expected, strict=True):
        if isinstance(a, statemap.RandomState):
            assert_keys_equal(a.value, e.value)
        else:
            assert_tree_allclose(a.value, e.value)


# Equal to eager.


@pytest.mark.parametrize("typed", [False, True], ids=["legacy-key", "typed-key"])
def test_outputs_and_final_states_equal_eager(typed):
    model, oracle = Noisy(0, typed=typed), Noisy(0, typed=typed)
    step = statemap.jit(model)
    draws = []
    for t in range(3):
        x = arr(3, start=t)
        out = step(x)
        assert_tree_allclose(out, oracle(x))  # the same random numbers as eager
        assert_states_equal(model.states, oracle.states)
        draws.append(float(out[1]))
    assert len(set(draws)) == 3  # a fresh key every call
    assert int(model.steps.value) == 3
    assert_concrete(model.states)


def test_pytree_state():
    params = statemap.ParamState({"w": arr(2, 3), "b": jnp.zeros(3)}, name="params")
    seen = statemap.State(jnp.zeros(()), name="seen")

    def layer(x, scale):
        params.value = {"w": params.value["w"] * scale, "b": params.value["b"] + 1}
        seen.value = seen.value + x.sum()
        return {"y": x @ params.value["w"] + params.value["b"]}

    jitted = statemap.jit(layer)
    y = jitted(arr(2), jnp.float32(2.0))
    expected_w = arr(2, 3) * 2
    assert_tree_allclose(y, {"y": arr(2) @ expected_w + 1})
    assert_tree_allclose(params.value, {"w": expected_w, "b": jnp.ones(3)})
    assert_tree_allclose(seen.value, arr(2).sum())


def test_keyword_arguments_are_passed_whole():
    total = statemap.State(jnp.zeros(3), name="total")

    def f(x, *, y):
        total.value = total.value + y
        return x + y

    jitted = statemap.jit(f)
    assert_tree_allclose(jitted(jnp.ones(3), y=arr(3)), 1 + arr(3))
    assert_tree_allclose(jitted(jnp.ones(3), y=jnp.float32(1)), 2 * jnp.ones(3))
    assert_tree_allclose(total.value, arr(3) + 1)


def mlp_params(seed):
    gen = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(0.5 * gen.standard_normal((3, 4)), jnp.float32),
        "b1": jnp.zeros(4),
        "w2": jnp.asarray(0.5 * gen.standard_normal((4, 1)), jnp.float32),
        "b2": jnp.zeros(1),
    }


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


@jax.jit
def sgd_oracle(params, step, x, y):
    loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)
    return loss, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), step + 1


def test_sgd_step_with_value_and_grad_equals_hand_threaded_jit():
    def make():
        return {k: statemap.ParamState(v, name=k) for k, v in mlp_params(0).items()}, statemap.ShortTermState(
            jnp.int32(0), name="step"
        )

    def train_step(params, step, x, y):
        values = {k: p.value for k, p in params.items()}
        loss, grads = jax.value_and_grad(mlp_loss)(values, x, y)
        for k, p in params.items():
            p.value = p.value - 0.1 * grads[k]
        step.value = step.value + 1
        return loss

    params, step = make()
    body = counted(functools.partial(train_step, params, step))
    jitted = statemap.jit(body)
    pure, pure_step = mlp_params(0), jnp.int32(0)
    x, y = arr(5, 3), arr(5, 1, start=2)
    for _ in range(3):
        loss = jitted(x, y)
        pure_loss, pure, pure_step = sgd_oracle(pure, pure_step, x, y)
        assert_tree_allclose(loss, pure_loss)
        assert_tree_allclose({k: p.value for k, p in params.items()}, pure)
    assert int(step.value) == int(pure_step) == 3
    assert body.runs == 1


# Caching and fresh values.


def test_one_python_run_per_signature():
    total = statemap.State(jnp.zeros(()), name="total")

    @counted
    def add(x):
        total.value = total.value + x.sum()
        return total.value

    jitted = statemap.jit(add)
    for _ in range(3):
        jitted(jnp.ones(3))
    assert add.runs == 1
    assert_tree_allclose(total.value, 9.0)
    jitted(jnp.ones(5))
    assert add.runs == 2
    jitted(jnp.ones(3))
    jitted(jnp.ones(5))
    assert add.runs == 2
    assert_tree_allclose(total.value, 22.0)


def test_a_state_of_a_new_shape_retraces():
    w = statemap.ParamState(jnp.ones(3), name="w")

    @counted
    def f(x):
        return (w.value * x).sum()

    jitted = statemap.jit(f)
    assert_tree_allclose(jitted(jnp.float32(2)), 6.0)
    w.value = jnp.ones(4)
    assert_tree_allclose(jitted(jnp.float32(2)), 8.0)
    assert f.runs == 2


def test_a_state_growing_each_call_matches_eager():
    trail, eager = statemap.State(jnp.zeros(1), name="trail"), statemap.State(jnp.zeros(1), name="trail")

    def grow(state, x):
        state.value = jnp.concatenate([state.value, x[None]])
        return state.value.sum()

    jitted = statemap.jit(functools.partial(grow, trail))
    for t in range(2):
        assert_tree_allclose(jitted(jnp.float32(t + 1)), grow(eager, jnp.float32(t + 1)))
    assert_tree_allclose(trail.value, eager.value)


def test_warm_calls_see_states_changed_between_calls():
    w = statemap.ParamState(arr(3, start=1), name="w")
    acc = statemap.State(jnp.zeros(()), name="acc")

    @counted
    def f(x):
        acc.value = acc.value + (w.value * x).sum()
        return acc.value

    jitted = statemap.jit(f)
    x = jnp.ones(3)
    jitted(x)
    w.value = jnp.full(3, 10.0, jnp.float32)  # a read-only state: an input, never a constant
    acc.value = jnp.float32(100.0)  # a written state, changed from outside
    assert_tree_allclose(jitted(x), 130.0)
    assert_tree_allclose(acc.value, 130.0)
    assert f.runs == 1


@pytest.mark.parametrize("how", ["argnums", "argnames"])
def test_static_training_flag_gives_one_plan_per_value(how):
    rng, eager_rng = statemap.RandomState(1), statemap.RandomState(1)
    w = statemap.ParamState(arr(4, start=1), name="w")

    def dropout(rng, x, training):
        if training:
            keep = rng.bernoulli(x.shape, 0.5)
            return jnp.where(keep, 2.0 * x * w.value, 0.0)
        return x * w.value

    body = counted(functools.partial(dropout, rng))
    kw = {"static_argnums": 1} if how == "argnums" else {"static_argnames": "training"}
    jitted = statemap.jit(body, **kw)
    x = jnp.ones(4)

    def call(flag):
        return jitted(x, flag) if how == "argnums" else jitted(x, training=flag)

    for flag in [True, False, True, False, True]:
        before = rng.value
        assert_tree_allclose(call(flag), dropout(eager_rng, x, flag))
        assert_keys_equal(rng.value, eager_rng.value)
        if not flag:
            assert rng.value is before  # evaluation draws nothing
    assert body.runs == 2


def test_donate_argnums():
    v = statemap.HiddenState(jnp.zeros(3), name="v")

    def f(x):
        v.value = v.value + x
        return 2 * x

    jitted = statemap.jit(f, donate_argnums=0)
    for t in range(2):
        assert_tree_allclose(jitted(arr(3, start=t)), 2 * arr(3, start=t))
    assert_tree_allclose(v.value, arr(3) + arr(3, start=1))


def test_decorator_forms_and_bad_arguments():
    @statemap.jit
    def plain(x):
        return x + 1

    @statemap.jit(static_argnums=1)
    def repeat(x, n):
        return jnp.tile(x, n)

    assert isinstance(plain, statemap.JitTransform)
    assert_tree_allclose(plain(jnp.ones(2)), 2 * jnp.ones(2))
    assert repeat(jnp.ones(2), 3).shape == (6,)
    with pytest.raises(TypeError, match="statemap.jit: `static_argnums` must be an int or a tuple of ints"):
        statemap.jit(lambda x: x, static_argnums="x")
    with pytest.raises(TypeError, match="statemap.jit: `static_argnames` must be a str"):
        statemap.jit(static_argnames=3)
    with pytest.raises(TypeError, match="statemap.jit: `fn` must be callable"):
        statemap.jit(3)


# States created inside.


def test_states_created_inside_are_returned_fresh_each_call():
    @counted
    def make(x):
        return {"state": statemap.ParamState(2 * x, name="made"), "y": x + 1}

    jitted = statemap.jit(make)
    first = jitted(jnp.ones(2))
    second = jitted(3 * jnp.ones(2))
    assert make.runs == 1
    assert isinstance(first["state"], statemap.ParamState) and first["state"].name == "made"
    assert first["state"] is not second["state"]
    assert_tree_allclose(first["state"].value, 2 * jnp.ones(2))
    assert_tree_allclose(second["state"].value, 6 * jnp.ones(2))
    assert_tree_allclose(second["y"], 4 * jnp.ones(2))
    assert_concrete([first["state"], second["state"]])


def test_a_created_state_is_kept_and_usable_by_later_calls():
    rng = statemap.RandomState(2)

    def init(n):
        return statemap.HiddenState(rng.normal((n,)), name="h")

    h = statemap.jit(init, static_argnums=0)(3)
    assert isinstance(h, statemap.HiddenState)
    assert_tree_allclose(h.value, statemap.RandomState(2).normal((3,)))

    def decay():
        h.value = 0.5 * h.value
        return h.value

    expected = h.value
    decayed = statemap.jit(decay)
    for _ in range(2):
        expected = 0.5 * expected
        assert_tree_allclose(decayed(), expected)
    assert_tree_allclose(h.value, expected)


def test_an_ensemble_initialised_by_a_vmap_inside_jit():
    rng, eager_rng = statemap.RandomState(14), statemap.RandomState(14)

    def make(rng):
        return statemap.vmap(lambda: statemap.ParamState(rng.normal((2,)), name="w"), axis_size=3)

    jitted, eager = statemap.jit(make(rng)), make(eager_rng)
    first, second = jitted(), jitted()
    assert first is not second and first.name == "w"
    assert_tree_allclose(first.value, eager().value)
    assert_tree_allclose(second.value, eager().value)
    assert_keys_equal(rng.value, eager_rng.value)


# explain().


def test_explain_shows_states_without_running_or_changing_anything():
    model = Noisy(0)
    body = counted(model)
    jitted = statemap.jit(body)
    saved = snapshot(model.states)
    text = str(jitted.explain(arr(3)))
    assert_unchanged(saved)
    head, *rows = text.splitlines()
    assert head.startswith("statemap.jit plan for") and "lanes" not in head
    lines = {line.split("  ")[0]: line.split() for line in rows[1:]}
    assert "input" in lines["HiddenState 'v' (3,)"] and "written" in lines["HiddenState 'v' (3,)"]
    assert "input" in lines["RandomState 'rng' (2,)"] and "written" in lines["RandomState 'rng' (2,)"]
    assert "written" in lines["ShortTermState 'steps' ()"]
    assert "unchanged" in lines["ParamState 'tau' ()"]
    oracle = Noisy(0)
    assert_tree_allclose(jitted(arr(3)), oracle(arr(3)))
    assert body.runs == 1  # the call reuses explain's plan


# All or nothing.


def test_a_function_that_raises_changes_no_state():
    model = Noisy(0)
    extra = statemap.State(jnp.ones(2), name="extra")

    def bad(x):
        model(x)
        extra.value = extra.value * 3
        raise ValueError("boom in the step")

    saved = snapshot([*model.states, extra])
    jitted = statemap.jit(bad)
    for _ in range(2):
        with pytest.raises(ValueError, match="boom in the step"):
            jitted(arr(3))
        assert_unchanged(saved)


def test_a_warm_call_failing_at_run_time_changes_no_state():
    v = statemap.HiddenState(jnp.zeros(2), name="v")
    rng = statemap.RandomState(0)

    def check(x):
        if float(x.sum()) < 0:
            raise ValueError("negative input")
        return x

    def step(x):
        v.value = v.value + rng.normal((2,)) + x
        jax.experimental.io_callback(check, jax.ShapeDtypeStruct((2,), jnp.float32), x, ordered=True)
        return v.value

    jitted = statemap.jit(step)
    jitted(jnp.ones(2))
    saved = snapshot([v, rng])
    with pytest.raises(Exception, match="negative input"):
        jitted(-jnp.ones(2))
    assert_unchanged(saved)


# Nesting with mappings.


def test_writing_vmap_inside_a_jitted_train_step():
    members = 3

    def make():
        h = statemap.HiddenState(jnp.zeros((members, 2)), name="h")
        w = statemap.ParamState(arr(2, start=1), name="w")
        rng = statemap.RandomState(5, name="noise")
        step = statemap.ShortTermState(jnp.int32(0), name="step")

        def cell(x):
            h.value = jnp.tanh(h.value * w.value + x + 0.1 * rng.normal((2,)))
            return h.value.sum()

        layer = statemap.vmap(cell, state_in_axes=statemap.HiddenState)

        def train_step(xs):
            out = layer(xs)
            w.value = w.value - 0.01 * out.mean()
            step.value = step.value + 1
            return out

        return train_step, [h, w, rng, step]

    fn, states = make()
    eager_fn, eager_states = make()
    body = counted(fn)
    jitted = statemap.jit(body)
    for t in range(3):
        xs = arr(members, 2, start=t)
        assert_tree_allclose(jitted(xs), eager_fn(xs))
        assert_states_equal(states, eager_states)
    assert body.runs == 1


def test_jit_inside_a_vmap_lane_gets_per_lane_keys():
    members = 4
    rng = statemap.RandomState(7, name="rng")
    h = statemap.HiddenState(jnp.zeros((members, 2)), name="h")

    @statemap.jit
    def cell(x):
        h.value = 0.5 * h.value + x + rng.normal((2,))
        return h.value

    ensemble = statemap.vmap(cell, state_in_axes=statemap.HiddenState)
    parent, pure_h = rng.value, jnp.zeros((members, 2))
    xs = arr(members, 2)
    for _ in range(2):
        out = ensemble(xs)
        parent, noise = lane_normals(parent, members)
        pure_h = 0.5 * pure_h + xs + noise
        assert_tree_allclose(out, pure_h)
        assert_tree_allclose(h.value, pure_h)
        assert_keys_equal(rng.value, parent)
        assert len({tuple(np.asarray(row)) for row in noise}) == members


def test_pmap_of_a_jitted_step():
    n = 4
    devices = jax.devices()[:n]

    def make():
        h = statemap.HiddenState(jnp.zeros((n, 3)), name="h")
        rng = statemap.RandomState(11, name="rng")
        count = statemap.ShortTermState(jnp.int32(0), name="count")

        def step(x):
            h.value = 0.9 * h.value + x + 0.1 * rng.normal((3,))
            count.value = count.value + 1
            return jax.lax.pmean(h.value.sum(), "d")

        return step, [h, rng, count]

    step, states = make()
    eager_step, eager_states = make()
    body = counted(step)
    pmapped = statemap.pmap(statemap.jit(body), axis_name="d", devices=devices, state_in_axes=statemap.HiddenState)
    oracle = statemap.vmap(eager_step, axis_name="d", state_in_axes=statemap.HiddenState)
    for t in range(3):
        xs = arr(n, 3, start=t)
        out = jax.block_until_ready(pmapped(xs))
        assert_tree_allclose(out, oracle(xs), rtol=1e-5, atol=1e-5)
        assert_states_equal(states, eager_states)
    assert body.runs == 1
    assert int(states[2].value) == 3


def test_jit_inside_jit_equals_eager():
    model, oracle = Noisy(4), Noisy(4)
    inner = statemap.jit(model)

    @statemap.jit
    def twice(x):
        a, _ = inner(x)
        b, u = inner(x + 1)
        return a + b, u

    for t in range(2):
        x = arr(3, start=t)
        a, _ = oracle(x)
        b, u = oracle(x + 1)
        assert_tree_allclose(twice(x), (a + b, u))
        assert_states_equal(model.states, oracle.states)


# States as arguments and outputs.


def test_states_passed_as_arguments_are_the_ones_used():
    first, second = statemap.HiddenState(jnp.zeros(2), name="a"), statemap.HiddenState(jnp.ones(2), name="b")
    rng, eager_rng = statemap.RandomState(12), statemap.RandomState(12)

    def bump(state, rng, x):
        state.value = state.value + x + rng.uniform()
        return state.value

    body = counted(bump)
    jitted = statemap.jit(body)
    assert_tree_allclose(jitted(first, rng, jnp.ones(2)), bump(statemap.State(jnp.zeros(2)), eager_rng, jnp.ones(2)))
    assert_tree_allclose(jitted(second, rng, jnp.ones(2)), bump(statemap.State(jnp.ones(2)), eager_rng, jnp.ones(2)))
    assert_tree_allclose(first.value, 1 + statemap.RandomState(12).uniform() * jnp.ones(2))
    assert_keys_equal(rng.value, eager_rng.value)
    assert body.runs == 2  # another State object is another plan, as its identity is


def test_a_closed_over_state_returned_is_that_object():
    w = statemap.ParamState(jnp.ones(2), name="w")

    @statemap.jit
    def scaled(x):
        w.value = w.value * x
        return w, w.value.sum()

    for t in range(2):
        got, total = scaled(jnp.float32(2))
        assert got is w
        assert_tree_allclose(total, 2.0 * 2 ** (t + 1))


def test_a_nested_mapping_refusing_its_write_changes_no_state():
    count = statemap.ShortTermState(jnp.int32(0), name="count")
    shared = statemap.State(jnp.zeros(2), name="shared")
    rng = statemap.RandomState(0)

    def lane(x):
        shared.value = shared.value + x  # batched write to a broadcast state
        return x

    def step(xs):
        count.value = count.value + 1
        rng.uniform()
        return statemap.vmap(lane)(xs)

    saved = snapshot([count, shared, rng])
    with pytest.raises(statemap.BatchAxisError, match=r"State 'shared'"):
        statemap.jit(step)(jnp.ones((3, 2)))
    assert_unchanged(saved)


def test_state_trace_sees_warm_calls_and_restores_them():
    w = statemap.ParamState(arr(3), name="w")
    h = statemap.HiddenState(jnp.zeros(3), name="h")

    def f(x):
        h.value = h.value + w.value * x
        return h.value

    jitted = statemap.jit(f)
    for _ in range(2):  # cold, then warm
        saved = snapshot([w, h])
        with statemap.StateTrace() as trace:
            jitted(arr(3))
        assert [s.name for s in trace.states] == ["h", "w"]
        assert [s.name for s in trace.written] == ["h"]
        trace.restore()
        assert_unchanged(saved)


class Trainer:
    """A model whose train step is a ``statemap.jit`` method."""

    def __init__(self, seed):
        self.w = statemap.ParamState(arr(3, start=1), name="w")
        self.rng = statemap.RandomState(seed, name="rng")

    def _step(self, x):
        self.w.value = self.w.value - 0.1 * x * self.rng.uniform()
        return self.w.value.sum()

    step = functools.partial(statemap.jit, static_argnums=0)(_step)
    unbound = statemap.jit(_step)


def test_a_jitted_method_binds_its_instance():
    first, second, oracle = Trainer(0), Trainer(1), Trainer(0)
    for t in range(2):
        x = arr(3, start=t)
        assert_tree_allclose(first.step(x), oracle._step(x))
        second.step(x)  # another instance: another plan, its own states
    assert_tree_allclose(first.w.value, oracle.w.value)
    assert_keys_equal(first.rng.value, oracle.rng.value)
    assert not np.allclose(first.w.value, second.w.value)
    assert Trainer.step is Trainer.__dict__["step"]
    with pytest.raises(TypeError, match=r"statemap.jit: argument args\[0\] is a Trainer .*mark the argument static"):
        first.unbound(arr(3))


@pytest.mark.parametrize("static", [{"static_argnums": 1}, {"static_argnames": "n"}], ids=["by number", "by name"])
@pytest.mark.parametrize("by_keyword", [False, True], ids=["passed by position", "passed by keyword"])
def test_a_static_argument_is_static_however_it_is_named_and_passed(static, by_keyword):
    """As ``jax.jit``: numbers and names complete each other from the signature."""
    runs = []

    def fill(x, n):
        runs.append(n)
        return x + jnp.zeros(n)

    step = statemap.jit(fill, **static)
    for n in (3, 3, 4):
        out = step(jnp.float32(1), n=n) if by_keyword else step(jnp.float32(1), n)
        assert_tree_allclose(out, jnp.ones(n))
    assert runs == [3, 4]
