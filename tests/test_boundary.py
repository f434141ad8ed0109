"""The boundary between statemap's transforms and raw JAX ones (SPEC rules 12-14).

12: a state read inside the user's own ``jax.jit``, ``lax`` control flow or
``jax.checkpoint`` within a statemap transform sees the latest value.
13: writing or drawing there is a ``StatemapError`` naming the state.
14: a statemap transform under a raw JAX transform leaves no tracer in any
state and never bakes a state's value into a cached program.

Oracles thread the states' values by hand through pure JAX.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_keys_equal, assert_tree_allclose, assert_unchanged, lane_keys, snapshot

import statemap

LANES = 2
N = 3
STEPS = 3

@jax.jit
def lane_normals(parent):
    """The advanced parent, and what each lane's ``RandomState.normal((N,))`` draws."""
    new, keys = lane_keys(parent, LANES)
    return new, jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[1], (N,)))(keys)


# Module-level state and readers: JAX caches the traces of module-level
# functions for the whole session, which is what a stale read would reuse.
H = statemap.HiddenState(jnp.zeros((LANES, N)), name="h")


def _read(x):
    return x + H.value.sum()


@jax.jit
def read_in_jit(x):
    return _read(x)


def read_in_cond(x):
    return jax.lax.cond(x >= 0, _read, _read, x)


def read_in_switch(x):
    return jax.lax.switch(0, [_read, _read], x)


def _fori_body(i, acc):
    return _read(acc)


def read_in_fori_loop(x):
    return jax.lax.fori_loop(0, 1, _fori_body, x)


def _while_cond(carry):
    return carry[0] < 1


def _while_body(carry):
    return carry[0] + 1, _read(carry[1])


def read_in_while_loop(x):
    return jax.lax.while_loop(_while_cond, _while_body, (0, x))[1]


def _scan_body(carry, _):
    return _read(carry), None


def read_in_scan(x):
    return jax.lax.scan(_scan_body, x, length=1)[0]


read_in_checkpoint = jax.checkpoint(_read)


@jax.custom_jvp
def read_in_custom_jvp(x):
    return _read(x)


read_in_custom_jvp.defjvp(lambda primals, tangents: (read_in_custom_jvp(*primals), tangents[0]))


class Reader:
    """A model whose method is a ``partial(jax.jit, static_argnums=0)`` reader."""

    @partial(jax.jit, static_argnums=0)
    def read(self, x):
        return _read(x)


READER = Reader()

READERS = {
    "jit": read_in_jit,
    "jit-method": READER.read,
    "cond": read_in_cond,
    "switch": read_in_switch,
    "fori_loop": read_in_fori_loop,
    "while_loop": read_in_while_loop,
    "scan": read_in_scan,
    "checkpoint": read_in_checkpoint,
    "custom_jvp": read_in_custom_jvp,
}


def _steps(reader, x):
    """Write H, read it through ``reader``; three times."""
    ys = []
    for t in range(STEPS):
        H.value = jnp.tanh(H.value + x[..., None])
        ys.append(reader(jnp.float32(t)))
    return jnp.stack(ys)


@jax.jit
def _steps_oracle(x):
    """What ``_steps`` returns for one lane (x scalar) or all (x of shape (LANES,)), and H after."""
    h, ys = jnp.zeros((*x.shape, N)), []
    for t in range(STEPS):
        h = jnp.tanh(h + x[..., None])
        ys.append(t + h.sum())
    return jnp.stack(ys), h


# Rule 12: reads see the latest value.


@pytest.mark.parametrize("reader", READERS)
def test_reads_in_raw_jax_inside_a_vmap_lane_see_the_latest_write(reader):
    H.value = jnp.zeros((LANES, N))
    x = jnp.asarray([0.5, -0.3], jnp.float32)
    ys = statemap.vmap(partial(_steps, READERS[reader]), state_in_axes=statemap.HiddenState)(x)
    expected, h = jax.vmap(_steps_oracle)(x)
    assert_tree_allclose(ys, expected, rtol=1e-5)
    assert_tree_allclose(H.value, h, rtol=1e-5)


@pytest.mark.parametrize("reader", ["jit", "jit-method", "cond", "scan"])
def test_reads_in_raw_jax_inside_statemap_jit_see_the_latest_write(reader):
    H.value = jnp.zeros((LANES, N))
    x = jnp.asarray([0.5, -0.3], jnp.float32)
    step = statemap.jit(partial(_steps, READERS[reader]))
    expected, h = _steps_oracle(x)
    assert_tree_allclose(step(x), expected, rtol=1e-5)
    assert_tree_allclose(H.value, h, rtol=1e-5)
    # Warm: from the state as it is now.
    H.value = jnp.zeros((LANES, N))
    assert_tree_allclose(step(x), expected, rtol=1e-5)


def test_reads_in_raw_jax_inside_a_statemap_loop_body_see_the_latest_write():
    H.value = jnp.zeros((LANES, N))
    x = jnp.asarray([0.5, -0.3], jnp.float32)
    ys = statemap.for_loop(lambda t: _steps(read_in_jit, x) + t, jnp.arange(2, dtype=jnp.float32))
    first, h = _steps_oracle(x)
    h2, second = h, []
    for t in range(STEPS):
        h2 = jnp.tanh(h2 + x[:, None])
        second.append(t + h2.sum())
    assert_tree_allclose(ys, jnp.stack([first, jnp.stack(second) + 1]), rtol=1e-5)
    assert_tree_allclose(H.value, h2, rtol=1e-5)


class RNN:
    """The issue's example: a jitted readout method after each write."""

    def __init__(self):
        self.h = statemap.HiddenState(jnp.zeros((2, 3)), name="h")
        self.w_out = statemap.ParamState(jnp.ones(3), name="w_out")

    @partial(jax.jit, static_argnums=0)
    def readout(self):
        return self.h.value @ self.w_out.value

    def __call__(self, xs):
        ys = []
        for t in range(xs.shape[0]):
            self.h.value = jnp.tanh(self.h.value + xs[t])
            ys.append(self.readout())
        return jnp.stack(ys)


def test_the_issues_rnn_readout_sees_every_step():
    ys = statemap.vmap(RNN(), state_in_axes=statemap.HiddenState)(jnp.full((2, 4, 3), 0.5))
    h, expected = jnp.zeros(3), []
    for _ in range(4):
        h = jnp.tanh(h + 0.5)
        expected.append(h.sum())
    assert_tree_allclose(ys[0], jnp.stack(expected), rtol=1e-5)
    np.testing.assert_allclose(ys[0], [1.386, 2.236, 2.541, 2.620], atol=1e-3)


# Rule 13: writes and draws inside raw JAX transforms are refused.

NOISE = statemap.RandomState(0, name="noise")


def _draw(x):
    return x + NOISE.normal()


@jax.custom_jvp
def _draw_in_custom_jvp(x):
    return _draw(x)


_draw_in_custom_jvp.defjvp(lambda primals, tangents: (_draw_in_custom_jvp(*primals), tangents[0]))

RAW = {
    "jit": lambda x: jax.jit(_draw)(x),
    "scan": lambda x: jax.lax.scan(lambda c, _: (_draw(c), None), x, length=2)[0],
    "fori_loop": lambda x: jax.lax.fori_loop(0, 2, lambda i, c: _draw(c), x),
    "cond": lambda x: jax.lax.cond(x > 0, _draw, lambda y: y, x),
    "checkpoint": lambda x: jax.checkpoint(_draw)(x),
    "jax.vmap": lambda x: jax.vmap(_draw)(jnp.stack([x, x]))[0],
    "custom_jvp": lambda x: _draw_in_custom_jvp(x),
}

WRITE_REFUSED = (
    r"{api}: RandomState 'noise' \(shape \(2,\)\) is written \(or drawn from\) inside a JAX transform "
    r"that statemap does not manage .* Use statemap's own transform instead \(statemap.jit, statemap.scan"
)


@pytest.mark.parametrize("raw", RAW)
def test_drawing_inside_a_raw_transform_within_a_mapping_is_refused(raw):
    saved = snapshot([NOISE])
    with pytest.raises(statemap.StatemapError, match=WRITE_REFUSED.format(api="statemap.vmap")):
        statemap.vmap(RAW[raw])(jnp.ones(LANES))
    assert_unchanged(saved)


@pytest.mark.parametrize("raw", ["scan", "jit"])
def test_drawing_inside_a_raw_transform_within_statemap_jit_is_refused(raw):
    saved = snapshot([NOISE])
    with pytest.raises(statemap.StatemapError, match=WRITE_REFUSED.format(api="statemap.jit")):
        statemap.jit(RAW[raw])(jnp.float32(1))
    assert_unchanged(saved)


def test_a_write_in_a_raw_scan_body_that_the_lane_writes_again_is_refused():
    h = statemap.HiddenState(jnp.zeros((LANES, N)), name="hs")

    def lane(x):
        def body(c, _):
            h.value = h.value + c
            return c, h.value.sum()

        _, ys = jax.lax.scan(body, x, length=2)
        h.value = h.value + 1
        return ys

    saved = snapshot([h])
    message = r"statemap.vmap: HiddenState 'hs' .*is written \(or drawn from\) inside"
    with pytest.raises(statemap.StatemapError, match=message):
        statemap.vmap(lane, state_in_axes=statemap.HiddenState)(jnp.ones(LANES))
    assert_unchanged(saved)


# Rule 14: statemap transforms under raw JAX transforms.

TRACER_REFUSED = (
    r"{api}: called inside a JAX transformation that statemap does not manage "
    r".*would be left holding that transformation's tracers"
)


def _writing_mappings():
    acc = statemap.HiddenState(jnp.zeros(LANES), name="acc")

    def lane(x):
        acc.value = acc.value + x
        return jnp.float32(1.0), (x * acc.value).sum()

    return acc, {
        "statemap.vmap": statemap.vmap(lane, state_in_axes=statemap.HiddenState),
        "statemap.jit": statemap.jit(lane),
    }


RAISING = {
    "grad": lambda f, x: jax.grad(lambda x: f(x)[1].sum())(x),
    "vmap": lambda f, x: jax.vmap(f)(jnp.stack([x, x])),
    "jvp": lambda f, x: jax.jvp(f, (x,), (jnp.ones_like(x),)),
    "vmap-constant-output-only": lambda f, x: jax.vmap(lambda y: f(y)[0])(jnp.stack([x, x])),
}


@pytest.mark.parametrize("raw", RAISING)
@pytest.mark.parametrize("api", ["statemap.vmap", "statemap.jit"])
def test_a_writing_transform_with_a_constant_first_output_under_raw_jax_leaves_no_tracer(raw, api):
    acc, transforms = _writing_mappings()
    saved = snapshot([acc])
    with pytest.raises(statemap.StatemapError, match=TRACER_REFUSED.format(api=api) + r".*"):
        RAISING[raw](transforms[api], jnp.arange(LANES, dtype=jnp.float32))
    assert_unchanged(saved)


BAKED = (
    r"{api}: called inside a JAX transformation that statemap does not manage and that stages a program "
    r".*the current value of ParamState 'w' \(shape \(3,\)\) would be baked into that program as a constant"
)


@pytest.mark.parametrize("api", ["statemap.vmap", "statemap.jit"])
def test_a_read_only_transform_under_raw_jit_refuses_to_bake_values(api):
    w = statemap.ParamState(jnp.ones(N), name="w")
    layer = {"statemap.vmap": statemap.vmap, "statemap.jit": statemap.jit}[api](lambda x: x * w.value)
    x = jnp.ones((LANES, N))
    assert_tree_allclose(layer(x), x)
    evaluate = jax.jit(lambda x: layer(x))
    with pytest.raises(statemap.StatemapError, match=BAKED.format(api=api)):
        evaluate(x)


def test_a_state_free_transform_under_raw_jit_works():
    double = statemap.jit(lambda x: 2 * x)
    assert_tree_allclose(jax.jit(lambda x: double(x) + 1)(jnp.ones(N)), 3 * jnp.ones(N))


# A RandomState passed as an argument.


def test_a_random_state_argument_with_in_axes_none_gets_per_lane_keys():
    rng = statemap.RandomState(4, name="arg_rng")
    parent = rng.value
    draws = statemap.vmap(lambda r, x: x + r.normal((N,)), in_axes=(None, 0))(rng, jnp.zeros((LANES, N)))
    new, expected = lane_normals(parent)
    assert_tree_allclose(draws, expected)
    assert not np.allclose(draws[0], draws[1])
    assert_keys_equal(rng.value, new)


def test_a_random_state_argument_mapped_on_axis_0_names_in_axes():
    rng = statemap.RandomState(4, name="arg_rng")
    saved = snapshot([rng])
    with pytest.raises(
        statemap.BatchAxisError,
        match=r"statemap.vmap: `in_axes` maps argument args\[0\], RandomState 'arg_rng' .*on axis 0, but it holds "
        r"a single key\. Pass `None` for it in `in_axes`",
    ):
        statemap.vmap(lambda r, x: x + r.normal((N,)))(rng, jnp.zeros((LANES, N)))
    assert_unchanged(saved)


def test_a_writing_mapping_under_raw_jit_is_refused_and_changes_nothing():
    acc, transforms = _writing_mappings()
    saved = snapshot([acc])
    message = r"statemap.vmap: called inside a JAX transformation .*HiddenState 'acc'"
    with pytest.raises(statemap.StatemapError, match=message):
        jax.jit(transforms["statemap.vmap"])(jnp.ones(LANES))
    assert_unchanged(saved)


# Statemap loops under raw JAX transforms.


def test_a_loop_reading_a_state_under_raw_jit_refuses_to_bake_it():
    w = statemap.ParamState(jnp.ones(N), name="w")
    run = jax.jit(lambda xs: statemap.scan(lambda c, x: (c + x * w.value, None), jnp.zeros(N), xs)[0])
    with pytest.raises(statemap.StatemapError, match=BAKED.format(api="statemap.scan")):
        run(jnp.ones((2, N)))


def test_a_state_free_loop_under_raw_jit_works():
    run = jax.jit(lambda xs: statemap.scan(lambda c, x: (c + x, c), jnp.float32(0), xs))
    carry, ys = run(jnp.arange(4, dtype=jnp.float32))
    assert_tree_allclose((carry, ys), jax.lax.scan(lambda c, x: (c + x, c), jnp.float32(0), jnp.arange(4.0)))


@pytest.mark.parametrize("raw", ["grad", "vmap"])
def test_a_loop_writing_a_state_under_raw_grad_or_vmap_leaves_no_tracer(raw):
    h = statemap.HiddenState(jnp.zeros(N), name="hl")

    def body(x):
        h.value = h.value + x
        return h.value.sum()

    xs = jnp.ones((2, N))
    saved = snapshot([h])
    with pytest.raises(statemap.StatemapError, match=TRACER_REFUSED.format(api="statemap.for_loop")):
        if raw == "grad":
            jax.grad(lambda xs: statemap.for_loop(body, xs).sum())(xs)
        else:
            jax.vmap(lambda xs: statemap.for_loop(body, xs))(jnp.stack([xs, xs]))
    assert_unchanged(saved)


def test_a_loop_only_reading_states_under_raw_grad_matches_jax():
    w = statemap.ParamState(jnp.float32(1.5), name="w")
    grad = jax.grad(lambda x: statemap.fori_loop(0, 3, lambda i, c: c * w.value + 1, x))(jnp.float32(2))
    assert_tree_allclose(grad, 1.5**3)


# First reads deep inside raw JAX, and warm calls after the state changed.


def test_a_first_read_inside_raw_jax_is_an_input_of_the_plan():
    w = statemap.ParamState(jnp.float32(2), name="w")

    @jax.jit
    def scale(x):
        return x * w.value

    step = statemap.jit(lambda x: jax.lax.cond(x > 0, scale, lambda y: y, x) + scale(x))
    def body(c, x):
        return jax.lax.cond(x > 0, lambda y: y * w.value, lambda y: y, c), None

    loop = statemap.jit(lambda xs: statemap.scan(body, 1.0, xs)[0])
    for value in [2.0, 5.0]:
        w.value = jnp.float32(value)
        assert_tree_allclose(step(jnp.float32(1)), 2 * value)
        assert_tree_allclose(loop(jnp.ones(2)), value**2)


@pytest.mark.parametrize("api", ["statemap.vmap", "statemap.jit"])
def test_a_read_only_transform_under_raw_grad_and_vmap_gives_jaxs_numbers(api):
    w = statemap.ParamState(jnp.arange(1.0, N + 1), name="w")
    layer = {"statemap.vmap": statemap.vmap, "statemap.jit": statemap.jit}[api](lambda x: jnp.sin(x) * w.value)
    x = jnp.ones((LANES, N))
    pure = lambda x: jnp.sin(x) * jnp.arange(1.0, N + 1)  # noqa: E731
    assert_tree_allclose(jax.grad(lambda x: layer(x).sum())(x), jax.grad(lambda x: pure(x).sum())(x))
    assert_tree_allclose(jax.vmap(layer)(jnp.stack([x, 2 * x])), jax.vmap(pure)(jnp.stack([x, 2 * x])))
    w.value = jnp.ones(N)  # no cached program holds the old weights
    assert_tree_allclose(jax.grad(lambda x: layer(x).sum())(x), jnp.cos(x))
