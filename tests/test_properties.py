"""Differential property tests: statemap against a hand-threaded pure-JAX oracle.

hypothesis generates small stateful programs as data (``tests/strategies.py``):
a few states of random shapes and kinds (split on a random axis, negative
included; broadcast, implicitly or with ``{None: filter}``; pytree values;
RandomState with per-lane, split or broadcast keys, typed or legacy; States
passed as arguments; States created inside), a lane function of a handful of
operations (elementwise reads and writes, ``psum``, a ``scan`` with an unbatched
counter, a nested ``jax.jit`` that reads states, random draws, reseeds, key
outputs), random ``in_axes`` (pytree prefixes, keyword arguments),
``out_axes``, ``state_in_axes``/``state_out_axes`` (every filter form, a losing
duplicate entry), write policy and ``explain()``, and one to three calls (between
calls the host may change the states' values or the broadcast states' shapes).
Each program runs through ``statemap.vmap``, or through ``statemap.pmap``
and ``statemap.shard_map`` (both against one pmap oracle), and through an
oracle that threads the same values through ``jax.vmap`` / ``jax.pmap``; the
outputs and every state's new value must agree, or both must refuse the
program, leaving every state exactly as it was and concrete. Programs
``statemap.map`` can express (no collectives, arguments and outputs on axis
0; ``programs('map')``) run through ``statemap.LaxMapMapping`` with a
``batch_size`` of every kind (None, 1, a divisor, one leaving a remainder
chunk, the whole axis, more than the axis) against the same ``jax.vmap``
oracle. The write-policy property runs under each of vmap, pmap + shard_map
and map. A further property nests a generated program's ``statemap.vmap``
inside a ``statemap.vmap``, ``statemap.pmap`` or ``statemap.map`` that splits,
broadcasts or keys the same states again. Another changes, between calls,
what a plan's key must cover (weak and strong scalars, static values of equal
value and different type, ``None`` state values, a new State object as an
argument): every warm call must give what a cold call of a fresh mapping
gives (dtypes and weak types included), and what ``jax.vmap`` gives.

Profiles (registered here, applied to these tests only; counts are per test):

* ``ci`` (default, run by ``python -m pytest``): 8 vmap + 6 pmap and
  shard_map (the same programs) + 5 map + 3 x 2 policy + 5 nested + 3 keys
  = 33 examples, derandomized, plus pinned examples of what so few may miss
  (every key kind under vmap, pmap and map; an output refusal under pmap; a
  nested map; a write only the outer pmap refuses; a swapped argument
  State); about 50 CPU seconds (``-n 0``). The oracle is compiled once per
  program and signature (``jax.jit``), not once per primitive.
* ``long``: ``STATEMAP_HYPOTHESIS_PROFILE=long python -m pytest
  tests/test_properties.py --hypothesis-show-statistics``: 800 + 300 + 400 +
  3 x 150 + 300 + 200 = 2,450 examples, randomized.

Bugs the generator found are pinned below as plain ``test_regression_*`` tests.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.control import event as _event
from strategies import (
    Arg,
    Draw,
    Expected,
    KeyProgram,
    KeyState,
    Nested,
    Out,
    Program,
    Psum,
    Read,
    Reseed,
    StateDef,
    Write,
    arg_values,
    batch_kind,
    call_arguments,
    entry_axis,
    initial_values,
    is_typed_key,
    iter_ops,
    key_argument,
    key_bits,
    key_call,
    key_mapping,
    key_oracle,
    key_programs,
    key_value,
    make_mapping,
    make_nested,
    make_states,
    mutated,
    nested_oracle,
    nested_programs,
    nested_values,
    on_devices,
    oracle,
    programs,
)

import statemap

# On a failure hypothesis's pytest plugin imports its patch writer (and libcst,
# which trips a DeprecationWarning that `filterwarnings = error` would turn into
# an INTERNALERROR hiding the real failure): import it now, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:  # pragma: no cover (libcst missing: the plugin skips the patch)
        pass

# ---------------------------------------------------------------------------
# Profiles.

_COMMON: dict[str, Any] = {
    "deadline": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
settings.register_profile("statemap-ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("statemap-long", derandomize=False, **_COMMON)

PROFILE = os.environ.get("STATEMAP_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"STATEMAP_HYPOTHESIS_PROFILE must be 'ci' or 'long', got {PROFILE!r}")
_PARENT = settings.get_profile(f"statemap-{PROFILE}")
# Examples per property test, per profile.
EXAMPLES = {
    "ci": {"vmap": 8, "pmap": 6, "map": 5, "policy": 2, "nested": 5, "keys": 3},
    "long": {"vmap": 800, "pmap": 300, "map": 400, "policy": 150, "nested": 300, "keys": 200},
}[PROFILE]


# For quick experiments: STATEMAP_HYPOTHESIS_MAX_EXAMPLES=20 caps every property test.
_CAP = int(os.environ.get("STATEMAP_HYPOTHESIS_MAX_EXAMPLES", "0")) or None


def profile(which: str) -> settings:
    return settings(parent=_PARENT, max_examples=min(EXAMPLES[which], _CAP or EXAMPLES[which]))


# ---------------------------------------------------------------------------
# Checking one program.


def assert_close(actual: Any, expected: Any, what: str) -> None:
    """Same pytree structure; keys equal bit for bit; arrays of the same shape and dtype, close."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), f"{what}: {actual} vs {expected}"
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert_leaf_close(a, e, what)


def assert_leaf_close(actual: Any, expected: Any, what: str) -> None:
    actual, expected = jnp.asarray(actual), jnp.asarray(expected)
    if jax.dtypes.issubdtype(expected.dtype, jax.dtypes.prng_key) or jax.dtypes.issubdtype(
        actual.dtype, jax.dtypes.prng_key
    ):
        assert is_typed_key(actual) == is_typed_key(expected), (what, actual, expected)
        np.testing.assert_array_equal(key_bits(actual), key_bits(expected), err_msg=what)
        return
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-5, err_msg=what)


def assert_concrete(states: list[statemap.State]) -> None:
    for s in states:
        for leaf in jax.tree.leaves(s.value):
            assert not isinstance(leaf, jax.core.Tracer), f"{s!r} holds a tracer"


def assert_unchanged(saved: list[tuple[statemap.State, Any]]) -> None:
    for s, value in saved:
        assert s.value is value, f"{s!r} changed"
    assert_concrete([s for s, _ in saved])


def event(label: str) -> None:
    """hypothesis's ``event`` (shown by --hypothesis-show-statistics); a no-op outside a test."""
    if currently_in_test_context():
        _event(label)


def check(prog: Program, *whiches: str) -> None:
    """Run ``prog`` through each of statemap's ``whiches`` and through their one oracle
    (``jax.vmap``, or ``jax.pmap`` for mappings on devices); they must agree."""
    for op in sorted({type(op).__name__ for op in iter_ops(prog.ops)}):
        event(f"op {op}")
    for kind in sorted({s.kind if s.kind != "random" else f"random-{s.mode}" for s in prog.states}):
        event(f"state {kind}")
    if any(s.shape2 is not None for s in prog.states):
        event("state with a pytree value")
    if any(isinstance(op, Out) and isinstance(op.src, tuple) and op.src[0] == "key" for op in iter_ops(prog.ops)):
        event("key output")
    if prog.calls > 1 and prog.mutate != "no":
        event(f"host changes state {prog.mutate} between calls")
    if prog.pack and any(not a.keyword for a in prog.args):
        event("args packed in a dict")
    if "map" in whiches:
        event(f"map batch_size: {batch_kind(prog.n, prog.batch_size)}")
    assert len({on_devices(which) for which in whiches}) == 1, whiches  # one oracle for all
    if on_devices(whiches[0]) and prog.n > jax.local_device_count():
        return
    values = initial_values(prog)
    runs = []
    for which in whiches:
        states = make_states(prog, values)
        runs.append((which, states, make_mapping(prog, states, which)))
    want_values = dict(values)  # the oracle threads its own values from call to call
    compiled: dict[Any, Any] = {}  # the oracle's programs, kept from call to call
    for call in range(prog.calls):
        if call and prog.mutate != "no":
            for _, states, _ in runs:
                for j, new in mutated(prog, {j: s.value for j, s in enumerate(states)}).items():
                    states[j].value = new
            want_values = mutated(prog, want_values)
        args = arg_values(prog, call)
        want = oracle(prog, want_values, args, whiches[0], compiled)
        for which, states, mapping in runs:
            check_call(prog, which, states, mapping, args, want, call)
        if want.rejection:
            return
        want_values = want.values


def check_call(
    prog: Program, which: str, states: list[statemap.State], mapping: Any, args: list[Any], want: Expected, call: int
) -> None:
    """One call of ``mapping`` (statemap's ``which``) over ``states``: as ``want`` says."""
    pos, kw = call_arguments(prog, states, args)
    saved = [(s, s.value) for s in states]
    if prog.explain and call == 0:
        if want.rejection == "output":
            with pytest.raises(ValueError, match="varies across the mapped axis"):
                mapping.explain(*pos, **kw)
        else:
            text = str(mapping.explain(*pos, **kw))
            for j in want.refused:
                assert f"'s{j}'" in text, text
        assert_unchanged(saved)
    event(f"{which} call {call}: " + (f"refused ({want.rejection})" if want.rejection else "warned" if want.warned else "ran"))
    if want.rejection:
        check_rejection(mapping, pos, kw, want, saved)
        return
    if want.warned:
        with pytest.warns(UserWarning) as record:
            out = mapping(*pos, **kw)
        messages = [str(w.message) for w in record]
        assert len(messages) == len(want.warned), messages
        for j in want.warned:
            assert any(f"'s{j}'" in m and "unexpected_out_state_mapping='warn'" in m for m in messages), messages
    else:
        out = mapping(*pos, **kw)
    if on_devices(which):
        jax.block_until_ready((out, [s.value for s in states]))  # JAX-NOTES fact 10
    check_results(prog, states, saved, out, want, f"{which} call {call}")


def check_rejection(mapping: Any, pos: list[Any], kw: dict[str, Any], want: Expected, saved: list[Any]) -> None:
    if want.rejection == "output":
        with pytest.raises(ValueError, match="varies across the mapped axis"):
            mapping(*pos, **kw)
    else:
        with pytest.raises(statemap.BatchAxisError) as info:
            mapping(*pos, **kw)
        for j in want.refused:
            assert f"'s{j}'" in str(info.value), str(info.value)
    assert_unchanged(saved)


def check_results(prog: Program, states: list[statemap.State], saved: list[Any], out: Any, want: Expected, when: str) -> None:
    outs, made = out
    assert len(outs) == len(want.outs), (outs, want.outs)
    for i, (a, e) in enumerate(zip(outs, want.outs)):
        assert_close(a, e, f"{when}: output {i}")
    assert len(made) == len(want.made)
    for k, (m, e) in enumerate(zip(made, want.made)):
        assert isinstance(m, statemap.State) and m.name == f"m{k}", m
        assert_close(m.value, e, f"{when}: created state m{k}")
    assert_concrete(list(made))
    for j, (s, before) in enumerate(saved):
        if j in want.written or j in want.advanced:
            assert_close(s.value, want.values[j], f"{when}: state s{j} ({prog.states[j].kind})")
        else:
            assert s.value is before, f"{when}: state s{j} was not written but changed"
    assert_concrete(states)


def check_nested(nest: Nested, which: str) -> None:
    """``nest.prog`` under statemap.vmap, under statemap ``which``, against the nested oracle."""
    if on_devices(which) and nest.m > jax.local_device_count():
        return
    prog = nest.prog
    values = nested_values(nest)
    states = make_states(prog, values)
    args = arg_values(prog, 0)
    mapping = make_nested(nest, states, args, which)
    want = nested_oracle(nest, values, args, which)
    saved = [(s, s.value) for s in states]
    if which == "map":
        event(f"nested map batch_size: {batch_kind(nest.m, nest.batch_size)}")
    event(f"nested {which}: " + (f"refused ({want.rejection})" if want.rejection else "warned" if want.outer_warned else "ran"))
    if nest.outer_split:
        event("nested: states split at both levels" if any(
            entry_axis(prog.states[j]) is not None for j in nest.outer_split) else "nested: states split by the outer map")
    if want.rejection and want.warned:  # the inner call warns, then the outer one refuses
        with pytest.warns(UserWarning, match=f"'s{want.warned[0]}'"):
            check_rejection(mapping, [], {}, want, saved)
        return
    if want.rejection:
        check_rejection(mapping, [], {}, want, saved)
        return
    warned = [*want.warned, *want.outer_warned]
    if warned:
        with pytest.warns(UserWarning) as record:
            out = mapping()
        messages = [str(w.message) for w in record]
        assert len(messages) == len(warned), messages
        for j in warned:
            assert any(f"'s{j}'" in m for m in messages), (j, messages)
    else:
        out = mapping()
    if on_devices(which):
        jax.block_until_ready((out, [s.value for s in states]))
    check_results(prog, states, saved, out, want, "nested call")


# ---------------------------------------------------------------------------
# Pinned examples: kinds of program the few derandomized examples of the ci
# profile may miss, run by every profile.


def every_key_kind(which: str) -> Program:
    """A stack of legacy keys split on axis -1 and drawn from, a typed key broadcast
    and reseeded, a pytree state, a batched write the 'warn' policy stacks, and a
    second call after the host gives the broadcast states a new axis. (Kept to one
    draw: every draw compiles its own random-bit generator.)"""
    collective = which != "map"
    states = (
        StateDef("split", (2,), 0, "tag", cls="HiddenState"),
        StateDef("broadcast", (2,), cls="ParamState", shape2=(1,)),
        StateDef("random", axis=-1, select="withtag", mode="split", seed=2),
        StateDef("random", select="path", mode="broadcast", typed=True, seed=3),
        StateDef("broadcast"),
    )
    ops = (
        Read(("state", 1)),
        Draw(2, "uniform", ()),
        Reseed(3, 5),
        *([Psum()] if collective else []),
        Write(("state", 4), "update", ("arg", 0)),
        Write(("state", 0), "update", "acc"),
        Out(("key", 3), 0),
        Out("acc", 0),
    )
    return Program(
        n=4 if collective else 3,
        args=(Arg((2,), 0),),
        states=states,
        ops=ops,
        policy="warn",
        axis_name="i" if collective else None,
        in_order=(2, 0, 1),
        calls=2,
        mutate="shapes",
        batch_size=None if collective else 4,
    )


# A batched output on out_axes None: refused as an output, not a state.
BATCHED_OUTPUT_UNMAPPED = Program(
    n=2, args=(Arg((2,), 0),), states=(StateDef("broadcast", (2,)),), ops=(Read(("arg", 0)), Out("acc", None)), axis_name="i"
)

# Nested: a split state updated inside an outer statemap.map of one lane per chunk,
# and an inner write the outer pmap refuses (it varies along the outer axis only).
_INNER = Program(
    n=2,
    args=(Arg((2,), 0),),
    states=(StateDef("split", (2,), 0, "instance"), StateDef("broadcast", (2,))),
    ops=(Read(("state", 1)), Write(("state", 0), "update", "acc"), Out("acc", 0)),
)
NESTED_MAP = Nested(_INNER, m=3, outer_split=(0,), batch_size=2)
_OUTER_ONLY = Program(
    n=2,
    args=(Arg((2,), 0),),
    states=(StateDef("broadcast", (2,)), StateDef("broadcast", (2,))),
    ops=(Write(("state", 1), "update", ("state", 0)), Out(("arg", 0), 0)),
)
NESTED_OUTER_REFUSAL = Nested(_OUTER_ONLY, m=2, outer_split=(0,))

# A new State object as the argument, then a state that becomes None.
SWAP_THEN_NONE = KeyProgram(2, "float32", (KeyState("float", "weak", True),), 2, (("swap",), ("form", 0, "none")), False)


# ---------------------------------------------------------------------------
# The properties.


@profile("vmap")
@given(programs())
@example(every_key_kind("vmap"))
def test_vmap_matches_the_jax_vmap_oracle(prog: Program) -> None:
    check(prog, "vmap")


@profile("pmap")
@given(programs())
@example(every_key_kind("pmap"))
@example(BATCHED_OUTPUT_UNMAPPED)
def test_pmap_and_shard_map_match_the_jax_pmap_oracle(prog: Program) -> None:
    check(prog, "pmap", "shard_map")


@profile("map")
@given(programs("map"))
@example(every_key_kind("map"))
def test_map_matches_the_jax_vmap_oracle(prog: Program) -> None:
    check(prog, "map")


@profile("nested")
@given(nested_programs(), st.sampled_from(["vmap", "pmap", "map"]))
@example(NESTED_MAP, "map")
@example(NESTED_OUTER_REFUSAL, "pmap")
def test_nested_mappings_match_the_nested_oracle(nest: Nested, which: str) -> None:
    check_nested(nest, which)


@pytest.mark.parametrize("whiches", [("vmap",), ("pmap", "shard_map"), ("map",)], ids="+".join)
@profile("policy")
@given(st.data())
def test_batched_writes_follow_the_write_policy_as_the_oracle_says(whiches: tuple[str, ...], data: st.DataObject) -> None:
    check(data.draw(programs(whiches[0], batched_write=True), label="program"), *whiches)


# ---------------------------------------------------------------------------
# Regression tests for bugs the generator found (plain code, no hypothesis).


def test_regression_stale_plan_refusal_after_state_shape_change():
    """A plan built for other state shapes must not refuse the call before it is found stale."""
    s = statemap.State(jnp.zeros(()), name="s")

    def f(x):
        if s.value.ndim == 0:
            s.value = s.value + x  # a batched write: refused under 'raise'
        return x

    m = statemap.vmap(f)
    xs = jnp.arange(3.0)
    with pytest.raises(statemap.BatchAxisError):
        m(xs)
    s.value = jnp.zeros((2,))  # new shape: this signature writes nothing
    np.testing.assert_allclose(m(xs), xs)
    np.testing.assert_allclose(s.value, jnp.zeros((2,)))


def test_regression_stale_plan_warning_not_repeated_after_state_shape_change():
    """One warning per unexpected write, naming the current shape, also when the shape changed."""
    h = statemap.HiddenState(jnp.array([1.0]), tag="h")
    t = statemap.State(jnp.array(2.0), name="t")

    def g():
        t.value = jnp.cos(t.value) + h.value  # batched write to a broadcast state
        return ()

    m = statemap.vmap(g, state_in_axes={0: "h"}, unexpected_out_state_mapping="warn")
    with pytest.warns(UserWarning, match=r"'t' \(shape \(\)\)"):
        m()
    assert t.value.shape == (1,)
    with pytest.warns(UserWarning) as record:
        m()
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    assert "'t' (shape (1,))" in messages[0]
    np.testing.assert_allclose(t.value, jnp.cos(jnp.cos(2.0) + 1.0)[None, None] + 1.0, rtol=1e-6)


def test_regression_pmap_reads_a_state_it_stacked_as_broadcast_next_call():
    """A state stacked by one pmap call is read broadcast by the next: no JAX sharding error."""
    h = statemap.HiddenState(jnp.array([1.0, 2.0]), tag="h")
    t = statemap.State(jnp.array(2.0), name="t")

    def g():
        t.value = jnp.cos(t.value) + h.value  # batched write to a broadcast state
        return ()

    m = statemap.pmap(g, state_in_axes={0: "h"}, unexpected_out_state_mapping="ignore")
    m()
    first = np.cos(2.0) + np.array([1.0, 2.0])
    np.testing.assert_allclose(t.value, first, rtol=1e-6)
    m()
    jax.block_until_ready(t.value)
    np.testing.assert_allclose(t.value, np.cos(first)[None, :] + np.array([1.0, 2.0])[:, None], rtol=1e-6)

    w = statemap.State(jnp.zeros(()), name="w")
    w.value = statemap.pmap(lambda x: x * 2, axis_size=2)(jnp.arange(2.0))
    out = statemap.pmap(lambda x: x + w.value.sum())(jnp.arange(2.0))
    np.testing.assert_allclose(out, np.arange(2.0) + 2.0)


def test_regression_user_type_error_is_not_reported_as_missing_axis_size():
    """A TypeError from the user's function propagates as is, after one run of the function."""
    h = statemap.HiddenState(jnp.zeros(3), name="h")

    def f():
        return jnp.ones(2) + "oops"

    with pytest.raises(TypeError, match="unsupported operand"):
        statemap.vmap(f, state_in_axes=statemap.HiddenState)()

    runs = []

    def g():
        runs.append(1)
        return h.value + "oops"

    with pytest.raises(TypeError, match="unsupported operand"):
        statemap.vmap(g, state_in_axes=statemap.HiddenState)()
    assert len(runs) == 1


# ---------------------------------------------------------------------------
# Warm calls against cold calls, the host changing what the plan key covers.


def assert_same_leaf(actual: Any, expected: Any, what: str, exact: bool) -> None:
    """Same dtype and weak type; values equal (``exact``) or close."""
    actual, expected = jnp.asarray(actual), jnp.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert jax.typeof(actual).weak_type == jax.typeof(expected).weak_type, f"{what}: weak type differs"
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if exact:
        np.testing.assert_array_equal(a, e, err_msg=what)
    else:
        np.testing.assert_allclose(a, e, rtol=1e-2, atol=1e-2, err_msg=what)


@profile("keys")
@given(key_programs())
@example(SWAP_THEN_NONE)
def test_warm_calls_match_cold_calls_when_the_plan_key_changes(prog: KeyProgram) -> None:
    states = [statemap.State(key_value(d, d.form, 0), name=f"s{j}") for j, d in enumerate(prog.states)]
    mapping = key_mapping(prog, states)
    s_arg = statemap.State(jnp.float32(1.0), name="arg")
    k = prog.static
    for call, change in enumerate((("same",), *prog.changes)):
        event(f"keys: change {change[0]}")
        if change[0] == "form":
            _, j, form = change
            states[j].value = key_value(prog.states[j], form, call)
        elif change[0] == "static":
            k = change[1]
        elif change[0] == "swap":
            s_arg = statemap.State(s_arg.value, name="arg")
        x = key_argument(prog, call)
        values, arg_value = [s.value for s in states], s_arg.value
        cold_states = [statemap.State(v) for v in values]
        cold_arg = statemap.State(arg_value)
        cold = key_call(prog, key_mapping(prog, cold_states), x, k, cold_arg)
        warm = key_call(prog, mapping, x, k, s_arg)
        want, want_values, want_arg = key_oracle(prog, x, k, values, arg_value)
        when = f"call {call} after {change} (k={k!r})"
        assert_same_leaf(warm, cold, f"{when}: output, warm vs cold", exact=True)
        assert_same_leaf(warm, want, f"{when}: output vs jax.vmap", exact=False)
        for j, (s, c, w) in enumerate(zip(states, cold_states, want_values)):
            assert_same_leaf(s.value, c.value, f"{when}: s{j}, warm vs cold", exact=True)
            assert_same_leaf(s.value, w, f"{when}: s{j} vs jax.vmap", exact=False)
        assert_same_leaf(s_arg.value, want_arg, f"{when}: argument state", exact=True)
