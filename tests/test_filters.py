import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import statemap
from statemap import filters


def path_of(state):
    return () if state.name is None else (state.name,)


def selects(filter, state):
    return filters.to_predicate(filter)(path_of(state), state)


@pytest.fixture
def w():
    return statemap.ParamState(jnp.zeros(3), name="w", tag="encoder")


@pytest.fixture
def h():
    return statemap.HiddenState(jnp.zeros(3), tag="rnn")


@pytest.fixture
def c():
    return statemap.ShortTermState(jnp.zeros(()), name="count")


def test_all_is_pinned():
    assert filters.__all__ == [
        "All",
        "Any",
        "Everything",
        "Filter",
        "Not",
        "Nothing",
        "OfType",
        "PathContains",
        "Predicate",
        "WithTag",
        "to_predicate",
    ]


def test_of_type(w, h):
    params = filters.OfType(statemap.ParamState)
    assert params(("w",), w) is True
    assert params((), h) is False
    assert filters.OfType(statemap.State)((), h) is True
    assert repr(params) == "OfType(type=ParamState)"


def test_with_tag(w, h, c):
    rnn = filters.WithTag("rnn")
    assert rnn((), h) is True
    assert rnn(("w",), w) is False
    assert rnn(("count",), c) is False
    assert repr(rnn) == "WithTag(tag='rnn')"


def test_path_contains(w, h):
    assert filters.PathContains("w")(("w",), w) is True
    assert filters.PathContains("w")((), h) is False
    assert filters.PathContains("w")(("v",), w) is False
    assert filters.PathContains("w")((), w) is False


def test_any(w, h, c):
    either = filters.Any(statemap.ParamState, "rnn")
    assert [either(path_of(s), s) for s in (w, h, c)] == [True, True, False]
    assert filters.Any()(("w",), w) is False
    assert either == filters.Any(filters.OfType(statemap.ParamState), filters.WithTag("rnn"))
    assert repr(either) == "Any(OfType(type=ParamState), WithTag(tag='rnn'))"


def test_all(w, h, c):
    both = filters.All(statemap.ParamState, "encoder")
    assert [both(path_of(s), s) for s in (w, h, c)] == [True, False, False]
    assert filters.All()(("w",), w) is True
    assert repr(both) == "All(OfType(type=ParamState), WithTag(tag='encoder'))"


def test_not(w, h):
    not_params = filters.Not(statemap.ParamState)
    assert not_params(("w",), w) is False
    assert not_params((), h) is True
    assert not_params == filters.Not(filters.OfType(statemap.ParamState))
    assert repr(not_params) == "Not(filter=OfType(type=ParamState))"


def test_everything_and_nothing(w, h):
    assert filters.Everything()(("w",), w) is True
    assert filters.Everything()((), h) is True
    assert filters.Nothing()(("w",), w) is False
    assert filters.Nothing()((), h) is False


@pytest.mark.parametrize(
    "given, expected",
    [
        (True, filters.Everything()),
        (..., filters.Everything()),
        (False, filters.Nothing()),
        (None, filters.Nothing()),
        (statemap.ParamState, filters.OfType(statemap.ParamState)),
        ("rnn", filters.WithTag("rnn")),
        ([statemap.ParamState, "rnn"], filters.Any(statemap.ParamState, "rnn")),
        ((statemap.ParamState, "rnn"), filters.Any(statemap.ParamState, "rnn")),
        ([], filters.Any()),
    ],
)
def test_to_predicate_forms(given, expected):
    assert filters.to_predicate(given) == expected


def test_bools_are_not_ints(w):
    assert filters.to_predicate(True) == filters.Everything()
    assert filters.to_predicate(False) == filters.Nothing()
    with pytest.raises(TypeError, match=r"cannot use 1 \(int\) as a filter"):
        filters.to_predicate(1)


def test_normalised_filters_and_callables_are_used_as_is(w):
    for already in (filters.Everything(), filters.Not("x"), filters.PathContains("w")):
        assert filters.to_predicate(already) is already

    def named_w(path, state):
        return path == ("w",)

    assert filters.to_predicate(named_w) is named_w
    assert selects(named_w, w) is True


def test_one_state_selects_only_itself(w, h):
    twin = statemap.ParamState(jnp.zeros(3), name="w", tag="encoder")
    assert selects(w, w) is True
    assert selects(w, twin) is False
    assert selects(w, h) is False


@pytest.mark.parametrize("container", [list, tuple, set, frozenset, lambda xs: (x for x in xs)])
def test_iterables_of_states_select_by_identity(container, w, h, c):
    chosen = filters.to_predicate(container([w, h]))
    assert [chosen(path_of(s), s) for s in (w, h, c)] == [True, True, False]


def test_identity_filters_compare_by_the_states_they_hold(w, h):
    assert filters.to_predicate(w) == filters.to_predicate([w])
    assert filters.to_predicate([w, w]) == filters.to_predicate(w)
    assert filters.to_predicate([w]) != filters.to_predicate([h])


def test_states_mixed_with_other_filters(w, h, c):
    mixed = [h, statemap.ShortTermState]
    assert [selects(mixed, s) for s in (w, h, c)] == [False, True, True]


def test_nested_lists_mean_any_of_any(w, h, c):
    nested = [["encoder"], (statemap.ShortTermState,)]
    assert [selects(nested, s) for s in (w, h, c)] == [True, False, True]


def test_filters_are_frozen_and_hashable():
    f = filters.Any(statemap.ParamState, "rnn")
    with pytest.raises(AttributeError):
        f.filters = ()
    assert hash(f) == hash(filters.Any(statemap.ParamState, "rnn"))
    assert {filters.Not("x"): 1}[filters.Not("x")] == 1


GENERIC = r"statemap\.filters\.to_predicate: cannot use {} as a filter\. Use a State type"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: filters.to_predicate(3.5), GENERIC.format(r"3\.5 \(float\)")),
        (lambda: filters.to_predicate(object()), GENERIC.format(r"<object object at .*> \(object\)")),
        (lambda: filters.to_predicate({0: statemap.ParamState}), GENERIC.format(r".* \(dict\)")),
        (lambda: filters.to_predicate(jnp.asarray(1.0)), GENERIC.format(r"Array\(1\., .*\)")),
        (lambda: filters.Not(3.5), GENERIC.format(r"3\.5 \(float\)")),
        (lambda: filters.Any("x", 3.5), GENERIC.format(r"3\.5 \(float\)")),
        (lambda: filters.All(object()), GENERIC.format(r".* \(object\)")),
        (lambda: filters.to_predicate([statemap.ParamState, 3.5]), GENERIC.format(r"3\.5 \(float\)")),
        (
            lambda: filters.to_predicate({1, 2}),
            r"cannot use \{1, 2\} \(set\) as a filter: this set may hold only States, "
            r"but it holds 1 \(int\)\. Combine filters in a list or tuple",
        ),
        (
            lambda: filters.OfType(3),
            r"statemap\.filters\.OfType: `type` must be a class, got 3 \(int\)\. "
            r"Use a State subclass",
        ),
        (
            lambda: filters.WithTag(3),
            r"statemap\.filters\.WithTag: `tag` must be a str, got 3 \(int\)\.",
        ),
    ],
)
def test_bad_filters_raise_type_error(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_zero_dim_array_is_not_iterated():
    with pytest.raises(TypeError, match=GENERIC.format(r"array\(3\.\) \(ndarray\)")):
        filters.to_predicate(np.array(3.0))


PRIMITIVES = st.sampled_from(
    [
        filters.OfType(statemap.ParamState),
        filters.OfType(statemap.HiddenState),
        filters.WithTag("encoder"),
        filters.WithTag("rnn"),
        filters.PathContains("w"),
        filters.Everything(),
        filters.Nothing(),
    ]
)
FILTERS = st.recursive(
    PRIMITIVES,
    lambda inner: st.one_of(
        st.builds(filters.Not, inner),
        st.lists(inner, max_size=3).map(lambda fs: filters.Any(*fs)),
        st.lists(inner, max_size=3).map(lambda fs: filters.All(*fs)),
    ),
    max_leaves=8,
)


@given(FILTERS, FILTERS)
def test_combinators_follow_boolean_logic(a, b):
    states = [
        statemap.ParamState(jnp.zeros(1), name="w", tag="encoder"),
        statemap.HiddenState(jnp.zeros(1), tag="rnn"),
        statemap.State(jnp.zeros(1)),
    ]
    for s in states:
        p = path_of(s)
        assert filters.Not(filters.Any(a, b))(p, s) == filters.All(filters.Not(a), filters.Not(b))(p, s)
        assert filters.Any(a, b)(p, s) == (a(p, s) or b(p, s))
        assert filters.All(a, b)(p, s) == (a(p, s) and b(p, s))
        assert filters.Not(filters.Not(a))(p, s) == a(p, s)
        assert filters.to_predicate([a, b])(p, s) == filters.Any(a, b)(p, s)
