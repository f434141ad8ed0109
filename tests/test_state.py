import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statemap

SUBCLASSES = [
    statemap.ParamState,
    statemap.ShortTermState,
    statemap.LongTermState,
    statemap.HiddenState,
]


# State


@pytest.mark.parametrize("cls", [statemap.State, *SUBCLASSES])
def test_value_reads_and_writes(cls):
    s = cls(jnp.zeros(3))
    assert issubclass(cls, statemap.State)
    np.testing.assert_array_equal(s.value, np.zeros(3))
    s.value = s.value + 2
    np.testing.assert_array_equal(s.value, np.full(3, 2.0))


def test_name_and_tag_default_to_none():
    s = statemap.State(jnp.zeros(()))
    assert s.name is None and s.tag is None


def test_name_and_tag_are_kept():
    s = statemap.ParamState(jnp.zeros(()), name="w", tag="encoder")
    assert s.name == "w" and s.tag == "encoder"


def test_value_may_be_a_pytree_of_arrays_and_numbers():
    value = {"w": jnp.ones((2, 3)), "b": [np.zeros(3), 1.0]}
    s = statemap.State(value)
    assert s.value is value


def test_a_state_is_an_identity_not_a_pytree():
    s = statemap.State({"a": jnp.ones(2), "b": jnp.zeros(3)})
    assert jax.tree.leaves([s]) == [s]
    assert statemap.State(jnp.ones(2)) != statemap.State(jnp.ones(2))
    assert len({s, s, statemap.State(jnp.ones(2))}) == 2


@pytest.mark.parametrize(
    "state, expected",
    [
        (statemap.State(jnp.zeros(3), name="w"), "State(name='w', value=float32[3])"),
        (
            statemap.ParamState(jnp.ones((2, 3)), name="w", tag="enc"),
            "ParamState(name='w', tag='enc', value=float32[2, 3])",
        ),
        (statemap.ShortTermState(jnp.zeros((), jnp.int32), tag="c"), "ShortTermState(tag='c', value=int32[])"),
        (statemap.LongTermState(jnp.zeros(4)), "LongTermState(value=float32[4])"),
        (statemap.HiddenState(jnp.zeros((8, 16)), name="h"), "HiddenState(name='h', value=float32[8, 16])"),
    ],
)
def test_repr_shows_type_name_tag_shape_and_dtype(state, expected):
    assert repr(state) == expected


def test_repr_of_a_pytree_value_summarises_every_leaf():
    s = statemap.ParamState({"b": jnp.zeros(2), "w": jnp.zeros((2, 3), jnp.int32)}, name="layer")
    text = repr(s)
    assert text.startswith("ParamState(name='layer', value=")
    assert "float32[2]" in text and "int32[2, 3]" in text


def test_repr_does_not_show_whole_arrays():
    s = statemap.State(jnp.arange(1000.0), name="big")
    assert repr(s) == "State(name='big', value=float32[1000])"


@pytest.mark.parametrize("cls", [statemap.State, *SUBCLASSES])
def test_bad_tag_is_a_type_error(cls):
    with pytest.raises(TypeError, match=rf"statemap\.{cls.__name__}: `tag` must be a str or None, got int: 3"):
        cls(jnp.zeros(()), tag=3)


def test_bad_name_is_a_type_error():
    with pytest.raises(TypeError, match=r"`name` must be a str or None, got tuple: \('w',\)"):
        statemap.State(jnp.zeros(()), name=("w",))


@pytest.mark.parametrize("value", ["abc", {"w": object()}, [jnp.zeros(2), None, "x"]])
def test_bad_value_is_a_type_error(value):
    with pytest.raises(TypeError, match=r"statemap\.State: `value` must be a pytree of arrays.*leaf of type (str|object)"):
        statemap.State(value)


def test_bad_value_written_is_a_type_error_and_keeps_the_old_value():
    s = statemap.ParamState(jnp.zeros(2), name="w")
    old = s.value
    with pytest.raises(TypeError, match=r"statemap\.ParamState\.value: `value` must be a pytree of arrays.*str"):
        s.value = "not an array"
    assert s.value is old


# StateTrace


def test_trace_records_states_in_first_touch_order():
    a, b, c = (statemap.State(jnp.full(2, float(i)), name=n) for i, n in enumerate("abc"))
    untouched = statemap.State(jnp.zeros(2))
    with statemap.StateTrace() as trace:
        b.value  # noqa: B018 (a read)
        a.value = a.value + c.value
        b.value = b.value * 2
    assert trace.states == (b, a, c)
    assert trace.written == (a, b)
    assert untouched not in trace.states


def test_trace_written_is_in_first_write_order_and_counts_write_only_states():
    a, b = statemap.State(jnp.zeros(())), statemap.State(jnp.zeros(()))
    with statemap.StateTrace() as trace:
        b.value = jnp.ones(())
        a.value = jnp.ones(())
        b.value = jnp.ones(())
    assert trace.states == (b, a)
    assert trace.written == (b, a)


def test_restore_puts_back_first_touch_values():
    a0, b0 = jnp.zeros(2), jnp.ones(2)
    a, b = statemap.State(a0), statemap.State(b0)
    with statemap.StateTrace() as trace:
        a.value = a.value + 1
        a.value = a.value + 1
        b.value  # noqa: B018
    np.testing.assert_array_equal(a.value, np.full(2, 2.0))
    trace.restore()
    assert a.value is a0
    assert b.value is b0


def test_creating_a_state_is_not_a_touch_but_using_it_is():
    with statemap.StateTrace() as trace:
        s = statemap.State(jnp.zeros(()))
        created_only = trace.states
        s.value = s.value + 1
    assert created_only == ()
    assert trace.states == (s,) and trace.written == (s,)


def test_nested_traces_outer_sees_inner_touches():
    a, b, c = (statemap.State(jnp.zeros(())) for _ in range(3))
    with statemap.StateTrace() as outer:
        c.value  # noqa: B018
        with statemap.StateTrace() as inner:
            a.value = a.value + 1
            b.value  # noqa: B018
        after_inner = a.value
    assert inner.states == (a, b) and inner.written == (a,)
    assert outer.states == (c, a, b) and outer.written == (a,)
    # The outer trace remembers a's value from before the inner trace touched it.
    outer.restore()
    assert float(a.value) == 0.0
    assert float(after_inner) == 1.0


def test_inner_restore_restores_only_what_it_saw():
    a, b = statemap.State(jnp.zeros(())), statemap.State(jnp.zeros(()))
    with statemap.StateTrace():
        b.value = jnp.ones(())
        with statemap.StateTrace() as inner:
            a.value = jnp.ones(())
            b.value = jnp.full((), 2.0)
        inner.restore()
    assert float(a.value) == 0.0
    assert float(b.value) == 1.0


def test_a_trace_cannot_be_entered_twice():
    trace = statemap.StateTrace()
    with trace:
        with pytest.raises(RuntimeError, match=r"StateTrace: this trace is already active"):
            trace.__enter__()


def test_traces_must_exit_in_reverse_order():
    outer, inner = statemap.StateTrace(), statemap.StateTrace()
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(RuntimeError, match=r"must be exited in the reverse order"):
        outer.__exit__(None, None, None)
    inner.__exit__(None, None, None)
    outer.__exit__(None, None, None)
    s = statemap.State(jnp.zeros(()))
    s.value  # noqa: B018  (no trace is active any more)
    assert outer.states == () and inner.states == ()


def test_a_trace_can_be_reused_after_exit():
    s = statemap.State(jnp.zeros(()))
    trace = statemap.StateTrace()
    with trace:
        pass
    with trace:
        s.value  # noqa: B018
    assert trace.states == (s,)


def test_trace_is_thread_local():
    mine, theirs = statemap.State(jnp.zeros(())), statemap.State(jnp.zeros(()))
    entered, touched = threading.Event(), threading.Event()
    seen_by_other = []

    def other_thread():
        entered.wait(10)
        theirs.value = theirs.value + 1
        with statemap.StateTrace() as other:
            theirs.value  # noqa: B018
        seen_by_other.append(other.states)
        touched.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with statemap.StateTrace() as trace:
        entered.set()
        assert touched.wait(10)
        mine.value = mine.value + 1
    worker.join(10)
    assert trace.states == (mine,) and trace.written == (mine,)
    assert seen_by_other == [(theirs,)]
    assert float(theirs.value) == 1.0
