"""The fault catalogue: every failure mode statemap handles, one test each.

docs/faults.rst lists these tests in a table (trigger, error type, message);
``test_the_catalogue_lists_exactly_these_tests`` keeps the two in step. Each
failing-call test asserts the error type and message and that every state,
random states included, holds exactly its previous value and no tracer
(SPEC rule 9). Runtime failures inside a compiled program are raised from a
``jax.debug.callback``; a warm call does not run the Python function again.
"""

import gc
import linecache
import os
import pathlib
import re
import sys
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_concrete, assert_tree_allclose, assert_unchanged, snapshot

import statemap
from statemap import filters

B = 4  # lanes; fits the 8 CPU devices, so every test runs under vmap and pmap
AX = "lanes"
KINDS = ["vmap", "pmap"]


class Boom(Exception):
    pass


def make(kind, fn, **keywords):
    """A statemap mapping of ``kind`` over ``fn`` with axis name ``AX``."""
    if kind == "vmap":
        return statemap.vmap(fn, axis_name=AX, **keywords)
    return statemap.pmap(fn, AX, **keywords)


def ones(*shape):
    return jnp.ones(shape, jnp.float32)


class Family:
    """One state of every kind: split hidden state, parameter, legacy and typed random states."""

    def __init__(self, lanes=B):
        self.h = statemap.HiddenState(jnp.arange(lanes * 2.0).reshape(lanes, 2), name="h")
        self.w = statemap.ParamState(jnp.ones(2), name="w")
        self.rng = statemap.RandomState(0, name="rng")
        self.trng = statemap.RandomState(jax.random.key(1), name="trng")

    @property
    def all(self):
        return [self.h, self.w, self.rng, self.trng]

    def touch(self, x):
        """Read and write every state from inside a lane (h must be split)."""
        self.h.value = self.h.value + x + self.rng.normal((2,)) + self.trng.uniform((2,))
        self.w.value = self.w.value * 2
        return self.h.value


SPLIT_H = {0: statemap.HiddenState}


@pytest.fixture
def fam():
    return Family()


class Switch:
    """A host callback that raises ``error`` once switched on (for warm-call failures)."""

    def __init__(self, error):
        self.error = error
        self.on = False

    def __call__(self, x):
        if self.on:
            raise self.error


# The user's function fails.


@pytest.mark.parametrize("kind", KINDS)
def test_user_exception_on_a_cold_call(kind, fam):
    def step(x):
        fam.touch(x)
        raise Boom("user code failed")

    m = make(kind, step, state_in_axes=SPLIT_H)
    saved = snapshot(fam.all)
    for _ in range(2):  # the failed trace is not cached: the second call fails the same way
        with pytest.raises(Boom, match="user code failed"):
            m(ones(B, 2))
        assert_unchanged(saved)


def test_user_exception_on_a_retrace(fam):
    def step(x):
        if fam.w.value.shape != (2,):
            raise Boom("unexpected width")
        fam.touch(x)
        return x

    m = make("vmap", step, state_in_axes=SPLIT_H)
    m(ones(B, 2))
    fam.w.value = jnp.ones(3)
    saved = snapshot(fam.all)
    with pytest.raises(Boom, match="unexpected width"):
        m(ones(B, 2))
    assert_unchanged(saved)


def test_user_exception_inside_a_nested_jit(fam):
    @jax.jit
    def inner(x):
        _ = fam.w.value  # a read: writes inside a raw jax.jit are refused
        raise Boom("inside jit")

    def step(x):
        fam.touch(x)
        return inner(x)

    m = make("vmap", step, state_in_axes=SPLIT_H)
    saved = snapshot(fam.all)
    with pytest.raises(Boom, match="inside jit"):
        m(ones(B, 2))
    assert_unchanged(saved)


def test_user_exception_inside_an_inner_mapping(fam):
    inner_state = statemap.ShortTermState(jnp.zeros((B, 3)), name="inner")

    def inner(y):
        inner_state.value = inner_state.value + y
        fam.w.value = fam.w.value + 1
        raise Boom("inner mapping failed")

    def outer(x):
        fam.touch(x)
        return statemap.vmap(inner, state_in_axes={1: statemap.ShortTermState})(jnp.ones(3) * x[0])

    m = make("vmap", outer, state_in_axes=SPLIT_H)
    saved = snapshot([*fam.all, inner_state])
    with pytest.raises(Boom, match="inner mapping failed"):
        m(ones(B, 2))
    assert_unchanged(saved)


@pytest.mark.parametrize("kind", KINDS)
def test_runtime_error_in_a_warm_call(kind, fam):
    switch = Switch(Boom("device step failed"))

    def step(x):
        jax.debug.callback(switch, x)
        return fam.touch(x)

    m = make(kind, step, state_in_axes=SPLIT_H)
    jax.block_until_ready(m(ones(B, 2)))
    switch.on = True
    saved = snapshot(fam.all)
    with pytest.raises(jax.errors.JaxRuntimeError, match="device step failed"):
        jax.block_until_ready(m(ones(B, 2)))
    assert_unchanged(saved)
    # The failure poisons nothing: switched off, the next call runs on the old values.
    switch.on = False
    h_before = fam.h.value
    jax.block_until_ready(m(ones(B, 2)))
    assert fam.h.value.shape == h_before.shape


@pytest.mark.parametrize("kind", KINDS)
def test_keyboard_interrupt_on_a_cold_call(kind, fam):
    def step(x):
        fam.touch(x)
        raise KeyboardInterrupt

    m = make(kind, step, state_in_axes=SPLIT_H)
    saved = snapshot(fam.all)
    with pytest.raises(KeyboardInterrupt):
        m(ones(B, 2))
    assert_unchanged(saved)


@pytest.mark.parametrize("kind", KINDS)
def test_keyboard_interrupt_on_a_warm_call(kind, fam):
    switch = Switch(KeyboardInterrupt())

    def step(x):
        jax.debug.callback(switch, x)
        return fam.touch(x)

    m = make(kind, step, state_in_axes=SPLIT_H)
    jax.block_until_ready(m(ones(B, 2)))
    switch.on = True
    saved = snapshot(fam.all)
    # JAX runs the callback inside the compiled program and reports what it raised.
    with pytest.raises(jax.errors.JaxRuntimeError, match="KeyboardInterrupt"):
        jax.block_until_ready(m(ones(B, 2)))
    assert_unchanged(saved)
    # The mapping runs again; this also replaces the failed run's token on the
    # devices, which JAX would otherwise raise again when the process exits.
    switch.on = False
    jax.block_until_ready(m(ones(B, 2)))
    jax.effects_barrier()


class InterruptAtLine:
    """A ``sys.settrace`` tracer: KeyboardInterrupt at the k-th line of statemap's own code.

    With ``k=None`` it only counts those lines. This is how a Ctrl-C that lands
    at an arbitrary point of a call behaves; sweeping ``k`` over every line
    makes the test deterministic. Lines that only open a block (``try:``,
    ``finally:``, ...) are skipped: a signal is never delivered there, and on
    CPython 3.11 an exception a tracer raises at a ``try:`` line inside a
    ``with`` block skips the block's ``__exit__``, which real code cannot do.
    """

    package = os.path.dirname(statemap.__file__)
    block_openers = ("try:", "finally:", "else:", "except", "with ")

    def __init__(self, k=None):
        self.k, self.lines = k, 0
        self.where = []  # (file, line) of every counted line, in order

    def __call__(self, frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(self.package):
            return self.local
        return None

    def local(self, frame, event, arg):
        if event == "line":
            source = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            if source.startswith(self.block_openers):
                return self.local
            self.lines += 1
            self.where.append((frame.f_code.co_filename, frame.f_lineno))
            if self.lines == self.k:
                raise KeyboardInterrupt
        return self.local

    def run(self, call):
        """Run ``call()`` under this tracer; True if it was interrupted."""
        previous = sys.gettrace()
        sys.settrace(self)
        try:
            call()
        except KeyboardInterrupt:
            return True
        finally:
            sys.settrace(previous)
        return False


def in_a_thread_of_its_own(fn):
    """Run ``fn()`` in a new thread and re-raise what it raised.

    State watchers are per thread: if an interrupt leaves one behind, only
    that thread is spoiled, not the test session's main thread. The garbage
    collector is off meanwhile: collecting earlier tests' states would run
    their weakref callbacks (statemap lines) inside the lines a sweep counts.
    """
    errors = []

    def body():
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 (re-raised below)
            errors.append(err)

    gc.collect()
    gc.disable()
    try:
        thread = threading.Thread(target=body)
        thread.start()
        thread.join(timeout=120)
    finally:
        gc.enable()
    assert not thread.is_alive()
    if errors:
        raise errors[0]


def _counters_and_family(fam):
    counters = [statemap.State(jnp.zeros(()), name=f"c{i}") for i in range(3)]

    def step(x):
        for c in counters:
            c.value = c.value + jax.lax.psum(jnp.float32(1), AX)
        return fam.touch(x)

    return counters, step


@pytest.mark.parametrize("kind", KINDS)
def test_keyboard_interrupt_at_every_line_of_a_warm_call(kind, fam):
    counters, step = _counters_and_family(fam)
    states = [*counters, *fam.all]
    m = make(kind, step, state_in_axes=SPLIT_H)

    def call():
        jax.block_until_ready(m(ones(B, 2)))

    call()

    def sweep():
        counting = InterruptAtLine()
        assert not counting.run(call)
        for k in range(1, counting.lines + 1):
            before = [s.value for s in states]
            InterruptAtLine(k).run(call)
            changed = [s.value is not v for s, v in zip(states, before)]
            assert all(changed) or not any(changed), f"interrupt at line {k} left a torn call: {changed}"
            if all(changed):  # the write-back was complete
                assert {float(c.value) for c in counters} == {float(before[0]) + B}
            assert_concrete(states)
        call()  # and the mapping still works
        assert len({float(c.value) for c in counters}) == 1

    in_a_thread_of_its_own(sweep)


def test_keyboard_interrupt_at_every_line_of_planning():
    # explain() runs the whole cold path up to the program: tracing, the
    # thread's state watchers, batched-ness and the plan; it compiles nothing.
    # Tracing a random draw costs JAX five times what the rest does, so every
    # line of planning without the draw is interrupted, then, with the draw,
    # every line that only the draw runs (the RandomState's own code).
    w = statemap.ParamState(jnp.ones(2), name="w")
    rng = statemap.RandomState(0, name="rng")
    saved = snapshot([w, rng])

    def plan(draw):
        statemap.vmap(lambda x: setattr(w, "value", w.value + x + (rng.normal((2,)) if draw else 0))).explain(ones(B, 2))

    def sweep():
        plan(False), plan(True)  # first calls fill caches: later ones run the same lines
        plain, drawing = InterruptAtLine(), InterruptAtLine()
        assert not plain.run(lambda: plan(False)) and not drawing.run(lambda: plan(True))
        seen = set(plain.where)
        only_the_draw = [k for k, line in enumerate(drawing.where, 1) if line not in seen]
        assert only_the_draw  # the draw runs lines of its own
        trials = [(False, k) for k in range(1, plain.lines + 1)] + [(True, k) for k in only_the_draw]
        for draw, k in trials:
            assert InterruptAtLine(k).run(lambda: plan(draw))
            assert_unchanged(saved)  # reads see the real values: no watcher was left behind
        with statemap.StateTrace() as trace:
            w.value = w.value
        assert trace.states == (w,)

    in_a_thread_of_its_own(sweep)


def test_system_exit_inside_the_function(fam):
    def step(x):
        fam.touch(x)
        raise SystemExit(3)

    saved = snapshot(fam.all)
    with pytest.raises(SystemExit, match="3"):
        make("vmap", step, state_in_axes=SPLIT_H)(ones(B, 2))
    assert_unchanged(saved)


@pytest.mark.parametrize("kind", KINDS)
def test_collective_over_an_unbound_axis_name(kind, fam):
    def step(x):
        fam.touch(x)
        return jax.lax.psum(x, "no_such_axis")

    saved = snapshot(fam.all)
    with pytest.raises(NameError, match=r"uses the axis 'no_such_axis', which no enclosing mapping binds \(bound axis names: 'lanes'\)"):
        make(kind, step, state_in_axes=SPLIT_H)(ones(B, 2))
    assert_unchanged(saved)


def test_writing_a_non_array_to_a_state_inside_the_function(fam):
    def step(x):
        fam.touch(x)
        fam.w.value = "not an array"

    saved = snapshot(fam.all)
    with pytest.raises(TypeError, match=r"statemap\.ParamState\.value: `value` must be a pytree of arrays.*str"):
        make("vmap", step, state_in_axes=SPLIT_H)(ones(B, 2))
    assert_unchanged(saved)


@pytest.mark.parametrize("returned", ["hi", object()], ids=["str", "object"])
def test_function_returning_a_non_array(returned, fam):
    def step(x):
        fam.touch(x)
        return x, returned

    saved = snapshot(fam.all)
    with pytest.raises(
        TypeError, match=rf"statemap\.vmap: the function returned a {type(returned).__name__} .* as output leaf 1"
    ):
        make("vmap", step, state_in_axes=SPLIT_H)(ones(B, 2))
    assert_unchanged(saved)


def test_filter_predicate_that_raises(fam):
    def predicate(path, state):
        if isinstance(state, statemap.ParamState):
            raise Boom(f"predicate failed on {path}")
        return isinstance(state, statemap.HiddenState)

    saved = snapshot(fam.all)
    with pytest.raises(Boom, match=r"predicate failed on \('w',\)"):
        make("vmap", fam.touch, state_in_axes={0: predicate})(ones(B, 2))
    assert_unchanged(saved)


def test_state_created_inside_a_failing_call_holds_no_tracer(fam):
    made = []

    def step(x):
        fam.touch(x)
        made.append(statemap.ParamState(x * 2, name="made"))
        raise Boom("after creating a state")

    saved = snapshot(fam.all)
    with pytest.raises(Boom, match="after creating a state"):
        make("vmap", step, state_in_axes=SPLIT_H)(ones(B, 2))
    assert_unchanged(saved)
    assert len(made) == 1
    assert made[0].value is None
    assert_concrete(made)


@pytest.mark.parametrize("where", ["jit", "scan", "cond"])
def test_state_written_inside_a_nested_transform(where, fam):
    def write(c):
        fam.w.value = fam.w.value + c
        return c

    def step(x):
        fam.touch(x)
        if where == "jit":
            jax.jit(write)(x)
        elif where == "scan":
            jax.lax.scan(lambda c, _: (write(c), None), x, None, length=2)
        else:
            jax.lax.cond(x.sum() > 0, write, lambda c: c, x)
        return x

    saved = snapshot(fam.all)
    with pytest.raises(
        statemap.StatemapError,
        match=r"statemap\.vmap: ParamState 'w' \(shape \(2,\)\) is written \(or drawn from\) inside a JAX "
        r"transform that statemap does not manage .* Use statemap's own transform instead \(statemap\.jit, "
        r"statemap\.scan,",
    ):
        make("vmap", step, state_in_axes=SPLIT_H)(ones(B, 2))
    assert_unchanged(saved)


@pytest.mark.parametrize("transform", ["jit", "vmap"])
def test_mapping_called_inside_a_plain_jax_transform(transform, fam):
    m = make("vmap", fam.touch, state_in_axes=SPLIT_H)
    outer = jax.jit(m) if transform == "jit" else jax.vmap(m)
    x = ones(B, 2) if transform == "jit" else ones(3, B, 2)
    saved = snapshot(fam.all)
    with pytest.raises(
        statemap.StatemapError,
        match=r"^statemap\.vmap: called inside a JAX transformation that statemap does not manage .*"
        + ("baked into that program" if transform == "jit" else "left holding that transformation's tracers"),
    ):
        outer(x)
    assert_unchanged(saved)


# Write policy.


REFUSED = r"written with values that vary across the mapped axis.*\n  \* ParamState 'w' \(shape \(2,\)\): "


def _batched_write(fam):
    def step(x):
        fam.touch(x)
        fam.w.value = fam.w.value + x  # one value per lane
        return x

    return step


@pytest.mark.parametrize("kind", KINDS)
def test_policy_violation(kind, fam):
    m = make(kind, _batched_write(fam), state_in_axes=SPLIT_H)
    saved = snapshot(fam.all)
    for _ in range(2):  # cold, then warm with the cached refusal
        with pytest.raises(statemap.BatchAxisError, match=REFUSED + r"no `state_in_axes`/`state_out_axes` entry"):
            m(ones(B, 2))
        assert_unchanged(saved)


def test_warn_policy_under_warnings_as_errors(fam):
    m = make("vmap", _batched_write(fam), state_in_axes=SPLIT_H, unexpected_out_state_mapping="warn")
    saved = snapshot(fam.all)
    for _ in range(2):  # cold, then warm: the warning is issued before the program runs
        with pytest.raises(
            UserWarning, match=r"statemap\.vmap: ParamState 'w' \(shape \(2,\)\) was written with a value that varies"
        ):
            m(ones(B, 2))  # the test configuration turns warnings into errors
        assert_unchanged(saved)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", ["raise", "warn", "ignore"])
def test_declared_unbatched_state_written_batched(kind, policy, fam):
    m = make(
        kind,
        _batched_write(fam),
        state_in_axes=SPLIT_H,
        state_out_axes={None: statemap.ParamState},
        unexpected_out_state_mapping=policy,
    )
    saved = snapshot(fam.all)
    with pytest.raises(statemap.BatchAxisError, match=REFUSED + r"`state_out_axes` maps it to None"):
        m(ones(B, 2))
    assert_unchanged(saved)


@pytest.mark.parametrize("kind", KINDS)
def test_unmapped_output_that_varies_across_lanes(kind, fam):
    def step(x):
        fam.touch(x)
        return jax.lax.psum(x, AX), x

    saved = snapshot(fam.all)
    with pytest.raises(
        ValueError, match=rf"statemap\.{kind}: output leaf 1 varies across the mapped axis, but `out_axes` is None"
    ):
        make(kind, step, state_in_axes=SPLIT_H, out_axes=(None, None))(ones(B, 2))
    assert_unchanged(saved)


# Axis sizes.


def _two_args(fam):
    def step(x, y):
        fam.touch(x)
        return y

    return step


@pytest.mark.parametrize("kind", KINDS)
def test_size_mismatch_between_arguments(kind, fam):
    saved = snapshot(fam.all)
    with pytest.raises(ValueError, match=rf"statemap\.{kind} got inconsistent sizes for the mapped axis") as info:
        make(kind, _two_args(fam), state_in_axes=SPLIT_H)(ones(B, 2), ones(B + 1))
    assert "* argument args[0] has axis 0 of size 4 (shape (4, 2), dtype float32)" in str(info.value)
    assert "* argument args[1] has axis 0 of size 5 (shape (5,), dtype float32)" in str(info.value)
    assert_unchanged(saved)


@pytest.mark.parametrize("kind", KINDS)
def test_size_mismatch_between_an_argument_and_a_split_state(kind, fam):
    saved = snapshot(fam.all)
    with pytest.raises(ValueError, match=r"inconsistent sizes for the mapped axis") as info:
        make(kind, _two_args(fam), state_in_axes=SPLIT_H)(ones(B - 1, 2), ones(B - 1))
    assert re.search(r"\* HiddenState 'h'.* has axis 0 of size 4 \(shape \(4, 2\)", str(info.value))
    assert "* argument args[0] has axis 0 of size 3" in str(info.value)
    assert_unchanged(saved)


@pytest.mark.parametrize("kind", KINDS)
def test_size_mismatch_between_axis_size_and_arguments(kind, fam):
    saved = snapshot(fam.all)
    with pytest.raises(ValueError, match=r"inconsistent sizes") as info:
        make(kind, _two_args(fam), state_in_axes=SPLIT_H, axis_size=B - 1)(ones(B, 2), ones(B))
    assert "* `axis_size` is 3" in str(info.value)
    assert "* argument args[0] has axis 0 of size 4" in str(info.value)
    assert_unchanged(saved)


def test_size_mismatch_between_two_split_states(fam):
    other = statemap.HiddenState(jnp.zeros((B + 1, 2)), name="other")

    def step():
        fam.w.value = fam.w.value + fam.rng.normal((2,))
        return fam.h.value.sum() + other.value.sum()

    saved = snapshot([*fam.all, other])
    with pytest.raises(ValueError, match=r"inconsistent sizes") as info:
        make("vmap", step, in_axes=None, state_in_axes=SPLIT_H)()
    assert re.search(r"\* HiddenState 'h'.* has axis 0 of size 4", str(info.value))
    assert re.search(r"\* HiddenState 'other'.* has axis 0 of size 5", str(info.value))
    assert_unchanged(saved)


def test_split_state_resized_between_calls_to_a_conflicting_size(fam):
    m = make("vmap", _two_args(fam), state_in_axes=SPLIT_H)
    m(ones(B, 2), ones(B))
    fam.h.value = jnp.zeros((B + 1, 2))
    saved = snapshot(fam.all)
    with pytest.raises(ValueError, match=r"statemap\.vmap got inconsistent sizes") as info:
        m(ones(B, 2), ones(B))
    assert re.search(r"\* HiddenState 'h'.* has axis 0 of size 5 \(shape \(5, 2\)", str(info.value))
    assert_unchanged(saved)


def test_no_mapped_input_and_no_axis_size(fam):
    def step(x):
        fam.w.value = fam.w.value + x + fam.rng.normal((2,)) + fam.trng.uniform((2,))
        return x

    saved = snapshot(fam.all)
    with pytest.raises(ValueError, match=r"statemap\.vmap: cannot tell the axis size: no argument is mapped"):
        make("vmap", step, in_axes=None)(ones(2))
    assert_unchanged(saved)


def test_axis_size_needed_while_tracing_and_given_by_nothing(fam):
    def step(x):
        fam.w.value = fam.w.value + fam.rng.normal((2,))
        return x * jax.lax.psum(1, AX)

    saved = snapshot(fam.all)
    with pytest.raises(ValueError, match=r"statemap\.vmap: the function needs the axis size while it is traced"):
        make("vmap", step, in_axes=None)(ones(2))
    assert_unchanged(saved)


def test_explain_raises_what_the_call_would(fam):
    saved = snapshot(fam.all)
    with pytest.raises(ValueError, match=r"inconsistent sizes"):
        make("vmap", _two_args(fam), state_in_axes=SPLIT_H).explain(ones(B, 2), ones(B + 1))
    assert_unchanged(saved)


# Axes that do not fit.


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", [2, -3])
def test_state_in_axes_out_of_range(kind, axis, fam):
    saved = snapshot(fam.all)
    with pytest.raises(
        statemap.BatchAxisError,
        match=rf"`state_in_axes` splits HiddenState 'h' \(shape \(4, 2\)\) on axis {axis}, which is out of range "
        r"for a value of rank 2\. Use an axis in \[-2, 2\)",
    ):
        make(kind, _two_args(fam), state_in_axes={axis: statemap.HiddenState})(ones(B, 2), ones(B))
    assert_unchanged(saved)


@pytest.mark.parametrize("kind", KINDS)
def test_state_out_axes_out_of_range(kind, fam):
    m = make(kind, fam.touch, state_in_axes=SPLIT_H, state_out_axes={3: statemap.ParamState})
    saved = snapshot(fam.all)
    with pytest.raises(
        statemap.BatchAxisError,
        match=r"`state_out_axes` stacks ParamState 'w' \(shape \(2,\)\) on axis 3, which is out of range for a "
        r"stacked value of rank 2",
    ):
        m(ones(B, 2))
    assert_unchanged(saved)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", [2, -3])
def test_in_axes_out_of_range(kind, axis, fam):
    saved = snapshot(fam.all)
    with pytest.raises(
        ValueError,
        match=rf"statemap\.{kind}: `in_axes` maps argument args\[0\] \(shape \(4, 2\)\) on axis {axis}, which is "
        r"out of range\. Use an axis in \[-2, 2\)",
    ):
        make(kind, fam.touch, in_axes=axis, state_in_axes=SPLIT_H)(ones(B, 2))
    assert_unchanged(saved)


def test_in_axes_on_a_scalar_argument(fam):
    saved = snapshot(fam.all)
    with pytest.raises(ValueError, match=r"maps argument args\[1\] on axis 0, but it is a scalar \(shape \(\)\)"):
        make("vmap", _two_args(fam), state_in_axes=SPLIT_H)(ones(B, 2), jnp.float32(1))
    assert_unchanged(saved)


@pytest.mark.parametrize("kind", KINDS)
def test_out_axes_out_of_range(kind, fam):
    saved = snapshot(fam.all)
    with pytest.raises(
        ValueError, match=rf"statemap\.{kind}: `out_axes` 3 is out of range for an output of lane shape \(2,\)"
    ):
        make(kind, fam.touch, out_axes=3, state_in_axes=SPLIT_H)(ones(B, 2))
    assert_unchanged(saved)


def test_in_axes_with_the_wrong_number_of_entries(fam):
    saved = snapshot(fam.all)
    with pytest.raises(
        ValueError, match=r"statemap\.vmap: `in_axes` has 3 entries but the function was called with 2 positional"
    ):
        make("vmap", _two_args(fam), in_axes=(0, 0, 0), state_in_axes=SPLIT_H)(ones(B, 2), ones(B))
    assert_unchanged(saved)


def test_in_axes_that_is_not_a_prefix_of_the_arguments(fam):
    saved = snapshot(fam.all)
    with pytest.raises(
        ValueError, match=r"statemap\.vmap: `in_axes` .* is not a pytree prefix of the positional arguments"
    ):
        make("vmap", lambda p: fam.touch(p["a"]), in_axes=({"a": 0, "c": 0},), state_in_axes=SPLIT_H)(
            {"a": ones(B, 2), "b": ones(B)}
        )
    assert_unchanged(saved)


def test_out_axes_not_a_prefix_of_the_outputs(fam):
    saved = snapshot(fam.all)
    with pytest.raises(ValueError, match=r"^statemap\.vmap: `out_axes` \(0, 0, 0\) is not a pytree prefix of the out"):
        make("vmap", lambda x: (fam.touch(x), x), out_axes=(0, 0, 0), state_in_axes=SPLIT_H)(ones(B, 2))
    assert_unchanged(saved)


def test_same_state_as_argument_and_in_state_in_axes_with_different_axes(fam):
    both = statemap.ShortTermState(jnp.zeros((B, B)), name="both")

    def step(x, s):
        fam.touch(x)
        return s.value.sum() + x.sum()

    m = make("vmap", step, in_axes=(0, 0), state_in_axes={0: statemap.HiddenState, 1: statemap.ShortTermState})
    saved = snapshot([*fam.all, both])
    with pytest.raises(
        statemap.BatchAxisError,
        match=r"statemap\.vmap: ShortTermState 'both' \(shape \(4, 4\)\) is reached twice with different axes: "
        r"`in_axes` maps argument args\[1\] on axis 0, and `state_in_axes` on axis 1",
    ):
        m(ones(B, 2), both)
    assert_unchanged(saved)


def test_same_state_passed_twice_with_different_in_axes(fam):
    both = statemap.ShortTermState(jnp.zeros((B, B)), name="both")

    def step(x, a, b):
        fam.touch(x)
        return a.value.sum() + b.value.sum()

    m = make("vmap", step, in_axes=(0, 0, 1), state_in_axes=SPLIT_H)
    saved = snapshot([*fam.all, both])
    with pytest.raises(
        statemap.BatchAxisError,
        match=r"statemap\.vmap: ShortTermState 'both' \(shape \(4, 4\)\) is reached twice with different axes: "
        r"`in_axes` maps argument args\[1\] on axis 0 and argument args\[2\] on axis 1",
    ):
        m(ones(B, 2), both, both)
    assert_unchanged(saved)


# Bad specs, rejected when the mapping is built.


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("argname", ["state_in_axes", "state_out_axes"])
def test_bad_filter_in_state_axes(kind, argname, fam):
    saved = snapshot(fam.all)
    with pytest.raises(
        TypeError,
        match=rf"statemap\.{kind}: `{argname}` for axis 0: statemap\.filters\.to_predicate: cannot use 3\.5 \(float\)",
    ):
        make(kind, fam.touch, **{argname: {0: 3.5}})
    assert_unchanged(saved)


@pytest.mark.parametrize("bad", [3.5, b"bytes", {"a": 1}], ids=["float", "bytes", "dict"])
def test_bad_filter_in_to_predicate(bad, fam):
    saved = snapshot(fam.all)
    with pytest.raises(TypeError, match=r"statemap\.filters\.to_predicate: cannot use .* as a filter"):
        filters.to_predicate(bad)
    assert_unchanged(saved)


@pytest.mark.parametrize("argname", ["state_in_axes", "state_out_axes"])
def test_state_axes_key_that_is_not_an_axis(argname, fam):
    saved = snapshot(fam.all)
    with pytest.raises(TypeError, match=rf"`{argname}` keys must be ints or None, got 'a' \(str\)"):
        make("vmap", fam.touch, **{argname: {"a": statemap.HiddenState}})
    assert_unchanged(saved)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("argname, bad", [("in_axes", "a"), ("out_axes", 1.5), ("in_axes", (0, [True]))])
def test_axis_spec_of_the_wrong_type(kind, argname, bad, fam):
    saved = snapshot(fam.all)
    with pytest.raises(TypeError, match=rf"statemap\.{kind}: `{argname}` must be an int, None, or a pytree of ints"):
        make(kind, fam.touch, **{argname: bad})
    assert_unchanged(saved)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", ["loud", None, "RAISE"])
def test_bad_policy_string(kind, bad, fam):
    saved = snapshot(fam.all)
    with pytest.raises(
        ValueError,
        match=rf"statemap\.{kind}: `unexpected_out_state_mapping` must be 'raise', 'warn' or 'ignore', got {bad!r}",
    ):
        make(kind, fam.touch, unexpected_out_state_mapping=bad)
    assert_unchanged(saved)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_axis_size(kind, bad, fam):
    saved = snapshot(fam.all)
    with pytest.raises(ValueError, match=rf"`axis_size` must be a positive int or None, got {bad!r}"):
        make(kind, fam.touch, axis_size=bad)
    assert_unchanged(saved)


def test_unhashable_axis_name(fam):
    saved = snapshot(fam.all)
    with pytest.raises(TypeError, match=r"statemap\.vmap: `axis_name` must be hashable, got \['a'\]"):
        statemap.vmap(fam.touch, axis_name=["a"])
    assert_unchanged(saved)


@pytest.mark.parametrize("kind", KINDS)
def test_function_that_is_not_callable(kind, fam):
    saved = snapshot(fam.all)
    with pytest.raises(TypeError, match=rf"statemap\.{kind}: `fn` must be callable, got int: 3"):
        make(kind, 3)
    assert_unchanged(saved)


@pytest.mark.parametrize("argname", ["static_broadcasted_argnums", "donate_argnums"])
def test_argnums_that_are_not_ints(argname, fam):
    saved = snapshot(fam.all)
    with pytest.raises(TypeError, match=rf"statemap\.pmap: `{argname}` must be an int or a tuple of ints, got 'a'"):
        statemap.pmap(fam.touch, AX, **{argname: "a"})
    assert_unchanged(saved)


# Arguments.


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", ["text", object()], ids=["str", "object"])
def test_non_array_argument(kind, bad, fam):
    saved = snapshot(fam.all)
    with pytest.raises(
        TypeError, match=rf"statemap\.{kind}: argument args\[1\] is a {type(bad).__name__} .*, not an array"
    ):
        make(kind, _two_args(fam), state_in_axes=SPLIT_H)(ones(B, 2), bad)
    assert_unchanged(saved)


def test_non_array_keyword_argument(fam):
    saved = snapshot(fam.all)
    with pytest.raises(TypeError, match=r"statemap\.vmap: argument kwargs\['y'\] is a str .*, not an array"):
        make("vmap", _two_args(fam), state_in_axes=SPLIT_H)(ones(B, 2), y="text")
    assert_unchanged(saved)


def test_unhashable_static_argument(fam):
    def step(x, n):
        fam.touch(x)
        return x * len(n)

    m = statemap.pmap(step, AX, static_broadcasted_argnums=1, state_in_axes=SPLIT_H)
    saved = snapshot(fam.all)
    with pytest.raises(
        TypeError, match=r"statemap\.pmap: static argument args\[1\] is a list, which is not hashable.*use a tuple"
    ):
        m(ones(B, 2), [1, 2])
    assert_unchanged(saved)


@pytest.mark.parametrize("argnum", [2, -3])
def test_static_argnum_out_of_range(argnum, fam):
    """Raised when the mapping is built, as ``jax.jit`` does: the signature shows it."""
    with pytest.raises(
        ValueError,
        match=rf"statemap\.pmap: `static_broadcasted_argnums` names argument {argnum}, but `fn` takes 2 "
        r"positional arguments \(x, y\)",
    ):
        statemap.pmap(_two_args(fam), AX, static_broadcasted_argnums=argnum, state_in_axes=SPLIT_H)


def test_state_on_another_device_than_the_arguments(fam):
    devices = jax.devices()
    fam.w.value = jax.device_put(jnp.ones(2), devices[-1])
    x = jax.device_put(ones(B, 2), devices[0])
    saved = snapshot(fam.all)
    with pytest.raises(
        ValueError,
        match=rf"statemap\.vmap: incompatible devices: the arguments are on device\(s\) \[{devices[0].id}\]; .*"
        rf"ParamState 'w' \(shape \(2,\)\) is on device\(s\) \[{devices[-1].id}\]\. Move a state next to",
    ):
        make("vmap", fam.touch, state_in_axes=SPLIT_H)(x)
    assert_unchanged(saved)


def test_state_whose_buffer_was_deleted(fam):
    m = make("vmap", fam.touch, state_in_axes=SPLIT_H)
    m(ones(B, 2))
    doomed = jnp.ones(2)
    fam.w.value = doomed
    saved = snapshot([fam.h, fam.rng, fam.trng])
    doomed.delete()
    with pytest.raises(RuntimeError, match=r"Array has been deleted with shape=float32\[2\]"):
        m(ones(B, 2))
    assert_unchanged(saved)
    assert fam.w.value is doomed


# Devices.


def test_more_lanes_than_devices():
    n = jax.local_device_count() + 1
    fam = Family(lanes=n)
    saved = snapshot(fam.all)
    with pytest.raises(
        ValueError,
        match=rf"statemap\.pmap: the mapped axis has size {n}, but only {n - 1} devices are available; pmap runs one "
        r"lane per device",
    ):
        statemap.pmap(fam.touch, AX, state_in_axes=SPLIT_H)(ones(n, 2))
    assert_unchanged(saved)


def test_axis_size_beyond_the_devices_with_no_mapped_input(fam):
    n = jax.local_device_count() + 1

    def step():
        fam.w.value = fam.w.value + jax.lax.pmean(fam.rng.normal((2,)), AX)
        return fam.trng.uniform(())

    saved = snapshot(fam.all)
    with pytest.raises(ValueError, match=rf"the mapped axis has size {n}, but only {n - 1} devices are available"):
        statemap.pmap(step, AX, axis_size=n)()
    assert_unchanged(saved)


def test_size_that_differs_from_len_devices(fam):
    m = statemap.pmap(fam.touch, AX, devices=jax.devices()[: B + 1], state_in_axes=SPLIT_H)
    saved = snapshot(fam.all)
    with pytest.raises(ValueError, match=r"statemap\.pmap: the mapped axis has size 4, but `devices` lists 5 devices"):
        m(ones(B, 2))
    assert_unchanged(saved)


def test_pmap_over_a_zero_size_axis(fam):
    empty = statemap.HiddenState(jnp.zeros((0, 2)), name="empty")

    def step(x):
        empty.value = empty.value + x + fam.rng.normal((2,))
        fam.w.value = fam.w.value * 2
        return x

    saved = snapshot([*fam.all, empty])
    with pytest.raises(ValueError, match=r"statemap\.pmap: the mapped axis has size 0; pmap needs at least one lane"):
        statemap.pmap(step, AX, state_in_axes={0: statemap.HiddenState})(ones(0, 2))
    assert_unchanged(saved)


def test_global_arg_shapes(fam):
    saved = snapshot(fam.all)
    with pytest.raises(ValueError, match=r"statemap\.pmap: `global_arg_shapes` is no longer supported by JAX"):
        statemap.pmap(fam.touch, AX, global_arg_shapes=((2,),))
    assert_unchanged(saved)


@pytest.mark.parametrize("bad", [["cpu:0"], [], [0]], ids=["str", "empty", "int"])
def test_bad_devices(bad, fam):
    saved = snapshot(fam.all)
    with pytest.raises(TypeError, match=r"statemap\.pmap: `devices` must be a non-empty sequence of jax\.Device"):
        statemap.pmap(fam.touch, AX, devices=bad)
    assert_unchanged(saved)


def test_backend_that_is_not_a_str(fam):
    saved = snapshot(fam.all)
    with pytest.raises(TypeError, match=r"statemap\.pmap: `backend` must be a str such as 'cpu', got 3"):
        statemap.pmap(fam.touch, AX, backend=3)
    assert_unchanged(saved)


def test_unknown_backend(fam):
    saved = snapshot(fam.all)
    with pytest.raises(ValueError, match=r"statemap\.pmap: `backend` 'nonsense' is not available here"):
        statemap.pmap(fam.touch, AX, backend="nonsense", state_in_axes=SPLIT_H)(ones(B, 2))
    assert_unchanged(saved)


# Random states.


@pytest.mark.parametrize("bad", ["x", 1.5, jnp.zeros(3, jnp.uint32)], ids=["str", "float", "uint32[3]"])
def test_random_state_bad_seed(bad, fam):
    saved = snapshot(fam.all)
    with pytest.raises(TypeError, match=r"statemap\.RandomState: `seed_or_key` must be an int seed, None, a typed key"):
        statemap.RandomState(bad)
    with pytest.raises(TypeError, match=r"statemap\.RandomState\.seed: `seed_or_key` must be an int seed"):
        fam.rng.seed(bad)
    assert_unchanged(saved)


def test_random_state_bad_seed_message_reads_cleanly():
    with pytest.raises(TypeError, match=r"got str: 'x'\.$"):
        statemap.RandomState("x")


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_random_state_split_key_of_a_bad_count(n, fam):
    saved = snapshot(fam.all)
    with pytest.raises(ValueError, match=rf"statemap\.RandomState\.split_key: `n` must be a positive int, got {n!r}"):
        fam.rng.split_key(n)
    assert_unchanged(saved)


DRAWS = {
    "normal": lambda r, shape: r.normal(shape),
    "uniform": lambda r, shape: r.uniform(shape),
    "randint": lambda r, shape: r.randint(shape, 0, 3),
    "bernoulli": lambda r, shape: r.bernoulli(shape),
}


@pytest.mark.parametrize("method", sorted(DRAWS))
@pytest.mark.parametrize("shape", [(2, -1), 2.5], ids=["negative", "float"])
def test_random_state_bad_shape(method, shape, fam):
    saved = snapshot(fam.all)
    with pytest.raises(TypeError, match=rf"statemap\.RandomState\.{method}: `shape` must be an int or a tuple"):
        DRAWS[method](fam.rng, shape)
    with pytest.raises(TypeError, match=rf"statemap\.RandomState\.{method}: `shape`"):
        DRAWS[method](fam.trng, shape)
    assert_unchanged(saved)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [jnp.zeros(3), jnp.zeros((), jnp.uint32)], ids=["float[3]", "uint32[]"])
def test_random_state_holding_a_non_key(kind, value, fam):
    broken = statemap.RandomState(0, name="broken")
    broken.value = value

    def step(x):
        fam.touch(x)
        return x + broken.normal((2,))

    saved = snapshot([*fam.all, broken])
    with pytest.raises(
        TypeError, match=rf"statemap\.{kind}: RandomState 'broken' \(shape .*\) does not hold a PRNG key.*seed\(0\)"
    ):
        make(kind, step, state_in_axes=SPLIT_H)(ones(B, 2))
    assert_unchanged(saved)


# Watchers.


def test_state_traces_exited_out_of_order(fam):
    outer, inner = statemap.StateTrace(), statemap.StateTrace()
    saved = snapshot(fam.all)
    outer.__enter__()
    inner.__enter__()
    try:
        with pytest.raises(
            RuntimeError,
            match=r"must be exited in the reverse order they were entered; a StateTrace entered inside this one "
            r"was never exited",
        ):
            outer.__exit__(None, None, None)
    finally:
        inner.__exit__(None, None, None)
        outer.__exit__(None, None, None)
    assert_unchanged(saved)
    with statemap.StateTrace() as trace:  # the watcher stack is sound again
        fam.w.value = fam.w.value + 1
    assert trace.written == (fam.w,)


def test_state_trace_left_open_inside_the_function(fam):
    def step(x):
        statemap.StateTrace().__enter__()  # never exited
        return fam.touch(x)

    saved = snapshot(fam.all)
    with pytest.raises(
        RuntimeError,
        match=r"must be exited in the reverse order they were entered; a StateTrace entered inside this one was "
        r"never exited",
    ):
        make("vmap", step, state_in_axes=SPLIT_H)(ones(B, 2))
    assert_unchanged(saved)  # reads see the real values again, not the dead lane's tracers
    out = make("vmap", fam.touch, state_in_axes=SPLIT_H)(ones(B, 2))
    assert_concrete([*fam.all, statemap.State(out)])


def test_state_trace_entered_twice(fam):
    saved = snapshot(fam.all)
    trace = statemap.StateTrace()
    with trace, pytest.raises(RuntimeError, match=r"statemap\.StateTrace: this trace is already active"):
        fam.w.value = fam.w.value + 1
        trace.__enter__()
    assert trace.written == (fam.w,)
    trace.restore()
    assert_unchanged(saved)


def test_state_trace_restores_after_a_failure_outside_any_mapping(fam):
    saved = snapshot(fam.all)
    with pytest.raises(Boom, match="eager failure"), statemap.StateTrace() as trace:
        fam.w.value = fam.w.value + 1
        fam.rng.normal(())
        raise Boom("eager failure")
    trace.restore()
    assert_unchanged(saved)


# States that change between calls (no error: the call must still be right).


def test_state_deleted_between_calls():
    runs = []
    holder = {"s": statemap.ParamState(jnp.float32(2.0), name="s")}

    def step(x):
        runs.append(1)
        return x * holder["s"].value

    m = make("vmap", step)
    assert_tree_allclose(m(ones(B)), ones(B) * 2)
    ref = weakref.ref(holder["s"])
    del holder["s"]
    gc.collect()
    assert ref() is None  # no plan keeps it alive
    holder["s"] = statemap.ParamState(jnp.float32(3.0), name="s")
    assert_tree_allclose(m(ones(B)), ones(B) * 3)
    assert len(runs) == 2
    assert_concrete([holder["s"]])


@pytest.mark.parametrize("kind", KINDS)
def test_state_shape_changed_between_calls(kind, fam):
    def step(x):
        fam.h.value = fam.h.value + x + fam.rng.normal(x.shape) + fam.trng.uniform(x.shape)
        fam.w.value = fam.w.value * 2
        return fam.h.value

    m = make(kind, step, state_in_axes=SPLIT_H)
    jax.block_until_ready(m(ones(B, 2)))
    fam.h.value = jnp.ones((B, 3))
    fam.w.value = jnp.ones(3)
    rng_before = fam.rng.value
    out = jax.block_until_ready(m(ones(B, 3)))
    assert out.shape == (B, 3)
    assert fam.h.value.shape == (B, 3) and fam.w.value.shape == (3,)
    assert_tree_allclose(fam.w.value, jnp.full(3, 2.0))
    assert fam.rng.value is not rng_before
    assert_concrete(fam.all)


def test_new_pmap_trace_after_a_pmap_call(fam):
    def train(x):
        fam.w.value = fam.w.value + jax.lax.pmean(x, AX)
        return x + fam.rng.normal((2,))

    def evaluate(x):
        return x + fam.w.value + fam.trng.uniform((2,)) + fam.rng.normal((2,))

    step = statemap.pmap(train, AX)
    jax.block_until_ready(step(ones(B, 2)))  # the states now hold pmap outputs
    # A second mapping reads them, and the first one retraces for a new signature.
    out = jax.block_until_ready(statemap.pmap(evaluate, AX)(ones(B, 2)))
    assert out.shape == (B, 2)
    jax.block_until_ready(step(jnp.ones((B, 2), jnp.int32)))
    assert_tree_allclose(fam.w.value, jnp.full(2, 3.0))
    assert_concrete(fam.all)


def test_vmap_over_a_zero_size_axis(fam):
    empty = statemap.HiddenState(jnp.zeros((0, 2)), name="empty")

    def step(x):
        empty.value = empty.value + x + fam.rng.normal((2,))
        return x * 2

    out = make("vmap", step, state_in_axes={0: statemap.HiddenState})(ones(0, 2))
    assert out.shape == (0, 2)
    assert empty.value.shape == (0, 2)
    assert_concrete([*fam.all, empty])


def test_state_structure_changed_between_calls(fam):
    def step(x):
        fam.w.value = jax.tree.map(lambda v: v + x.sum(), fam.w.value)
        return x

    m = make("vmap", step, in_axes=None, axis_size=B, state_out_axes=None)
    m(jnp.float32(0))
    fam.w.value = {"a": jnp.zeros(2), "b": jnp.zeros(())}
    m(jnp.float32(1))
    assert_tree_allclose(fam.w.value, {"a": jnp.ones(2), "b": jnp.float32(1)})
    fam.w.value = (jnp.zeros(2),)
    m(jnp.float32(2))
    assert_tree_allclose(fam.w.value, (jnp.full(2, 2.0),))
    assert_concrete(fam.all)


def test_state_dtype_changed_between_calls(fam):
    def step(x):
        fam.w.value = fam.w.value + x.astype(fam.w.value.dtype)
        return x

    m = make("vmap", step, in_axes=None, axis_size=B)
    m(jnp.float32(1))
    fam.w.value = jnp.zeros(2, jnp.int32)
    m(jnp.float32(2))
    assert fam.w.value.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(fam.w.value), [2, 2])
    assert_concrete(fam.all)


def test_state_replaced_by_a_numpy_array_between_calls(fam):
    m = make("vmap", fam.touch, state_in_axes=SPLIT_H)
    m(ones(B, 2))
    fam.w.value = np.full(2, 3.0, np.float32)
    m(ones(B, 2))
    assert_tree_allclose(fam.w.value, jnp.full(2, 6.0))
    assert_concrete(fam.all)


# The catalogue in docs/faults.rst.


def test_the_catalogue_lists_exactly_these_tests():
    page = pathlib.Path(__file__).parent.parent / "docs" / "faults.rst"
    text = page.read_text()
    listed = re.findall(r"``(test_\w+)``", text)
    here = {name for name in globals() if name.startswith("test_")} - {"test_the_catalogue_lists_exactly_these_tests"}
    assert sorted(set(listed)) == sorted(here)
    rows = re.findall(r"^   \* - (F\d+)$", text, flags=re.MULTILINE)
    assert len(rows) == len(set(rows)) >= 30
