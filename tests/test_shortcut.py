"""Repeated calls take a shortcut past the plan lookup: it must never run the wrong plan.

Each test calls a transform three times with the same signature (so that the
shortcut is in place), then changes something between calls that needs
another plan, or that only the long way handles, and checks the result
against a pure-JAX oracle and the number of times the function ran.
"""

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SequentialMapping, assert_concrete, assert_tree_allclose, assert_unchanged, counted, run_threads, snapshot
from jax.sharding import Mesh

import statemap

N = 4  # lanes, one per device for pmap and shard_map


def _shard_map(fn):
    return statemap.shard_map(fn, "i", mesh=Mesh(np.array(jax.devices()[:N]), ("i",)))


MAPPINGS = {
    "vmap": statemap.vmap,
    "pmap": statemap.pmap,
    "shard_map": _shard_map,
    "map": lambda fn: lambda *xs: statemap.map(fn, *xs, batch_size=3),
    "custom": SequentialMapping,
}
RESIZABLE = ["vmap", "pmap", "map", "custom"]  # shard_map's size is its mesh's


class Model:
    """A scale read, a hidden state written (split), a counter written (broadcast)."""

    def __init__(self, lanes=N):
        self.scale = statemap.ParamState(jnp.float32(2.0), name="scale")
        self.h = statemap.HiddenState(jnp.zeros((lanes, 3)), name="h")
        self.count = statemap.State(jnp.int32(0), name="count")

    def step(self, x):
        self.h.value = self.h.value * 0.5 + x * self.scale.value
        self.count.value = self.count.value + 1
        return self.h.value.sum()


def oracle_step(h, x, scale):
    new_h = h * 0.5 + x * scale
    return new_h.sum(axis=-1), new_h


def build(kind, model):
    fn = counted(model.step)
    make = MAPPINGS[kind]
    if kind == "map":
        return fn, lambda x: statemap.map(fn, x, batch_size=3, state_in_axes=statemap.HiddenState)
    if kind == "custom":
        return fn, SequentialMapping(fn, state_in_axes=statemap.HiddenState)
    if kind == "shard_map":
        return fn, statemap.shard_map(
            fn, "i", mesh=Mesh(np.array(jax.devices()[:N]), ("i",)), state_in_axes=statemap.HiddenState
        )
    return fn, make(fn, state_in_axes=statemap.HiddenState)


def check_step(model, run, x):
    h = model.h.value
    count = model.count.value
    out = run(x)
    want_out, want_h = oracle_step(h, x, model.scale.value)
    assert_tree_allclose(out, want_out)
    assert_tree_allclose(model.h.value, want_h)
    assert int(model.count.value) == int(count) + 1


def warm_up(model, run, x, times=3):
    for _ in range(times):
        check_step(model, run, x)


@pytest.mark.parametrize("kind", list(MAPPINGS))
def test_repeated_calls_trace_once_and_match_the_oracle(kind):
    model = Model()
    fn, run = build(kind, model)
    warm_up(model, run, jnp.ones((N, 3)), times=5)
    assert fn.runs == 1


@pytest.mark.parametrize("kind", RESIZABLE)
def test_another_batch_size_after_repeated_calls(kind):
    model = Model()
    fn, run = build(kind, model)
    warm_up(model, run, jnp.ones((N, 3)))
    model.h.value = jnp.ones((2, 3))
    check_step(model, run, jnp.full((2, 3), 3.0))  # fewer lanes: another plan
    assert fn.runs == 2
    check_step(model, run, jnp.full((2, 3), 3.0))
    model.h.value = jnp.zeros((N, 3))
    check_step(model, run, jnp.ones((N, 3)))  # the first plan again, not traced anew
    assert fn.runs == 2


@pytest.mark.parametrize("kind", list(MAPPINGS))
def test_a_state_of_another_shape_after_repeated_calls(kind):
    model = Model()
    fn, run = build(kind, model)
    warm_up(model, run, jnp.ones((N, 3)))
    model.scale.value = jnp.full((3,), 2.0)  # was a scalar
    check_step(model, run, jnp.ones((N, 3)))
    assert fn.runs == 2


@pytest.mark.parametrize("kind", list(MAPPINGS))
def test_a_weakly_typed_state_after_repeated_calls(kind):
    model = Model()
    fn, run = build(kind, model)
    x = jnp.ones((N, 3), jnp.bfloat16)
    model.h.value = jnp.zeros((N, 3), jnp.bfloat16)
    model.scale.value = jnp.float32(2.0)
    for _ in range(3):
        run(x)
    assert model.h.value.dtype == jnp.float32  # bfloat16 * float32 state
    model.h.value = jnp.zeros((N, 3), jnp.bfloat16)
    model.scale.value = 2.0  # weak: bfloat16 wins, as in JAX
    run(x)
    assert model.h.value.dtype == jnp.bfloat16
    assert fn.runs == 3


@pytest.mark.parametrize("kind", ["vmap", "custom"])
def test_a_weakly_typed_argument_after_repeated_calls(kind):
    s = statemap.State(jnp.ones(2, jnp.int8))
    make = MAPPINGS[kind]
    fn = counted(lambda x: s.value + x)
    run = make(fn, in_axes=None, axis_size=2) if kind == "vmap" else SequentialMapping(fn, in_axes=None, axis_size=2)
    oracle = jax.vmap(lambda x: jnp.ones(2, jnp.int8) + x, in_axes=None, axis_size=2)
    for _ in range(3):
        assert run(3).dtype == jnp.int8
    out = run(jnp.int32(3))
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, oracle(jnp.int32(3)))
    assert fn.runs == 2


@pytest.mark.parametrize("kind", ["vmap", "custom", "shard_map"])
def test_jax_settings_changed_after_repeated_calls(kind):
    half = statemap.State(jnp.int32(2))
    fn = counted(lambda x: x * half.value + 0.5)
    run = SequentialMapping(fn) if kind == "custom" else MAPPINGS[kind](fn)
    x = jnp.arange(N, dtype=jnp.int32)
    for _ in range(3):
        assert run(x).dtype == jnp.float32
    with jax.enable_x64(True):
        out = run(x)
        assert out.dtype == jnp.float64
        np.testing.assert_array_equal(out, np.arange(N) * 2 + 0.5)
    assert run(x).dtype == jnp.float32
    assert fn.runs == 2


@pytest.mark.parametrize("kind", ["vmap", "custom"])
def test_matmul_precision_changed_after_repeated_calls(kind):
    w = statemap.State(jnp.eye(2))
    fn = counted(lambda x: x @ w.value)
    run = SequentialMapping(fn) if kind == "custom" else statemap.vmap(fn)
    x = jnp.ones((3, 2))
    for _ in range(3):
        run(x)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_array_equal(run(x), x)
        assert fn.runs == 2


@pytest.mark.parametrize("kind", ["vmap", "jit", "custom"])
def test_the_random_seed_offset_changed_after_repeated_calls(kind):
    """A setting ``jax.jit`` keys on that changes what a trace draws, not its shapes."""
    total = statemap.State(jnp.zeros(2))

    def draw(x):
        total.value = total.value + jax.random.normal(jax.random.key(0), (2,))
        return x + jax.random.normal(jax.random.key(0), (2,))

    fn = counted(draw)
    run = {
        "vmap": lambda: statemap.vmap(fn, in_axes=None, axis_size=2),
        "jit": lambda: statemap.jit(fn),
        "custom": lambda: SequentialMapping(fn, in_axes=None, axis_size=2),
    }[kind]()
    x = jnp.zeros(2)
    for _ in range(3):
        run(x)
    before = jax.config.jax_random_seed_offset
    jax.config.update("jax_random_seed_offset", 7)
    try:
        total.value = jnp.zeros(2)
        expected = jax.random.normal(jax.random.key(0), (2,))  # eager, under the new offset
        out = run(x)
    finally:
        jax.config.update("jax_random_seed_offset", before)
    np.testing.assert_allclose(out if kind == "jit" else out[0], expected, rtol=1e-6)
    np.testing.assert_allclose(total.value, expected, rtol=1e-6)
    assert fn.runs == 2


def test_explicit_x64_dtypes_changed_after_repeated_calls():
    fn = counted(lambda x: x.astype(jnp.float64) / 3)
    run = statemap.vmap(fn)
    x = jnp.ones((2, 2), jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JAX warns that float64 is float32 without x64
        for _ in range(3):
            assert run(x).dtype == jnp.float32
        before = jax.config.jax_explicit_x64_dtypes
        jax.config.update("jax_explicit_x64_dtypes", "allow")
        try:
            out = run(x)
        finally:
            jax.config.update("jax_explicit_x64_dtypes", before)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, np.full((2, 2), 1 / 3))
    assert fn.runs == 2


@pytest.mark.parametrize("kind", ["vmap", "custom"])
def test_default_prng_impl_changed_after_repeated_calls(kind):
    """``jax.jit`` does not key on this setting: the shortcut checks it itself."""
    fn = counted(lambda x: x + jax.random.key_data(jax.random.key(1)).size)
    run = (
        SequentialMapping(fn, in_axes=None, axis_size=2)
        if kind == "custom"
        else statemap.vmap(fn, in_axes=None, axis_size=2)
    )
    x = jnp.uint32(1)
    for _ in range(3):
        np.testing.assert_array_equal(run(x), [3, 3])
    before = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        np.testing.assert_array_equal(run(x), [5, 5])
    finally:
        jax.config.update("jax_default_prng_impl", before)
    assert fn.runs == 2


@pytest.mark.parametrize("kind", ["vmap", "pmap", "custom"])
def test_a_state_passed_as_the_argument_after_repeated_calls(kind):
    scale = statemap.State(jnp.float32(3.0))
    make = MAPPINGS[kind]
    run = make(lambda x: (x.value if isinstance(x, statemap.State) else x) * scale.value)
    x = jnp.arange(N, dtype=jnp.float32)
    for _ in range(3):
        np.testing.assert_array_equal(run(x), x * 3.0)
    held = statemap.State(x + 1)  # a State is read inside, as if closed over
    np.testing.assert_array_equal(run(held), (x + 1) * 3.0)


@pytest.mark.parametrize("kind", ["vmap", "pmap", "custom"])
def test_another_pytree_of_arguments_after_repeated_calls(kind):
    fn = counted(lambda tree: jax.tree.map(lambda v: v * 2.0, tree))
    run = MAPPINGS[kind](fn)
    a, b = jnp.ones(N), jnp.arange(N, dtype=jnp.float32)
    for _ in range(3):
        assert_tree_allclose(run({"a": a}), {"a": a * 2})
    assert_tree_allclose(run({"a": a, "b": b}), {"a": a * 2, "b": b * 2})
    assert_tree_allclose(run((a,)), (a * 2,))
    for _ in range(3):
        assert_tree_allclose(run(a), a * 2)
    assert_tree_allclose(run({"b": b}), {"b": b * 2})  # one array where one array was: another tree
    assert_tree_allclose(run([a]), [a * 2])
    assert fn.runs == 6


@pytest.mark.parametrize("kind", ["vmap", "pmap", "custom"])
def test_numpy_and_python_arguments_after_repeated_calls(kind):
    offset = statemap.State(jnp.float32(1.0))
    run = MAPPINGS[kind](lambda x: x + offset.value)
    x = np.arange(N, dtype=np.float32)
    for _ in range(3):
        np.testing.assert_array_equal(run(x), x + 1)
    np.testing.assert_array_equal(run(jnp.asarray(x)), x + 1)
    np.testing.assert_array_equal(run(x.astype(np.int32)), x + 1)


def test_keyword_arguments_after_repeated_positional_calls():
    fn = counted(lambda x, y=None: x * 2 if y is None else x * y)
    run = statemap.vmap(fn)
    x = jnp.arange(3.0)
    for _ in range(3):
        np.testing.assert_array_equal(run(x), x * 2)
    np.testing.assert_array_equal(run(x, y=x), x * x)
    np.testing.assert_array_equal(run(x), x * 2)
    assert fn.runs == 2


def test_inside_jax_jit_after_repeated_calls_refuses_to_bake_states():
    model = Model()
    _, run = build("vmap", model)
    warm_up(model, run, jnp.ones((N, 3)))
    saved = snapshot([model.h, model.count, model.scale])
    with pytest.raises(statemap.errors.StatemapError, match="baked into that program"):
        jax.jit(run)(jnp.ones((N, 3)))
    assert_unchanged(saved)


def test_inside_jax_vmap_after_repeated_calls_runs_the_long_way():
    scale = statemap.State(jnp.float32(2.0))
    run = statemap.vmap(lambda x: x * scale.value)
    x = jnp.ones((2, N))
    for _ in range(3):
        run(x[0])
    np.testing.assert_array_equal(jax.vmap(run)(x), x * 2)


def test_under_a_state_trace_after_repeated_calls():
    model = Model()
    _, run = build("vmap", model)
    warm_up(model, run, jnp.ones((N, 3)))
    before = model.h.value
    with statemap.StateTrace() as trace:
        check_step(model, run, jnp.ones((N, 3)))
    assert {s.name for s in trace.written} == {"h", "count"}
    trace.restore()
    assert model.h.value is before


def test_incompatible_devices_after_repeated_calls_explained_and_nothing_written():
    devices = jax.devices()
    model = Model()
    _, run = build("vmap", model)
    x = jax.device_put(jnp.ones((N, 3)), devices[0])
    model.scale.value = jax.device_put(model.scale.value, devices[0])
    warm_up(model, run, x)
    model.scale.value = jax.device_put(jnp.float32(2.0), devices[1])
    saved = snapshot([model.h, model.count, model.scale])
    with pytest.raises(ValueError, match=r"statemap\.vmap: incompatible devices: the arguments are on device"):
        run(x)
    assert_unchanged(saved)


def test_a_mapping_rebuilt_inline_takes_the_shortcut_of_the_last():
    model = Model()
    fn = counted(model.step)
    for _ in range(4):
        check_step(model, lambda x: statemap.vmap(fn, state_in_axes=statemap.HiddenState)(x), jnp.ones((N, 3)))
    assert fn.runs == 1


def test_threads_with_other_batch_sizes_share_a_mapping():
    scale = statemap.State(jnp.float32(3.0))
    fn = counted(lambda x: x * scale.value)
    run = statemap.vmap(fn)
    sizes = [2, 3, 5, 7]

    def work(i):
        x = jnp.arange(sizes[i], dtype=jnp.float32)
        for _ in range(40):
            np.testing.assert_array_equal(run(x), x * 3)

    run_threads(work, len(sizes))
    assert fn.runs == len(sizes)


def test_jit_after_repeated_calls_with_another_shape():
    total = statemap.State(jnp.zeros(()))

    @statemap.jit
    def add(x):
        total.value = total.value + x.sum()
        return x * 2

    for _ in range(3):
        np.testing.assert_array_equal(add(jnp.ones(3)), jnp.full(3, 2.0))
    np.testing.assert_array_equal(add(jnp.ones((2, 2))), jnp.full((2, 2), 2.0))
    assert float(total.value) == 13.0


class SequentialVMap(statemap.VMapMapping):
    """vmap with a program of its own that, like SequentialMapping's, runs any number of lanes it is given."""

    _map = SequentialMapping._map


def test_a_subclass_that_builds_its_own_programs_is_checked_unless_it_vouches_for_them():
    class Renamed(statemap.VMapMapping):
        api = "Renamed"

    class Vouched(SequentialVMap):
        programs_check_inputs = True

    assert Renamed.programs_check_inputs and Vouched.programs_check_inputs
    assert not SequentialVMap.programs_check_inputs


RESIZES = {
    "vmap": (statemap.vmap, 4, 2),
    "pmap": (statemap.pmap, 4, 2),
    "map, batch 3, 6 to 9 lanes": (lambda f, **kw: lambda x: statemap.map(f, batch_size=3, **kw), 6, 9),
    "map, batch 3, 6 to 12 lanes": (lambda f, **kw: lambda x: statemap.map(f, batch_size=3, **kw), 6, 12),
    "map, batch 2, 4 to 6 lanes": (lambda f, **kw: lambda x: statemap.map(f, batch_size=2, **kw), 4, 6),
    "custom, 4 to 2 lanes": (SequentialMapping, 4, 2),
    "custom, 2 to 4 lanes": (SequentialMapping, 2, 4),
    "vmap subclass with its own program, 4 to 2 lanes": (SequentialVMap, 4, 2),
}


# The wrong program, run with the old plan's donations, also makes JAX warn;
# the suite turns warnings into errors, which would hide the wrong numbers.
@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
@pytest.mark.parametrize("calls", [1, 3], ids=["second call", "fourth call"])
@pytest.mark.parametrize("kind", list(RESIZES))
def test_a_split_state_with_another_number_of_lanes_and_the_same_arguments(kind, calls):
    """Only the state gives the axis size: the plan for the old size must not run the new one."""
    make, before, after = RESIZES[kind]
    h = statemap.HiddenState(jnp.zeros((before, 3)), name="h")

    def step(x=None):
        h.value = h.value + 1.0
        return h.value.sum()

    if kind.startswith("map"):
        run = make(step, state_in_axes=statemap.HiddenState)
    else:
        run = make(step, in_axes=None, state_in_axes=statemap.HiddenState)
    x = jnp.ones(3)
    for _ in range(calls):
        run(x)
    start = jnp.arange(after * 3.0).reshape(after, 3)
    h.value = start
    out = run(x)
    assert out.shape == (after,)
    assert_tree_allclose(out, (start + 1).sum(axis=1))
    assert_tree_allclose(h.value, start + 1)


def test_signatures_that_keep_changing_retrace_the_program_once(caplog):
    """Trusting a program to refuse other inputs costs one failed JAX retrace; then the shortcut checks."""
    scale = statemap.State(jnp.float32(2.0))
    fn = counted(lambda x: x * scale.value)
    run = statemap.vmap(fn)
    a, b = jnp.ones((4, 2)), jnp.ones((3, 2))
    for _ in range(3):
        run(a)
    jax.config.update("jax_explain_cache_misses", True)
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(10):
                np.testing.assert_array_equal(run(a), a * 2)
                np.testing.assert_array_equal(run(b), b * 2)
    finally:
        jax.config.update("jax_explain_cache_misses", False)
    misses = [r for r in caplog.records if "TRACING CACHE MISS" in r.getMessage()]
    assert len(misses) == 2  # the refused retrace, then the new plan's program
    assert fn.runs == 2


@pytest.mark.parametrize("kind", ["vmap", "pmap", "shard_map", "custom"])
def test_a_numpy_argument_changed_in_place_between_calls(kind):
    """NumPy arrays are mutable: a copy on the devices must never stand in for a later call's contents."""
    offset = statemap.State(jnp.float32(1.0))
    run = MAPPINGS[kind](lambda x: x + offset.value)
    buffer = np.zeros(N, np.float32)
    for step in range(4):
        buffer[:] = step
        np.testing.assert_array_equal(run(buffer), np.full(N, step + 1.0))


def test_a_mapping_with_its_shortcut_in_place_inside_jit_a_loop_and_grad():
    """The same mapping, warm at top level, then inside statemap.jit, a compiled loop and grad, then warm again."""
    w = statemap.ParamState(jnp.array([0.5, -1.0]), name="w")
    h = statemap.HiddenState(jnp.zeros((N, 2)), name="h")

    def cell(x):
        h.value = jnp.tanh(h.value * w.value + x)
        return (h.value * w.value).sum()

    def oracle(h, x, w):
        new = jnp.tanh(h * w + x)
        return (new * w).sum(axis=-1), new

    fn = counted(cell)
    step = statemap.vmap(fn, state_in_axes=statemap.HiddenState)
    x = jnp.linspace(-1.0, 1.0, N * 2).reshape(N, 2)
    want_h = h.value

    def check_top_level():
        nonlocal want_h
        out, want_h = oracle(want_h, x, w.value)
        assert_tree_allclose(step(x), out)
        assert_tree_allclose(h.value, want_h)

    for _ in range(3):
        check_top_level()
    jitted = statemap.jit(lambda x: step(x).sum())
    for _ in range(2):
        out, want_h = oracle(want_h, x, w.value)
        assert_tree_allclose(jitted(x), out.sum())
        assert_tree_allclose(h.value, want_h)
    xs = jnp.stack([x, -x, 2 * x])
    outs = statemap.jit(lambda xs: statemap.for_loop(step, xs))(xs)
    for t in range(3):
        out, want_h = oracle(want_h, xs[t], w.value)
        assert_tree_allclose(outs[t], out)
    assert_tree_allclose(h.value, want_h)
    grads = statemap.grad(lambda x: step(x).sum(), w)(x)
    assert_tree_allclose(grads, jax.grad(lambda w: oracle(want_h, x, w)[0].sum())(w.value))
    _, want_h = oracle(want_h, x, w.value)
    assert_tree_allclose(h.value, want_h)  # the forward pass wrote the hidden state
    for _ in range(2):
        check_top_level()
    assert_concrete([h, w])


def test_warm_calls_inside_jax_vmap_leave_no_shortcut_into_jax_jit():
    """A shortcut made inside a raw JAX transform would skip the check for states baked into jax.jit."""
    s = statemap.State(jnp.float32(1.0))
    run = statemap.vmap(lambda x: x * s.value)
    x = jnp.ones((2, 3))
    for _ in range(3):
        np.testing.assert_array_equal(jax.vmap(run)(x), x)
    with pytest.raises(statemap.errors.StatemapError, match="baked into that program"):
        jax.jit(run)(x[0])


@pytest.mark.parametrize("warm_first", [False, True], ids=["cold", "after warm calls"])
def test_grad_through_a_mapping_whose_plan_donates_outside(warm_first):
    """Outside any transform a plan donates the old hidden state; under grad that buffer is grad's own."""
    w = statemap.ParamState(jnp.array([0.5, -1.0]), name="w")
    h = statemap.HiddenState(jnp.zeros((N, 2)), name="h")

    def cell(x):
        h.value = jnp.tanh(h.value * w.value + x)
        return (h.value * w.value).sum()

    step = statemap.vmap(cell, state_in_axes=statemap.HiddenState)
    x = jnp.linspace(-1.0, 1.0, N * 2).reshape(N, 2)
    if warm_first:
        for _ in range(3):
            step(x)
    before = h.value
    grads = statemap.grad(lambda x: step(x).sum(), w)(x)
    want = jax.grad(lambda w: (jnp.tanh(before * w + x) * w).sum())(w.value)
    assert_tree_allclose(grads, want)
    assert_tree_allclose(h.value, jnp.tanh(before * w.value + x))
    step(x)  # and the top-level plan still runs
    assert_concrete([h, w])
