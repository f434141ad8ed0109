"""statemap.grad and statemap.value_and_grad, checked against hand-threaded ``jax.grad``.

Every oracle writes the same loss as a pure function of explicit parameters
and differentiates it with ``jax.grad`` / ``jax.value_and_grad`` (and
``jax.vmap(jax.grad(...))`` for the per-member gradients of an ensemble), or
runs the same stateful code eagerly on fresh states.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import arr, counted
from helpers import assert_concrete, assert_keys_equal, assert_tree_allclose, assert_unchanged, snapshot

import statemap


def pure_loss(w, b, x, y):
    """The loss of ``Linear`` as a pure function of its parameters."""
    return jnp.mean((jnp.tanh(x @ w) + b - y) ** 2)


class Linear:
    """Two parameters, a tagged one, a step counter and a key: a loss reads the first two."""

    def __init__(self):
        self.w = statemap.ParamState(arr(3, 2, start=-2), name="w")
        self.b = statemap.ParamState(jnp.array([0.1, -0.2]), name="b", tag="bias")
        self.unused = statemap.ParamState(jnp.ones(4), name="unused")
        self.calls = statemap.ShortTermState(jnp.int32(0), name="calls")

    def loss(self, x, y):
        self.calls.value = self.calls.value + 1
        return jnp.mean((jnp.tanh(x @ self.w.value) + self.b.value - y) ** 2)


X, Y = arr(4, 3), arr(4, 2, start=1)


def oracle_grads(model, argnums=(0, 1)):
    return jax.grad(pure_loss, argnums=argnums)(model.w.value, model.b.value, X, Y)


# grad_states: structures and filters.


def test_grad_states_a_single_state():
    model = Linear()
    g = statemap.grad(model.loss, model.w)(X, Y)
    assert_tree_allclose(g, oracle_grads(model)[0])
    assert int(model.calls.value) == 1


@pytest.mark.parametrize("container", [list, tuple], ids=["list", "tuple"])
def test_grad_states_a_list_or_tuple_keeps_its_structure(container):
    model = Linear()
    g = statemap.grad(model.loss, container([model.b, model.w]))(X, Y)
    gw, gb = oracle_grads(model)
    assert type(g) is container
    assert_tree_allclose(g, container([gb, gw]))


def test_grad_states_a_dict_keeps_its_structure():
    model = Linear()
    g = statemap.grad(model.loss, {"weights": model.w, "bias": model.b})(X, Y)
    gw, gb = oracle_grads(model)
    assert_tree_allclose(g, {"weights": gw, "bias": gb})


def test_grad_states_a_nested_structure():
    model = Linear()
    g = statemap.grad(model.loss, {"layer": [model.w, (model.b,)]})(X, Y)
    gw, gb = oracle_grads(model)
    assert_tree_allclose(g, {"layer": [gw, (gb,)]})


def test_grad_states_naming_a_state_twice_gives_its_gradient_twice():
    model = Linear()
    g = statemap.grad(model.loss, {"a": [model.w], "b": (model.w, model.b)})(X, Y)
    gw, gb = oracle_grads(model)
    assert_tree_allclose(g, {"a": [gw], "b": (gw, gb)})


def test_grad_states_an_explicit_state_the_loss_does_not_read_gets_zeros():
    model = Linear()
    g = statemap.grad(model.loss, [model.w, model.unused])(X, Y)
    assert_tree_allclose(g, [oracle_grads(model)[0], jnp.zeros(4)])


@pytest.mark.parametrize(
    ("grad_states", "names"),
    [
        (statemap.ParamState, ["b", "w"]),
        ("bias", ["b"]),
        (lambda path, state: path == ("w",), ["w"]),
        (True, ["b", "w"]),
        (statemap.filters.Not(statemap.filters.WithTag("bias")), ["w"]),
    ],
    ids=["type", "tag", "callable", "everything", "filter-class"],
)
def test_grad_states_a_filter_gives_a_dict_in_first_touch_order(grad_states, names):
    model = Linear()

    def loss(x, y):
        # b is touched first, then calls (an int32 counter: no gradient), then w.
        b = model.b.value
        model.calls.value = model.calls.value + 1
        return jnp.mean((jnp.tanh(x @ model.w.value) + b - y) ** 2)

    g = statemap.grad(loss, grad_states)(X, Y)
    assert isinstance(g, dict)
    assert [s.name for s in g] == names
    gw, gb = oracle_grads(model)
    by_name = {"w": gw, "b": gb}
    for state, grad in g.items():
        assert_tree_allclose(grad, by_name[state.name])
    assert model.unused not in g  # selected by the type but not read


def test_a_filter_leaves_out_integer_states_and_keys():
    w = statemap.ParamState(jnp.array([1.0, 2.0]), name="w")
    steps = statemap.State(jnp.int32(0), name="steps")
    rng = statemap.RandomState(0, name="rng")

    def loss(x):
        steps.value = steps.value + 1
        return (w.value * x).sum() + 0.0 * rng.normal()

    g = statemap.grad(loss, statemap.State)(jnp.ones(2))
    assert list(g) == [w]
    assert_tree_allclose(g[w], jnp.ones(2))
    assert int(steps.value) == 1


def test_pytree_state():
    params = statemap.ParamState({"w": arr(3, 2), "b": jnp.zeros(2)}, name="params")

    def loss(x):
        return jnp.sum(jnp.sin(x @ params.value["w"] + params.value["b"]))

    g = statemap.grad(loss, params)(X)
    expected = jax.grad(lambda p: jnp.sum(jnp.sin(X @ p["w"] + p["b"])))(params.value)
    assert_tree_allclose(g, expected)


# argnums.


def test_default_differentiates_argument_zero():
    model = Linear()
    g = statemap.grad(model.loss)(X, Y)
    expected = jax.grad(pure_loss, argnums=2)(model.w.value, model.b.value, X, Y)
    assert_tree_allclose(g, expected)


@pytest.mark.parametrize("argnums", [0, 1, -1, (0, 1), (1,), [1, 0]])
def test_argnums(argnums):
    model = Linear()
    g = statemap.grad(model.loss, argnums=argnums)(X, Y)
    # The loss's (x, y) are pure_loss's arguments 2 and 3.
    shifted = argnums % 2 + 2 if isinstance(argnums, int) else tuple(i % 2 + 2 for i in argnums)
    expected = jax.grad(pure_loss, argnums=shifted)(model.w.value, model.b.value, X, Y)
    assert_tree_allclose(g, expected)
    if not isinstance(argnums, int):
        assert isinstance(g, tuple)


@pytest.mark.parametrize("argnums", [1, (0, 1)])
def test_grad_states_and_argnums_give_state_grads_then_arg_grads(argnums):
    model = Linear()
    state_grads, arg_grads = statemap.grad(model.loss, [model.w, model.b], argnums=argnums)(X, Y)
    gw, gb = oracle_grads(model)
    assert_tree_allclose(state_grads, [gw, gb])
    shifted = 3 if argnums == 1 else (2, 3)
    assert_tree_allclose(arg_grads, jax.grad(pure_loss, argnums=shifted)(model.w.value, model.b.value, X, Y))


# return_value, has_aux, value_and_grad.


def test_return_value():
    model = Linear()
    g, value = statemap.grad(model.loss, model.w, return_value=True)(X, Y)
    expected_value, (gw, _) = jax.value_and_grad(pure_loss, argnums=(0, 1))(model.w.value, model.b.value, X, Y)
    assert_tree_allclose((g, value), (gw, expected_value))


def aux_loss(model):
    def loss(x, y):
        pred = jnp.tanh(x @ model.w.value) + model.b.value
        return jnp.mean((pred - y) ** 2), {"pred": pred}

    return loss


def pure_aux(w, b, x, y):
    pred = jnp.tanh(x @ w) + b
    return jnp.mean((pred - y) ** 2), {"pred": pred}


def test_has_aux():
    model = Linear()
    g, aux = statemap.grad(aux_loss(model), model.b, has_aux=True)(X, Y)
    expected_g, expected_aux = jax.grad(pure_aux, argnums=1, has_aux=True)(model.w.value, model.b.value, X, Y)
    assert_tree_allclose((g, aux), (expected_g, expected_aux))


def test_has_aux_and_return_value():
    model = Linear()
    out = statemap.grad(aux_loss(model), [model.w], has_aux=True, return_value=True)(X, Y)
    (value, aux), gw = jax.value_and_grad(pure_aux, has_aux=True)(model.w.value, model.b.value, X, Y)
    assert len(out) == 3
    assert_tree_allclose(out, ([gw], value, aux))


def test_value_and_grad_order():
    model = Linear()
    value, g = statemap.value_and_grad(model.loss, {"w": model.w})(X, Y)
    expected_value, gw = jax.value_and_grad(pure_loss)(model.w.value, model.b.value, X, Y)
    assert_tree_allclose((value, g), (expected_value, {"w": gw}))


def test_value_and_grad_with_aux_and_argnums():
    model = Linear()
    (value, aux), (state_grads, arg_grads) = statemap.value_and_grad(
        aux_loss(model), model.w, argnums=0, has_aux=True
    )(X, Y)
    (expected_value, expected_aux), (gw, gx) = jax.value_and_grad(pure_aux, argnums=(0, 2), has_aux=True)(
        model.w.value, model.b.value, X, Y
    )
    assert_tree_allclose((value, aux, state_grads, arg_grads), (expected_value, expected_aux, gw, gx))


def test_value_and_grad_default_argnum():
    value, g = statemap.value_and_grad(lambda x: jnp.sum(jnp.sin(x)))(arr(3))
    assert_tree_allclose((value, g), jax.value_and_grad(lambda x: jnp.sum(jnp.sin(x)))(arr(3)))


def test_decorator_forms():
    model = Linear()

    @statemap.grad(grad_states=model.w)
    def by_state(x, y):
        return model.loss(x, y)

    @statemap.value_and_grad
    def by_arg(x):
        return jnp.sum(x**2)

    assert_tree_allclose(by_state(X, Y), oracle_grads(model)[0])
    assert_tree_allclose(by_arg(arr(3)), (jnp.sum(arr(3) ** 2), 2 * arr(3)))


def test_keyword_arguments_are_passed_not_differentiated():
    model = Linear()
    g = statemap.grad(lambda x, *, y: model.loss(x, y), model.b)(X, y=Y)
    assert_tree_allclose(g, oracle_grads(model)[1])


# States written inside the loss.


class BatchNormish:
    """A scale parameter and running statistics the loss writes (train mode)."""

    def __init__(self):
        self.gamma = statemap.ParamState(jnp.array([1.0, 2.0, 0.5]), name="gamma")
        self.mean = statemap.LongTermState(jnp.zeros(3), name="mean")
        self.var = statemap.LongTermState(jnp.ones(3), name="var")
        self.count = statemap.ShortTermState(jnp.int32(0), name="count")

    def loss(self, x):
        mu, var = x.mean(0), x.var(0)
        self.mean.value = 0.9 * self.mean.value + 0.1 * mu
        self.var.value = 0.9 * self.var.value + 0.1 * var
        self.count.value = self.count.value + 1
        y = self.gamma.value * (x - mu) / jnp.sqrt(var + 1e-5)
        return jnp.sum(jnp.tanh(y) ** 2)


def test_states_written_inside_the_loss_get_the_eager_values():
    model, eager = BatchNormish(), BatchNormish()
    for t in range(3):
        x = arr(5, 3, start=t) ** 2
        g = statemap.grad(model.loss, model.gamma)(x)
        expected_value = eager.loss(x)  # eager: the same code, writing the running statistics
        pure = lambda gamma: jnp.sum(jnp.tanh(gamma * (x - x.mean(0)) / jnp.sqrt(x.var(0) + 1e-5)) ** 2)  # noqa: E731
        assert_tree_allclose(g, jax.grad(pure)(model.gamma.value))
        assert_tree_allclose(pure(model.gamma.value), expected_value)
        for a, e in [(model.mean, eager.mean), (model.var, eager.var), (model.count, eager.count)]:
            assert_tree_allclose(a.value, e.value)
    assert int(model.count.value) == 3
    assert_concrete([model.gamma, model.mean, model.var, model.count])


def test_a_differentiated_state_written_by_the_loss_gets_the_gradient_at_its_entry_value():
    w = statemap.ParamState(jnp.array([1.0, -2.0]), name="w")

    def loss():
        w.value = w.value * 3.0
        return jnp.sum(w.value**2)

    g = statemap.grad(loss, w)()
    assert_tree_allclose(g, jax.grad(lambda w: jnp.sum((3.0 * w) ** 2))(jnp.array([1.0, -2.0])))
    assert_tree_allclose(w.value, jnp.array([3.0, -6.0]))


def test_random_draws_inside_the_loss_advance_the_key_as_eagerly():
    w = statemap.ParamState(jnp.array([1.0, 2.0]), name="w")
    rng, eager = statemap.RandomState(5), statemap.RandomState(5)
    for _ in range(2):
        noise = eager.normal((2,))
        g, value = statemap.grad(lambda: jnp.sum((w.value + rng.normal((2,))) ** 2), w, return_value=True)()
        assert_tree_allclose((g, value), (2 * (w.value + noise), jnp.sum((w.value + noise) ** 2)))
        assert_keys_equal(rng.value, eager.value)


def test_second_derivative_by_nesting():
    w = statemap.ParamState(jnp.array([0.3, -1.2]), name="w")
    loss = lambda: jnp.sum(jnp.sin(w.value) ** 3)  # noqa: E731
    h = statemap.grad(lambda: jnp.sum(statemap.grad(loss, w)()), w)()
    pure = lambda w: jnp.sum(jnp.sin(w) ** 3)  # noqa: E731
    assert_tree_allclose(h, jax.grad(lambda w: jnp.sum(jax.grad(pure)(w)))(w.value), rtol=1e-5)


# Inside statemap.vmap lanes: per-member gradients of an ensemble.


def ensemble_pure(w, b, x, y):
    return jnp.mean((jnp.tanh(x @ w) + b - y) ** 2)


def test_per_member_gradients_of_an_ensemble_equal_vmap_of_grad():
    n = 4
    w = statemap.ParamState(jax.random.normal(jax.random.PRNGKey(0), (n, 3, 2)), name="w")
    b = statemap.ParamState(jnp.array([0.1, -0.3]), name="b")  # shared by every member

    def member(x, y):
        return statemap.grad(lambda x, y: ensemble_pure(w.value, b.value, x, y), [w, b])(x, y)

    xs, ys = arr(n, 5, 3), arr(n, 5, 2, start=3)
    gw, gb = statemap.vmap(member, state_in_axes=statemap.filters.PathContains("w"))(xs, ys)
    ew, eb = jax.vmap(jax.grad(ensemble_pure, argnums=(0, 1)), in_axes=(0, None, 0, 0))(w.value, b.value, xs, ys)
    assert_tree_allclose(gw, ew, rtol=1e-5)
    assert_tree_allclose(gb, eb, rtol=1e-5)
    assert gw.shape == (n, 3, 2) and gb.shape == (n, 2)


def test_ensemble_training_step_in_vmap_lanes_with_running_statistics():
    n = 3
    w = statemap.ParamState(jax.random.normal(jax.random.PRNGKey(1), (n, 3)), name="w")
    seen = statemap.HiddenState(jnp.zeros((n,)), name="seen")

    def loss(x):
        seen.value = 0.5 * seen.value + x.mean()
        return jnp.sum(jnp.tanh(x @ w.value) ** 2)

    def member(x):
        value, g = statemap.value_and_grad(loss, w)(x)
        w.value = w.value - 0.1 * g
        return value

    step = statemap.vmap(member, state_in_axes={0: [statemap.ParamState, statemap.HiddenState]})
    pw, pseen = w.value, seen.value
    pure = jax.vmap(jax.value_and_grad(lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)))
    for t in range(3):
        xs = arr(n, 4, 3, start=t)
        values = step(xs)
        expected_values, g = pure(pw, xs)
        pw, pseen = pw - 0.1 * g, 0.5 * pseen + xs.mean(axis=(1, 2))
        assert_tree_allclose(values, expected_values, rtol=1e-5)
        assert_tree_allclose((w.value, seen.value), (pw, pseen), rtol=1e-5)


def test_per_example_gradients_under_raw_jax_vmap_of_a_read_only_loss():
    w = statemap.ParamState(jnp.array([1.0, 2.0]), name="w")
    g = jax.vmap(statemap.grad(lambda x: jnp.sum(jnp.sin(w.value * x)), w))(arr(3, 2))
    expected = jax.vmap(jax.grad(lambda w, x: jnp.sum(jnp.sin(w * x))), in_axes=(None, 0))(w.value, arr(3, 2))
    assert_tree_allclose(g, expected)


def test_data_parallel_training_under_pmap_with_pmean_of_gradients():
    w = statemap.ParamState(jnp.array([[0.5, -0.3], [0.1, 0.2]]), name="w")
    steps = statemap.ShortTermState(jnp.int32(0), name="steps")

    def loss(x, y):
        return jnp.mean((jnp.tanh(x @ w.value) - y) ** 2)

    def step(x, y):
        value, g = statemap.value_and_grad(loss, w)(x, y)
        w.value = w.value - 0.5 * jax.lax.pmean(g, "d")  # the same on every device: written as is
        steps.value = steps.value + 1
        return jax.lax.pmean(value, "d")

    train = statemap.pmap(step, axis_name="d", devices=jax.devices()[:4])
    pure = jax.jit(jax.value_and_grad(lambda w, x, y: jnp.mean((jnp.tanh(x @ w) - y) ** 2)))
    xs, ys = arr(4, 4, 2), jnp.full((4, 4, 2), 0.3)
    pw = w.value
    for t in range(3):
        values = jax.block_until_ready(train(xs, ys))
        pv, g = pure(pw, xs.reshape(16, 2), ys.reshape(16, 2))
        pw = pw - 0.5 * g
        assert_tree_allclose(values, jnp.full(4, pv), rtol=1e-5)
        assert_tree_allclose(w.value, pw, rtol=1e-5)
        assert int(steps.value) == t + 1


# Under statemap.jit: an MLP train step.


def mlp_params(seed):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {
        "w1": 0.5 * jax.random.normal(k1, (3, 4)),
        "b1": jnp.zeros(4),
        "w2": 0.5 * jax.random.normal(k2, (4, 1)),
        "b2": jnp.zeros(1),
    }


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


@jax.jit
def sgd_oracle(params, step, x, y):
    loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)
    return loss, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), step + 1


class MLP:
    def __init__(self, seed=0):
        self.params = {k: statemap.ParamState(v, name=k) for k, v in mlp_params(seed).items()}
        self.step = statemap.ShortTermState(jnp.int32(0), name="step")

    def values(self):
        return {k: p.value for k, p in self.params.items()}

    def loss(self, x, y):
        return mlp_loss(self.values(), x, y)


@pytest.mark.parametrize("form", ["grad-filter", "value_and_grad-dict"])
def test_mlp_train_step_under_jit_equals_hand_threaded_jax(form):
    model = MLP()
    loss = counted(model.loss)

    def train_step(x, y):
        if form == "grad-filter":
            grads, value = statemap.grad(loss, statemap.ParamState, return_value=True)(x, y)
            grads = {s.name: g for s, g in grads.items()}
        else:
            value, grads = statemap.value_and_grad(loss, model.params)(x, y)
        for k, p in model.params.items():
            p.value = p.value - 0.1 * grads[k]
        model.step.value = model.step.value + 1
        return value

    jitted = statemap.jit(train_step)
    pure, pure_step = mlp_params(0), jnp.int32(0)
    x, y = arr(5, 3), arr(5, 1, start=2)
    for t in range(4):
        value = jitted(x, y)
        pure_value, pure, pure_step = sgd_oracle(pure, pure_step, x, y)
        assert_tree_allclose(value, pure_value, rtol=1e-5)
        assert_tree_allclose(model.values(), pure, rtol=1e-5)
        assert int(model.step.value) == int(pure_step) == t + 1
    assert loss.runs == 1
    # A new signature traces once more.
    jitted(arr(7, 3), arr(7, 1))
    jitted(arr(7, 3), arr(7, 1))
    assert loss.runs == 2
    assert_concrete([*model.params.values(), model.step])


def test_grad_under_jit_equals_grad_run_eagerly():
    model, eager = BatchNormish(), BatchNormish()

    def step(x):
        g = statemap.grad(model.loss, model.gamma)(x)
        model.gamma.value = model.gamma.value - 0.5 * g
        return g

    def eager_step(x):
        g = statemap.grad(eager.loss, eager.gamma)(x)
        eager.gamma.value = eager.gamma.value - 0.5 * g
        return g

    jitted = statemap.jit(step)
    for t in range(3):
        x = arr(6, 3, start=t) ** 2
        assert_tree_allclose(jitted(x), eager_step(x), rtol=1e-5)
        for a, e in [(model.gamma, eager.gamma), (model.mean, eager.mean), (model.count, eager.count)]:
            assert_tree_allclose(a.value, e.value, rtol=1e-5)


def test_grad_under_jit_of_vmap_ensemble():
    n = 3
    w = statemap.ParamState(jax.random.normal(jax.random.PRNGKey(2), (n, 3)), name="w")

    def member(x):
        g = statemap.grad(lambda x: jnp.sum(jnp.tanh(x @ w.value) ** 2), w)(x)
        w.value = w.value - 0.1 * g

    step = statemap.jit(statemap.vmap(member, state_in_axes=statemap.ParamState))
    pw = w.value
    pure_grad = jax.vmap(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)))
    for t in range(3):
        xs = arr(n, 4, 3, start=t)
        step(xs)
        pw = pw - 0.1 * pure_grad(pw, xs)
        assert_tree_allclose(w.value, pw, rtol=1e-5)


# Errors.


def test_non_scalar_loss_raises_type_error():
    w = statemap.ParamState(jnp.ones(3), name="w")
    with pytest.raises(TypeError, match=r"statemap.grad: the function must return a scalar floating-point loss \(shape \(\)\), got float32\[3\]"):
        statemap.grad(lambda: w.value * 2, w)()


def test_integer_loss_raises_type_error():
    w = statemap.ParamState(jnp.ones(3), name="w")
    with pytest.raises(TypeError, match=r"statemap.value_and_grad: the function must return a scalar floating-point loss.*got int32\[\]"):
        statemap.value_and_grad(lambda: jnp.sum(w.value).astype(jnp.int32), w)()


def test_grad_states_selecting_nothing_the_function_reads_raises_value_error():
    w = statemap.ParamState(jnp.ones(3), name="w")
    other = statemap.ParamState(jnp.ones(3), name="other")
    with pytest.raises(ValueError, match=r"statemap.grad: `grad_states` selects no floating-point state the function reads \(it reads ParamState 'w'\)"):
        statemap.grad(lambda: jnp.sum(w.value), other)()
    with pytest.raises(ValueError, match=r"`grad_states` selects no floating-point state the function reads \(it reads no state at all\)"):
        statemap.grad(lambda x: jnp.sum(x), statemap.ParamState)(jnp.ones(2))
    with pytest.raises(ValueError, match=r"`grad_states` selects no floating-point state"):
        statemap.grad(lambda: jnp.sum(w.value), "no-such-tag")()


def test_an_explicit_integer_state_raises_type_error():
    steps = statemap.State(jnp.int32(0), name="steps")
    with pytest.raises(TypeError, match=r"statemap.grad: `grad_states` names State 'steps'.*not floating-point \(int32\)"):
        statemap.grad(lambda: steps.value * 1.0, steps)()


@pytest.mark.parametrize("argnums", ["0", 1.0, True, (0, "1"), [None]])
def test_bad_argnums_raises_type_error_at_construction(argnums):
    with pytest.raises(TypeError, match=r"statemap.grad: `argnums` must be an int, a tuple of ints or None"):
        statemap.grad(lambda x: x, argnums=argnums)


def test_repeated_argnums_raise_type_error():
    with pytest.raises(TypeError, match=r"statemap.grad: `argnums` \(0, 0\) names an argument more than once"):
        statemap.grad(lambda x: jnp.sum(x), argnums=(0, 0))
    grad = statemap.value_and_grad(lambda x, y: jnp.sum(x * y), argnums=(1, -1))
    with pytest.raises(TypeError, match=r"statemap.value_and_grad: `argnums` \(1, -1\) names an argument more than once"):
        grad(arr(2), arr(2))


def test_argnums_out_of_range_raises_type_error():
    grad = statemap.grad(lambda x: jnp.sum(x), argnums=2)
    with pytest.raises(TypeError, match=r"statemap.grad: `argnums` differentiates positional argument 2, but the function was called with 1"):
        grad(arr(2))


def test_bad_grad_states_raises_type_error():
    with pytest.raises(TypeError, match=r"statemap.grad: `grad_states` must be a State, a list/tuple/dict of States, or a filter"):
        statemap.grad(lambda x: x, 42)


def test_fn_not_callable_raises_type_error():
    with pytest.raises(TypeError, match=r"statemap.value_and_grad: `fn` must be callable"):
        statemap.value_and_grad(3)


@pytest.mark.parametrize("out", [lambda v: v, lambda v: (v, v, v), lambda v: [v]], ids=["scalar", "triple", "singleton"])
def test_has_aux_without_a_pair_raises_type_error(out):
    w = statemap.ParamState(jnp.ones(3), name="w")
    with pytest.raises(TypeError, match=r"statemap.grad: with `has_aux=True` the function must return a pair `\(loss, aux\)`"):
        statemap.grad(lambda: out(jnp.sum(w.value)), w, has_aux=True)()


def test_loss_creating_a_state_raises_type_error():
    w = statemap.ParamState(jnp.ones(3), name="w")

    def loss():
        statemap.State(jnp.zeros(2), name="fresh")
        return jnp.sum(w.value)

    with pytest.raises(TypeError, match=r"statemap.grad: the function creates or returns State 'fresh'"):
        statemap.grad(loss, w)()


# All or nothing.


def test_a_loss_that_raises_leaves_every_state_unchanged():
    model = BatchNormish()
    rng = statemap.RandomState(0)
    before = snapshot([model.gamma, model.mean, model.var, model.count, rng])

    def loss(x):
        value = model.loss(x) + rng.normal()
        raise FloatingPointError("diverged")
        return value

    with pytest.raises(FloatingPointError, match="diverged"):
        statemap.grad(loss, model.gamma)(arr(4, 3))
    with pytest.raises(FloatingPointError, match="diverged"):
        statemap.jit(lambda x: statemap.value_and_grad(loss, statemap.ParamState)(x))(arr(4, 3))
    assert_unchanged(before)


def test_a_failed_grad_check_leaves_every_state_unchanged():
    model = BatchNormish()
    before = snapshot([model.gamma, model.mean, model.var, model.count])
    with pytest.raises(TypeError, match=r"scalar floating-point loss"):
        statemap.grad(lambda x: model.loss(x) * jnp.ones(2), model.gamma)(arr(4, 3))
    with pytest.raises(ValueError, match=r"selects no floating-point state"):
        statemap.grad(model.loss, statemap.HiddenState)(arr(4, 3))
    assert_unchanged(before)


def test_grad_under_raw_jax_jit_is_refused():
    w = statemap.ParamState(jnp.ones(3), name="w")
    before = snapshot([w])
    with pytest.raises(statemap.StatemapError, match=r"statemap.grad: called inside a JAX transformation.*ParamState 'w'.*Use statemap.jit"):
        jax.jit(statemap.grad(lambda x: jnp.sum(w.value * x), w))(arr(3))
    assert_unchanged(before)


def test_a_state_passed_as_an_argument_is_read_like_a_closed_over_one():
    w = statemap.ParamState(jnp.array([1.0, 2.0]), name="w")
    g = statemap.grad(lambda s, x: (s.value * x).sum() ** 2, w)(w, jnp.ones(2))
    np.testing.assert_allclose(g, jax.grad(lambda w, x: (w * x).sum() ** 2)(jnp.array([1.0, 2.0]), jnp.ones(2)))


# A jax.custom_jvp function's rule gives tangents for its arguments only.


def _softplus_reading(beta):
    @jax.custom_jvp
    def softplus(x):
        return jnp.logaddexp(beta.value * x, 0.0) / beta.value

    @softplus.defjvp
    def softplus_jvp(primals, tangents):
        (x,), (tx,) = primals, tangents
        return softplus(x), jax.nn.sigmoid(beta.value * x) * tx

    return softplus


def _softplus_of(x, b):
    return jnp.logaddexp(b * x, 0.0) / b


WRAPPERS = {
    "plain": lambda f: f,
    "jax.jit": jax.jit,
    "jax.checkpoint": jax.checkpoint,
    "lax.cond": lambda f: lambda x: jax.lax.cond(True, f, lambda x: x, x),
    "lax.scan": lambda f: lambda x: jax.lax.scan(lambda c, _: (f(c), None), x, None, length=2)[0],
}


@pytest.mark.parametrize("wrap", list(WRAPPERS))
def test_a_custom_jvp_function_reading_a_differentiated_state_is_refused(wrap):
    beta = statemap.ParamState(jnp.float32(2.0), name="beta")
    softplus = WRAPPERS[wrap](_softplus_reading(beta))
    before = snapshot([beta])
    with pytest.raises(TypeError, match=r"custom_jvp function 'softplus' reads ParamState 'beta'.*as an argument"):
        statemap.grad(lambda x: softplus(x).sum(), beta)(jnp.ones(3))
    assert_unchanged(before)


def test_a_custom_jvp_function_reading_a_state_per_member_is_refused():
    betas = statemap.ParamState(jnp.array([1.0, 2.0, 3.0]), name="betas")
    softplus = _softplus_reading(betas)
    per_member = statemap.vmap(
        lambda x: statemap.grad(lambda x: softplus(x).sum(), betas)(x), state_in_axes={0: betas}
    )
    with pytest.raises(TypeError, match="reads ParamState 'betas'"):
        per_member(jnp.ones((3, 2)))


def test_a_custom_jvp_function_may_read_a_state_that_is_not_differentiated():
    beta = statemap.ParamState(jnp.float32(2.0), name="beta")
    scale = statemap.ParamState(jnp.float32(3.0), name="scale")
    softplus = _softplus_reading(beta)
    x = jnp.ones(3)
    got = statemap.grad(lambda x: (scale.value * softplus(x)).sum(), scale)(x)
    np.testing.assert_allclose(got, _softplus_of(x, 2.0).sum(), rtol=1e-6)


def test_a_custom_jvp_function_given_the_state_as_an_argument_differentiates_it():
    beta = statemap.ParamState(jnp.float32(2.0), name="beta")

    @jax.custom_jvp
    def softplus(x, b):
        return _softplus_of(x, b)

    @softplus.defjvp
    def softplus_jvp(primals, tangents):
        return jax.jvp(_softplus_of, primals, tangents)

    x = jnp.ones(3)
    got = statemap.grad(lambda x: softplus(x, beta.value).sum(), beta)(x)
    np.testing.assert_allclose(got, jax.grad(lambda b: _softplus_of(x, b).sum())(2.0), rtol=1e-6)


def test_the_gradient_dict_of_a_filter_leaves_a_mapping_and_jit():
    """``{State: gradient}`` is a pytree (states order by creation): per-member gradients of an ensemble."""
    w = statemap.ParamState(jnp.arange(6.0).reshape(3, 2), name="w")
    b = statemap.ParamState(jnp.ones(3), name="b")

    def loss(x):
        return ((w.value * x).sum() + b.value) ** 2

    def oracle(wi, bi, x):
        return jax.grad(lambda wb: ((wb[0] * x).sum() + wb[1]) ** 2)((wi, bi))

    x = jnp.ones(2)
    per_member = statemap.vmap(lambda: statemap.grad(lambda: loss(x), statemap.ParamState)(), axis_size=3,
                               state_in_axes=statemap.ParamState)()
    want_w, want_b = jax.vmap(oracle, in_axes=(0, 0, None))(w.value, b.value, x)
    assert list(per_member) == [w, b]
    assert_tree_allclose(per_member[w], want_w)
    assert_tree_allclose(per_member[b], want_b)
    whole = statemap.jit(lambda: statemap.grad(lambda: loss(x).sum(), statemap.ParamState)())()
    assert set(whole) == {w, b}
    assert_tree_allclose(whole[b], jax.grad(lambda bv: (((w.value * x).sum() + bv) ** 2).sum())(b.value))
