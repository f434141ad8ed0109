"""Long runs: warm calls keep memory flat, the plan cache is bounded, dead states' plans go.

Bounded for CI (hundreds of warm calls: a leak of one buffer or plan per
call shows as well as over thousands); the full 10,000-call
figures come from ``python benchmarks/bench_memory.py``.

Where a test needs the size of a mapping's plan cache it reads the private
attribute ``mapping._plans`` (a ``PlanCache`` with ``len()``). This is the one
place tests touch a private name: the cache's size is what is under test, and
counting Python runs of the function (used alongside) only shows misses.
"""

import gc
import tracemalloc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_concrete, assert_tree_allclose, assert_unchanged, snapshot

import statemap

B = 4
AX = "lanes"
WARM_CALLS = 500


def live_arrays():
    """The number of live device arrays after a full collection."""
    gc.collect()
    return len(jax.live_arrays())


def plan_count(mapping):
    return len(mapping._plans)  # private: see the module docstring


class Counted:
    """A function wrapper counting its Python runs."""

    def __init__(self, fn):
        self.fn = fn
        self.runs = 0
        self.__name__ = getattr(fn, "__name__", "counted")

    def __call__(self, *args, **kwargs):
        self.runs += 1
        return self.fn(*args, **kwargs)


def rnn_states():
    h = statemap.HiddenState(jnp.zeros((B, 3)), name="h")
    w = statemap.ParamState(jnp.full((3,), 0.5, jnp.float32), name="w")  # strong, as the write keeps it
    count = statemap.ShortTermState(jnp.int32(0), name="count")
    rng = statemap.RandomState(0, name="rng")
    typed = statemap.RandomState(jax.random.key(1), name="typed")
    return h, w, count, rng, typed


def test_warm_vmap_calls_keep_the_plan_cache_and_live_buffers_flat():
    h, w, count, rng, typed = rnn_states()

    def step(x):
        h.value = jnp.tanh(h.value * w.value + x) + 0.01 * rng.normal((3,)) + 0.01 * typed.uniform((3,))
        w.value = w.value + 0.001 * jax.lax.pmean(x, AX)
        count.value = count.value + 1
        return h.value.sum()

    fn = Counted(step)
    m = statemap.vmap(fn, axis_name=AX, state_in_axes={0: statemap.HiddenState})
    x = jnp.ones((B, 3))
    for _ in range(3):
        jax.block_until_ready(m(x))
    runs, plans, arrays = fn.runs, plan_count(m), live_arrays()
    for _ in range(WARM_CALLS):
        out = m(x)
    jax.block_until_ready((out, h.value, w.value, rng.value, typed.value))
    del out
    assert fn.runs == runs == 1
    assert plan_count(m) == plans == 1
    assert live_arrays() <= arrays
    assert int(count.value) == WARM_CALLS + 3
    assert_concrete([h, w, count, rng, typed])


def test_warm_pmap_calls_keep_the_plan_cache_and_live_buffers_flat():
    h, w, count, rng, typed = rnn_states()

    def step(x):
        h.value = jnp.tanh(h.value * w.value + x) + 0.01 * rng.normal((3,)) + 0.01 * typed.uniform((3,))
        w.value = w.value + 0.001 * jax.lax.pmean(x, AX)
        count.value = count.value + 1
        return h.value.sum()

    fn = Counted(step)
    m = statemap.pmap(fn, AX, state_in_axes={0: statemap.HiddenState})
    x = jnp.ones((B, 3))
    for _ in range(3):
        jax.block_until_ready(m(x))
    runs, plans, arrays = fn.runs, plan_count(m), live_arrays()
    for _ in range(300):
        jax.block_until_ready(m(x))  # sync every collective call (JAX-NOTES fact 10)
    assert fn.runs == runs
    assert plan_count(m) == plans
    assert live_arrays() <= arrays
    assert int(count.value) == 303


def test_refused_and_failing_calls_do_not_grow_anything():
    bad = statemap.ParamState(jnp.zeros(2), name="bad")
    rng = statemap.RandomState(0)

    def refused(x):
        bad.value = bad.value + x + rng.normal((2,))
        return x

    class Boom(Exception):
        pass

    def failing(x):
        bad.value = bad.value + x
        raise Boom("fails every time")

    refuse, fail = statemap.vmap(refused), statemap.vmap(failing)
    x = jnp.ones((B, 2))
    saved = snapshot([bad, rng])
    with pytest.raises(statemap.BatchAxisError):
        refuse(x)
    arrays = live_arrays()
    for _ in range(500):
        with pytest.raises(statemap.BatchAxisError, match="ParamState 'bad'"):
            refuse(x)
    for _ in range(50):
        with pytest.raises(Boom, match="fails every time"):
            fail(x)
    assert plan_count(refuse) == 1
    assert plan_count(fail) == 0
    assert live_arrays() <= arrays
    assert_unchanged(saved)


def test_the_plan_cache_is_bounded_over_many_signatures(monkeypatch):
    monkeypatch.setattr(statemap.VMapMapping, "plan_capacity", 64)
    fn = Counted(lambda x: x * 2)
    m = statemap.vmap(fn)
    sizes = []
    # NumPy arguments and explain(): new signatures are traced but never compiled.
    with pytest.warns(UserWarning, match=r"statemap\.vmap of .* has seen more than 64 call signatures") as seen:
        for n in range(1, 301):
            m.explain(np.zeros((n,), np.float32))
            sizes.append(plan_count(m))
    assert len(seen) == 1  # once per cache, not once per eviction
    assert fn.runs == 300
    assert max(sizes) == 64
    assert sizes[-100:] == [64] * 100  # full, and never above its bound
    m.explain(np.zeros((300,), np.float32))  # the newest signature is kept
    assert fn.runs == 300
    m.explain(np.zeros((1,), np.float32))  # the oldest was evicted
    assert fn.runs == 301
    assert plan_count(m) == 64


def test_a_mapping_rebuilt_around_the_same_function_reuses_its_plans():
    fn = Counted(lambda x: x * 2)
    for _ in range(3):
        np.testing.assert_allclose(statemap.vmap(fn)(jnp.ones(4)), 2.0)
    assert fn.runs == 1
    statemap.vmap(fn, in_axes=0, out_axes=0)(jnp.ones(4))  # the same options, spelled out
    assert fn.runs == 1
    statemap.vmap(fn, axis_name="other")(jnp.ones(4))  # other options: its own plans
    assert fn.runs == 2
    statemap.map(fn, jnp.ones(4), batch_size=2)
    statemap.map(fn, jnp.ones(4), batch_size=2)
    assert fn.runs == 3


def test_equal_but_distinct_functions_never_share_plans():
    scales = [statemap.State(jnp.float32(2.0)), statemap.State(jnp.float32(3.0))]

    class Scale:
        def __init__(self, i):
            self.i = i

        def __eq__(self, other):
            return True

        def __hash__(self):
            return 0

        def __call__(self, x):
            return x * scales[self.i].value

    np.testing.assert_allclose(statemap.vmap(Scale(0))(jnp.ones(2)), 2.0)
    np.testing.assert_allclose(statemap.vmap(Scale(1))(jnp.ones(2)), 3.0)


def test_the_plans_of_one_signature_are_bounded_over_many_state_shapes():
    s = statemap.State(np.zeros((1,), np.float32))
    fn = Counted(lambda x: x + s.value.sum())
    m = statemap.vmap(fn)
    x = np.zeros((B,), np.float32)
    sizes = []
    for n in range(1, 61):
        s.value = np.zeros((n,), np.float32)
        m.explain(x)
        sizes.append(plan_count(m))
    assert fn.runs == 60
    assert max(sizes) < 60
    assert sizes[-20:] == [max(sizes)] * 20


def test_plans_of_garbage_collected_states_are_dropped():
    holder = {}
    fn = Counted(lambda x: x * holder["s"].value)
    m = statemap.vmap(fn)
    x = jnp.ones(B)
    holder["s"] = statemap.ParamState(jnp.float32(2.0))
    assert_tree_allclose(m(x), jnp.full(B, 2.0))
    assert plan_count(m) == 1
    ref = weakref.ref(holder["s"])
    del holder["s"]
    gc.collect()
    assert ref() is None
    assert plan_count(m) == 0
    holder["s"] = statemap.ParamState(jnp.float32(3.0))
    assert_tree_allclose(m(x), jnp.full(B, 3.0))
    assert fn.runs == 2
    assert plan_count(m) == 1


def test_plans_of_states_passed_as_arguments_are_dropped():
    fn = Counted(lambda x, s: x * s.value)
    m = statemap.vmap(fn, in_axes=(0, None))
    x = np.ones((B,), np.float32)
    refs = []
    for k in range(100):
        s = statemap.ParamState(np.float32(k))
        m.explain(x, s)
        refs.append(weakref.ref(s))
        del s
    gc.collect()
    assert not any(ref() for ref in refs)
    assert plan_count(m) == 0
    keep = statemap.ParamState(jnp.float32(5.0))
    assert_tree_allclose(m(jnp.ones(B), keep), jnp.full(B, 5.0))
    assert plan_count(m) == 1


def test_created_states_of_many_calls_are_freed():
    m = statemap.vmap(lambda x: statemap.ParamState(x * 2))
    x = jnp.ones((B, 2))
    m(x)
    arrays = live_arrays()
    refs = []
    for _ in range(500):
        refs.append(weakref.ref(m(x)))
    assert live_arrays() <= arrays
    assert not any(ref() for ref in refs)


def build_and_drop_mappings(n):
    """Build ``n`` mappings, trace each once, drop it: (weakrefs to them, bytes kept per mapping).

    ``statemap.vmap(f)(x)`` inside a loop does this every step. ``explain``
    traces without compiling, to stay fast.
    """
    h = statemap.HiddenState(jnp.zeros((B, 3)), name="h")
    rng = statemap.RandomState(0)

    def step(x):
        h.value = h.value + x + rng.normal((3,))
        return h.value.sum()

    x = jnp.ones((B, 3))
    for _ in range(10):  # JAX's own first-use caches fill here
        statemap.vmap(step, state_in_axes=h).explain(x)
    mappings = []
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(n):
            m = statemap.vmap(step, state_in_axes=h)
            m.explain(x)
            mappings.append(weakref.ref(m))
            del m
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return mappings, grown / n


def test_mappings_built_and_dropped_in_a_loop_are_freed():
    mappings, _ = build_and_drop_mappings(20)
    assert not any(ref() for ref in mappings)


def test_mappings_built_and_dropped_in_a_loop_do_not_grow_memory():
    # Nothing of a dropped mapping may stay behind, in statemap or in JAX's
    # caches: a mapping rebuilt around the same function reuses the plans of
    # the earlier one, so the loop traces once.
    _, kept = build_and_drop_mappings(50)
    assert kept < 8 * 1024, f"{kept / 1024:.1f} KiB kept per traced mapping"


def _scale(x):
    return x * 2.0


def test_inline_mappings_naming_new_states_keep_none_alive():
    """A filter naming a state, in a mapping rebuilt each step with a new state, keeps no state or plan alive."""
    import statemap._cache as cache

    dead = []
    for step in range(3 * cache.OPTIONS_PER_FUNCTION):
        h = statemap.HiddenState(jnp.full((4, 2), float(step)), name="h")
        statemap.vmap(_scale, state_in_axes={0: h})(h.value)
        dead.append(weakref.ref(h))
        del h
    gc.collect()
    assert not any(ref() is not None for ref in dead[:-1])
    assert len(cache._SHARED[id(_scale)]) <= cache.OPTIONS_PER_FUNCTION
