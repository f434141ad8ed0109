"""Written states' old buffers are donated to the program, unless someone else holds them.

A donated buffer is seen reused in place (the new value lives at the old
value's address): holding the old array to check it would itself keep it
from being donated (that is the second test). The oracle is the same update
in plain JAX.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compiles

import statemap

N = 8
AX = "i"
KINDS = ["vmap", "pmap", "shard_map", "map", "jit"]


def family():
    """A split state written in place, a broadcast one written, and one only read."""
    h = statemap.HiddenState(jnp.arange(N * 3, dtype=jnp.float32).reshape(N, 3) / 10, name="h")
    count = statemap.State(jnp.zeros((), jnp.int32), name="count")
    w = statemap.ParamState(jnp.full((3,), 0.5, jnp.float32), name="w")
    return h, count, w


def transformed(kind, fn):
    """``fn`` under ``kind``, hidden states split when mapped."""
    if kind == "jit":
        return statemap.jit(fn)
    kw = {"state_in_axes": statemap.HiddenState}
    if kind == "map":
        return statemap.LaxMapMapping(fn, batch_size=3, **kw)
    return getattr(statemap, kind)(fn, axis_name=AX, **kw)


def stepper(kind, h, count, w):
    def step(x):
        h.value = h.value * w.value + x
        count.value = count.value + 1
        return h.value.sum()

    return transformed(kind, step)


def buffers(value):
    """Where ``value``'s shards live in memory."""
    return [shard.data.unsafe_buffer_pointer() for shard in value.addressable_shards]


def run(step, x):
    return jax.block_until_ready(step(x))


def oracle_h(h0, w, x, steps):
    for _ in range(steps):
        h0 = h0 * w + x
    return h0


@pytest.mark.parametrize("kind", KINDS)
def test_written_states_are_donated_and_read_only_ones_are_not(kind):
    h, count, w = family()
    h0, w0 = np.asarray(h.value), np.asarray(w.value)
    x = jnp.ones((N, 3), jnp.float32)
    step = stepper(kind, h, count, w)
    run(step, x)  # places the states where the program keeps them
    old_w = w.value
    before = buffers(h.value)
    with compiles() as compiled:
        run(step, x)
    assert compiled == []
    assert w.value is old_w and not old_w.is_deleted()  # read only: never donated
    # Written in place: XLA reused the donated buffers (it may not bother for a
    # scalar such as ``count``, whose old buffer is freed all the same).
    assert buffers(h.value) == before
    np.testing.assert_allclose(np.asarray(h.value), oracle_h(h0, w0, np.ones((N, 3)), 2), rtol=1e-6)
    assert int(count.value) == 2


@pytest.mark.parametrize("kind", KINDS)
def test_a_value_someone_holds_is_not_donated(kind):
    h, count, w = family()
    x = jnp.ones((N, 3), jnp.float32)
    step = stepper(kind, h, count, w)
    run(step, x)
    kept = h.value
    expected = np.asarray(kept)
    with compiles() as compiled:
        run(step, x)
    assert compiled == []  # a first copy by device_put; the plan's program is the same
    assert not kept.is_deleted()
    np.testing.assert_array_equal(np.asarray(kept), expected)
    np.testing.assert_allclose(np.asarray(h.value), expected * 0.5 + 1, rtol=1e-6)
    held = [h.value]
    with compiles() as compiled:
        for _ in range(3):  # a loop keeping every step's state: a compiled copy, compiled once
            run(step, x)
            held.append(h.value)
    assert set(compiled) <= {"jit(_copy)"} and len(compiled) <= 1
    assert not kept.is_deleted() and not any(v.is_deleted() for v in held)
    np.testing.assert_allclose(np.asarray(held[0]), expected * 0.5 + 1, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_shape_or_dtype_donates_nothing_and_warns_nothing(kind):
    h, count, w = family()

    def step(x):
        h.value = jnp.concatenate([h.value, x], axis=-1)  # a new shape
        count.value = count.value.astype(jnp.float32) + 1  # a new dtype
        return x

    x = jnp.ones((N, 3), jnp.float32)
    mapping = transformed(kind, step)
    h0 = np.asarray(h.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(mapping, x)
    assert not [str(c.message) for c in caught]
    np.testing.assert_allclose(np.asarray(h.value), np.concatenate([h0, np.ones((N, 3))], axis=-1))
    assert count.value.dtype == jnp.float32 and float(count.value) == 1


def test_two_states_sharing_one_array_and_an_argument_state_keep_their_values():
    shared = jnp.arange(3.0)
    a, b = statemap.State(shared, name="a"), statemap.State(shared, name="b")
    del shared

    @statemap.jit
    def step(y):
        a.value = a.value + 1
        b.value = b.value * 2
        return y

    run(step, jnp.zeros(3))
    run(step, jnp.zeros(3))  # warm: a and b no longer share
    np.testing.assert_array_equal(np.asarray(a.value), np.arange(3.0) + 2)
    np.testing.assert_array_equal(np.asarray(b.value), np.arange(3.0) * 4)
    kept = a.value

    @statemap.jit
    def add(y):
        a.value = a.value + y
        return y

    run(add, kept)
    run(add, kept)  # warm: the argument is the state's old value
    assert not kept.is_deleted()
    np.testing.assert_array_equal(np.asarray(a.value), (np.arange(3.0) + 2) * 3)


def test_a_failed_call_with_effects_leaves_every_state_readable():
    h, count, w = family()
    fail = [False]

    def check(_):
        if fail[0]:
            raise ValueError("host says no")

    def step(x):
        jax.debug.callback(check, x)
        h.value = h.value * w.value + x
        count.value = count.value + 1
        return x

    mapping = transformed("vmap", step)
    x = jnp.ones((N, 3), jnp.float32)
    run(mapping, x)
    numbers = np.asarray(h.value), int(count.value)  # copies: no reference to the arrays
    fail[0] = True
    with pytest.raises(Exception, match="host says no"):
        run(mapping, x)
    np.testing.assert_array_equal(np.asarray(h.value), numbers[0])
    assert int(count.value) == numbers[1]
    fail[0] = False  # a good run replaces the failed run's token, which JAX would raise at exit
    run(mapping, x)
    assert int(count.value) == numbers[1] + 1


def test_inside_outer_traces_nothing_is_donated():
    h, count, w = family()

    def step(x):
        h.value = h.value + x
        return x

    inner = statemap.jit(step)
    run(inner, jnp.ones((N, 3)))
    numbers = np.asarray(h.value)
    # A raw JAX transform around a writing call is refused after the program ran.
    # That program is planned inside the transform, so it donates nothing and JAX
    # has no unusable donation to warn about (the suite turns warnings into errors).
    with pytest.raises(statemap.StatemapError, match="does not manage"):
        jax.vmap(inner)(jnp.ones((2, N, 3)))
    np.testing.assert_array_equal(np.asarray(h.value), numbers)
    # Under statemap's own transforms the inner program is traced, and the outer one donates.
    outer = statemap.jit(lambda x: inner(x) * 2)
    run(outer, jnp.ones((N, 3)))
    run(outer, jnp.ones((N, 3)))
    np.testing.assert_array_equal(np.asarray(h.value), numbers + 2)
    with statemap.StateTrace() as trace:  # a watcher, which keeps the values it saw
        run(inner, jnp.ones((N, 3)))
    assert trace.written == (h,)
    np.testing.assert_array_equal(np.asarray(h.value), numbers + 3)


def test_live_buffer_bytes_stay_flat():
    h, count, w = family()
    step = stepper("shard_map", h, count, w)
    x = jnp.ones((N, 3), jnp.float32)
    run(step, x)

    def live_bytes():
        return sum(a.nbytes for a in jax.live_arrays())

    run(step, x)
    start = live_bytes()
    for _ in range(5):
        run(step, x)
    assert live_bytes() == start


@pytest.mark.parametrize("kind", ["jit", "vmap"])
def test_an_interrupt_at_any_line_never_leaves_a_deleted_buffer(kind):
    from test_faults import InterruptAtLine, in_a_thread_of_its_own

    h, count, w = family()
    step = stepper(kind, h, count, w)
    x = jnp.ones((N, 3), jnp.float32)
    run(step, x)

    def sweep():
        counting = InterruptAtLine()
        assert not counting.run(lambda: run(step, x))
        for k in range(1, counting.lines + 1):
            before = np.asarray(h.value), int(count.value)  # numbers: the arrays stay unshared
            InterruptAtLine(k).run(lambda: run(step, x))
            assert not h.value.is_deleted() and not count.value.is_deleted()
            calls = int(count.value) - before[1]
            assert calls in (0, 1), k
            np.testing.assert_allclose(np.asarray(h.value), oracle_h(before[0], 0.5, 1.0, calls), rtol=1e-6)

    in_a_thread_of_its_own(sweep)


@pytest.mark.parametrize("kind", KINDS)
def test_a_host_callback_failing_on_a_warm_call_leaves_the_written_states(kind):
    """``jax.pure_callback`` has no effects, yet fails after dispatch: nothing is donated to it."""
    h, count, w = family()
    fail = [False]

    def host(x):
        if fail[0]:
            raise RuntimeError("host failure")
        return x

    def step(x):
        h.value = h.value * w.value + x
        count.value = count.value + 1
        return jax.pure_callback(host, jax.ShapeDtypeStruct(x.shape, x.dtype), x, vmap_method="sequential")

    mapping = transformed(kind, step)
    x = jnp.ones((N, 3), jnp.float32)
    for _ in range(2):
        run(mapping, x)
    before = np.asarray(h.value), int(count.value)
    fail[0] = True
    with pytest.raises(Exception, match="host failure"):
        run(mapping, x)
    np.testing.assert_array_equal(np.asarray(h.value), before[0])
    assert int(count.value) == before[1]


@pytest.mark.parametrize("kind", ["vmap", "jit"])
def test_under_debug_nans_a_nan_raises_and_leaves_the_written_states(kind):
    """JAX runs the function again on its inputs to find the NaN: nothing is donated then."""
    h, count, w = family()
    mapping = transformed(kind, lambda x: setattr(h, "value", jnp.log(h.value * x)) or x.sum())
    x = jnp.ones((N, 3), jnp.float32)
    for _ in range(2):
        run(mapping, x)  # log(0.5 * 1) and again: finite
    before = np.asarray(h.value)
    jax.config.update("jax_debug_nans", True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # JAX says it calls the de-optimized version
            with pytest.raises(FloatingPointError):
                run(mapping, -x)
    finally:
        jax.config.update("jax_debug_nans", False)
    np.testing.assert_array_equal(np.asarray(h.value), before)
