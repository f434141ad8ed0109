"""Mapped calls from several threads: correct, serialised, and never interleaved.

Reading a call's states, dispatching its program and writing the results
back happen under one process-wide lock, so calls touching the same states
never interleave; tracing and compiling happen outside it (under a lock per
plan cache), so a cold call does not stall other threads' warm calls. A
``StateTrace`` is thread-local. These tests run real threads against
sequential oracles, and synchronise with events, never with time. pmap calls
with collectives sync every step (JAX-NOTES fact 10).
"""

import gc
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TIMEOUT, assert_concrete, assert_tree_allclose, counted, run_each, run_threads

import statemap

B = 4
AX = "lanes"


class Model:
    """Per-thread states and a mapped RNN-like step over them."""

    def __init__(self, seed):
        # Strongly typed, as the results written back are: one compile per mapping, not two.
        self.h = statemap.HiddenState(jnp.full((B, 3), float(seed), jnp.float32), name=f"h{seed}")
        self.w = statemap.ParamState(jnp.full((3,), 1.0 + seed / 10, jnp.float32), name=f"w{seed}")
        self.count = statemap.ShortTermState(jnp.int32(0), name=f"count{seed}")
        self.rng = statemap.RandomState(seed, name=f"rng{seed}")

        def step(x):
            self.h.value = jnp.tanh(self.h.value * self.w.value + x) + 0.01 * self.rng.normal((3,))
            self.w.value = self.w.value + 0.1 * jax.lax.pmean(x, AX)
            self.count.value = self.count.value + 1
            return self.h.value.sum()

        self.step = statemap.vmap(step, axis_name=AX, state_in_axes={0: statemap.HiddenState})

    @property
    def states(self):
        return [self.h, self.w, self.count, self.rng]


def inputs(k, calls):
    return jnp.full((B, 3), k / calls, jnp.float32)


@jax.jit
def oracle_step(h, w, count, key, x):
    """``Model.step`` threaded by hand: lane i's key is ``fold_in(base, i)``; ``normal`` splits it once."""
    new_key, base = jax.random.split(key)
    lane_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.arange(B))
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[1], (3,)))(lane_keys)
    h = jnp.tanh(h * w + x) + 0.01 * noise
    return h.sum(axis=1), h, w + 0.1 * x.mean(axis=0), count + 1, new_key


def test_calls_on_disjoint_states_match_a_sequential_run():
    # Each model's mapping compiles (about 1.5 CPU s) when its first call runs: two
    # threads started together overlap there and in their calls.
    n, calls = 2, 10
    results = {}

    def work(i):
        model = Model(i)
        outs = [model.step(inputs(k, calls)) for k in range(calls)]
        results[i] = (outs, model)

    run_threads(work, n)
    for i in range(n):
        fresh = Model(i)
        carry = [s.value for s in fresh.states]
        expected = []
        for k in range(calls):
            out, *carry = oracle_step(*carry, inputs(k, calls))
            expected.append(out)
        outs, model = results[i]
        assert_tree_allclose(outs, expected, rtol=1e-5, atol=1e-5)
        for state, want in zip(model.states, carry):
            assert_tree_allclose(state.value, want, rtol=1e-5, atol=1e-5)
        assert int(model.count.value) == calls
        assert_concrete(model.states)


def test_one_mapping_shared_by_threads_with_their_own_states_as_arguments():
    # Each thread's states make their own plan and compile (about 1 CPU s), so two threads
    # started together overlap there and in their calls.
    n, calls = 2, 10

    def step(x, h, rng):
        h.value = h.value + x + rng.uniform(())  # a key argument gives each lane its own key
        return h.value * 2

    @jax.jit
    def oracle(x, h, key):
        new_key, base = jax.random.split(key)
        lane_keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(x.shape[0]))
        draws = jax.vmap(lambda k: jax.random.uniform(jax.random.split(k)[1], ()))(lane_keys)
        h = h + x + draws
        return h * 2, h, new_key

    shared = statemap.vmap(step, in_axes=(0, 0, None))
    results = {}

    def work(i):
        h = statemap.HiddenState(jnp.full((B,), float(i), jnp.float32))  # strong, as written back
        rng = statemap.RandomState(i)
        outs = [shared(jnp.ones(B), h, rng) for _ in range(calls)]
        results[i] = (outs, h.value, rng.value)

    run_threads(work, n)
    for i in range(n):
        h, key = jnp.full((B,), float(i), jnp.float32), statemap.RandomState(i).value
        expected = []
        for _ in range(calls):
            out, h, key = oracle(jnp.ones(B), h, key)
            expected.append(out)
        outs, h_value, rng_value = results[i]
        assert_tree_allclose(outs, expected)
        assert_tree_allclose(h_value, h)
        np.testing.assert_array_equal(np.asarray(rng_value), np.asarray(key))


@pytest.mark.parametrize("kind", ["vmap", "pmap"])
def test_increments_of_a_shared_state_are_serialised(kind):
    n, calls = (8, 40) if kind == "vmap" else (4, 6)
    total = statemap.LongTermState(jnp.int32(0), name="total")

    def add(x):
        total.value = total.value + jax.lax.psum(x, AX)
        return total.value

    if kind == "vmap":
        m = statemap.vmap(add, axis_name=AX, out_axes=None)
    else:
        m = statemap.pmap(add, AX, out_axes=None)
    ones = jnp.ones(B, jnp.int32)
    jax.block_until_ready(m(ones))  # compile once before the race
    total.value = jnp.int32(0)
    seen = [[] for _ in range(n)]

    def work(i):
        for _ in range(calls):
            seen[i].append(int(jax.block_until_ready(m(ones))))

    run_threads(work, n)
    # Every call saw its own new total: a lost update would repeat a value.
    every = sorted(v for values in seen for v in values)
    assert every == [B * k for k in range(1, n * calls + 1)]
    assert int(total.value) == B * n * calls
    for values in seen:  # each thread's calls happen in its own order
        assert values == sorted(values)


def test_a_reader_call_never_sees_half_a_write_back():
    n_writers, calls = 3, 40
    a = statemap.State(jnp.zeros(2), name="a")
    b = statemap.State(jnp.zeros(2), name="b")

    def write(x):
        a.value = a.value + jax.lax.psum(x, AX)
        b.value = b.value + jax.lax.psum(x, AX)
        return x

    def read(x):
        return (a.value - b.value) + 0 * x

    writer = statemap.vmap(write, axis_name=AX)
    reader = statemap.vmap(read)
    differences = []

    def work(i):
        for _ in range(calls):
            if i < n_writers:
                writer(jnp.ones((B, 2)))
            else:
                differences.append(float(jnp.abs(reader(jnp.ones((B, 2)))).max()))

    run_threads(work, n_writers + 2)
    assert differences and max(differences) == 0.0
    assert_tree_allclose(a.value, jnp.full(2, float(B * n_writers * calls)))
    assert_tree_allclose(a.value, b.value)


def test_a_failing_thread_leaves_its_states_unchanged_and_others_unaffected():
    calls = 30
    bad = statemap.ParamState(jnp.zeros(2), name="bad")
    total = statemap.LongTermState(jnp.zeros(()), name="total")
    bad_before = bad.value
    failures = []

    def refused(x):
        bad.value = bad.value + x  # one value per lane, nothing places it
        return x

    def good(x):
        total.value = total.value + jax.lax.psum(x, AX)
        return x

    refuse = statemap.vmap(refused)
    add = statemap.vmap(good, axis_name=AX)

    def work(i):
        for _ in range(calls):
            if i == 0:
                try:
                    refuse(jnp.ones((B, 2)))
                except statemap.BatchAxisError:
                    failures.append(1)
            else:
                add(jnp.ones(B))

    run_threads(work, 3)
    assert len(failures) == calls
    assert bad.value is bad_before
    assert float(total.value) == B * 2 * calls
    assert_concrete([bad, total])


def test_a_state_trace_does_not_see_other_threads():
    mine = statemap.State(jnp.zeros(2), name="mine")
    theirs = statemap.State(jnp.zeros(2), name="theirs")
    theirs_split = statemap.HiddenState(jnp.zeros((B, 2)), name="theirs_split")
    other_step = statemap.vmap(
        lambda x: setattr(theirs_split, "value", theirs_split.value + x + theirs.value),
        state_in_axes=statemap.HiddenState,
    )
    my_step = statemap.vmap(lambda x: x * mine.value, in_axes=0)
    tracing, touched = threading.Event(), threading.Event()
    found = {}

    def tracer():
        with statemap.StateTrace() as trace:
            tracing.set()
            assert touched.wait(TIMEOUT)
            my_step(jnp.ones((B, 2)))
        found["states"], found["written"] = trace.states, trace.written

    def other():
        assert tracing.wait(TIMEOUT)
        theirs.value = theirs.value + 1
        other_step(jnp.ones((B, 2)))
        with statemap.StateTrace() as own:
            theirs.value = theirs.value + 1
        found["own"] = own.states
        touched.set()

    run_each(tracer, other)
    assert found["states"] == (mine,)
    assert found["written"] == ()
    assert found["own"] == (theirs,)
    assert_tree_allclose(theirs.value, jnp.full(2, 2.0))
    assert_tree_allclose(theirs_split.value, jnp.full((B, 2), 2.0))


def test_states_dying_in_other_threads_while_calls_run():
    # Plans refer to states weakly and are pruned when a state dies, in whichever
    # thread drops it. ``explain`` makes plans without compiling, so churn is cheap;
    # a short switch interval makes the threads interleave finely.
    shared = statemap.vmap(lambda x, s: x * s.value, in_axes=(0, None))
    keep = statemap.ParamState(jnp.float32(7.0))
    x = jnp.ones(B)

    def work(i):
        for k in range(6):
            if i < 3:
                s = statemap.ParamState(jnp.float32(k))
                shared.explain(x, s)
                del s
                if k % 3 == i:
                    gc.collect()
            else:
                assert_tree_allclose(shared(x, keep), jnp.full(B, 7.0))
                if k == 0:  # a new state as argument: a new plan, while others die
                    s = statemap.ParamState(jnp.float32(k))
                    assert_tree_allclose(shared(x, s), jnp.full(B, float(k)))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        run_threads(work, 5)
    finally:
        sys.setswitchinterval(interval)
    gc.collect()
    assert_tree_allclose(shared(x, keep), jnp.full(B, 7.0))


def blocked_while_traced(fn, tracing, release):
    """``fn``, whose Python run (the trace) signals ``tracing`` and waits for ``release``."""

    def blocked(*args):
        tracing.set()
        assert release.wait(TIMEOUT), "the test never released the trace"
        return fn(*args)

    return blocked


def test_a_cold_call_does_not_stall_warm_calls_of_other_mappings():
    warm_calls = 30
    h = statemap.HiddenState(jnp.zeros((B, 2)), name="h")
    total = statemap.LongTermState(jnp.zeros(()), name="total")
    tracing, release = threading.Event(), threading.Event()

    def slow(x):
        h.value = h.value + x
        return h.value * 2

    def warm(x):
        total.value = total.value + jax.lax.psum(x, AX)
        return total.value

    cold_step = statemap.vmap(blocked_while_traced(slow, tracing, release), state_in_axes=statemap.HiddenState)
    warm_step = statemap.vmap(warm, axis_name=AX, out_axes=None)
    warm_step(jnp.zeros(B))  # compiled before the race
    results = {}

    def cold_thread():
        results["cold"] = cold_step(jnp.ones((B, 2)))

    def warm_thread():
        assert tracing.wait(TIMEOUT)
        # The cold call is inside its trace until ``release``: these must not wait for it.
        results["warm"] = [float(warm_step(jnp.ones(B))) for _ in range(warm_calls)]
        release.set()

    try:
        run_each(cold_thread, warm_thread, stuck="a warm call waited for the cold trace")
    finally:
        release.set()
    assert results["warm"] == [float(B * k) for k in range(1, warm_calls + 1)]
    assert_tree_allclose(results["cold"], jnp.full((B, 2), 2.0))
    assert_tree_allclose(h.value, jnp.ones((B, 2)))


def test_writes_during_a_cold_call_of_the_same_state_are_not_lost():
    # The cold call traces while another thread keeps adding to the same state:
    # its run must read the value after those writes, not the one it traced with.
    warm_calls = 20
    total = statemap.LongTermState(jnp.zeros(()), name="total")
    tracing, release = threading.Event(), threading.Event()

    def add(x):
        total.value = total.value + jax.lax.psum(x, AX)
        return total.value

    cold_add = counted(blocked_while_traced(add, tracing, release))
    cold_step = statemap.vmap(cold_add, axis_name=AX, out_axes=None)
    warm_step = statemap.vmap(add, axis_name=AX, out_axes=None)
    warm_step(jnp.zeros(B))
    seen = {}

    def cold_thread(i):
        if i == 0:
            seen["cold"] = float(cold_step(jnp.full(B, 100.0)))
        else:  # the same mapping, the same signature: waits for the plan, traced once
            assert tracing.wait(TIMEOUT)
            seen["second"] = float(cold_step(jnp.full(B, 100.0)))

    def warm_thread():
        assert tracing.wait(TIMEOUT)
        seen["warm"] = [float(warm_step(jnp.ones(B))) for _ in range(warm_calls)]
        release.set()

    try:
        run_each(lambda: cold_thread(0), lambda: cold_thread(1), warm_thread)
    finally:
        release.set()
    assert seen["warm"] == [float(B * k) for k in range(1, warm_calls + 1)]
    assert float(total.value) == B * warm_calls + 2 * B * 100.0
    assert sorted([seen["cold"], seen["second"]]) == [B * warm_calls + B * 100.0, B * warm_calls + 2 * B * 100.0]
    assert cold_add.runs == 1


def test_a_state_reshaped_by_another_thread_while_a_call_is_traced():
    # The plan traced for the old shape is stale before its first run: the call traces again.
    h = statemap.State(jnp.ones(2), name="h")
    tracing, release = threading.Event(), threading.Event()

    @counted
    def grow(x):
        old = h.value  # read (shape (2,)) before the other thread reshapes it
        tracing.set()
        assert release.wait(TIMEOUT)
        h.value = old * 2
        return x + h.value.sum()

    step = statemap.vmap(grow)
    result = {}

    def caller():
        result["out"] = step(jnp.zeros(B))

    thread = threading.Thread(target=caller)
    thread.start()
    assert tracing.wait(TIMEOUT)
    h.value = jnp.ones(3)  # written while the call is being traced
    release.set()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert grow.runs == 2
    assert_tree_allclose(result["out"], jnp.full(B, 6.0))
    assert_tree_allclose(h.value, jnp.full(3, 2.0))
