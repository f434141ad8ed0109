import functools

import jax
import jax.numpy as jnp
import pytest

import statemap
from statemap import errors
from statemap.filters import PathContains, WithTag

from helpers import arr, assert_tree_allclose, assert_unchanged, snapshot


def test_all_is_pinned():
    assert errors.__all__ == ["AxisNameError", "BatchAxisError", "StateTypeError", "StatemapError", "TracedStateError"]


def test_hierarchy():
    assert issubclass(errors.StatemapError, Exception)
    assert issubclass(errors.BatchAxisError, errors.StatemapError)
    assert issubclass(errors.BatchAxisError, ValueError)
    assert issubclass(errors.StateTypeError, errors.StatemapError)
    assert issubclass(errors.StateTypeError, TypeError)
    assert issubclass(errors.AxisNameError, errors.StatemapError)
    assert issubclass(errors.AxisNameError, NameError)
    assert issubclass(errors.TracedStateError, errors.StatemapError)
    assert issubclass(errors.TracedStateError, TypeError)


@pytest.mark.parametrize("caught", [errors.BatchAxisError, errors.StatemapError, ValueError])
def test_batch_axis_error_is_caught_as(caught):
    with pytest.raises(caught, match="names the state"):
        raise errors.BatchAxisError("names the state")


def test_statemap_error_is_not_a_value_error():
    assert not issubclass(errors.StatemapError, ValueError)


def test_top_level_export_is_the_same_class():
    assert statemap.BatchAxisError is errors.BatchAxisError


# Errors that point at the real fix. Each failing call leaves every state as it was.


@pytest.fixture
def states():
    return statemap.State(jnp.zeros(()), name="total"), statemap.RandomState(0, name="noise")


def _touching(states, fn):
    """``fn`` after writing and drawing from ``states``, so a failure has something to undo."""
    total, noise = states

    def wrapped(*args, **kwargs):
        total.value = total.value + 1.0
        noise.normal(())
        return fn(*args, **kwargs)

    return wrapped


def test_a_scalar_argument_on_a_mapped_axis_has_no_axis_to_map(states):
    saved = snapshot(states)
    step = statemap.vmap(_touching(states, lambda x, k: x * k))
    with pytest.raises(ValueError, match=r"argument args\[1\] on axis 0, but it is a scalar \(shape \(\)\) with no axis to map\. Give it `None` in `in_axes` \(`in_axes=\(0, None\)`\).*static if it is a Python number \(`static_argnums`\)"):
        step(arr(3), jnp.float32(2.0))
    assert_unchanged(saved)
    # The first fix works.
    assert_tree_allclose(statemap.vmap(lambda x, k: x * k, (0, None))(arr(3), jnp.float32(2.0)), arr(3) * 2.0)


def test_a_scalar_keyword_argument_is_passed_positionally_or_closed_over(states):
    saved = snapshot(states)
    step = statemap.vmap(_touching(states, lambda x, k: x * k))
    with pytest.raises(ValueError, match=r"keyword argument kwargs\['k'\] is a scalar \(shape \(\)\), so it has no axis to map, and keyword arguments are always mapped on axis 0.*positionally with `None` for it in `in_axes`.*close over it"):
        step(arr(3), k=jnp.float32(2.0))
    assert_unchanged(saved)


def test_pmap_scalar_argument_names_its_static_argnums(states):
    step = statemap.pmap(_touching(states, lambda x, k: x * k))
    with pytest.raises(ValueError, match=r"args\[1\].*scalar.*`static_broadcasted_argnums`"):
        step(arr(2), jnp.float32(2.0))


def test_a_collective_without_axis_name_says_axis_name_is_missing(states):
    saved = snapshot(states)
    step = statemap.vmap(_touching(states, lambda x: jax.lax.psum(x, "batch")))
    with pytest.raises(errors.AxisNameError, match=r"statemap\.vmap: a collective \(`jax\.lax\.psum`, `pmean`, `axis_index`, \.\.\.\) uses the axis 'batch', but no enclosing mapping binds an axis name: `axis_name=` is missing.*`statemap\.vmap\(f, axis_name='batch'\)`") as info:
        step(arr(3))
    assert isinstance(info.value, NameError) and isinstance(info.value.__cause__, NameError)
    assert_unchanged(saved)
    assert_tree_allclose(statemap.vmap(lambda x: jax.lax.psum(x, "batch"), axis_name="batch")(arr(3)), jnp.full(3, arr(3).sum()))


def test_a_collective_with_a_wrong_axis_name_lists_the_bound_names(states):
    saved = snapshot(states)
    inner = statemap.vmap(_touching(states, lambda x: jax.lax.pmean(x, "devcies")))
    outer = statemap.pmap(lambda x: inner(x), axis_name="devices")
    with pytest.raises(errors.AxisNameError, match=r"statemap\.vmap: a collective .* uses the axis 'devcies', which no enclosing mapping binds \(bound axis names: 'devices'\)"):
        outer(arr(2, 3))
    assert_unchanged(saved)


def test_axis_index_with_an_unbound_name_under_jit():
    with pytest.raises(errors.AxisNameError, match=r"statemap\.jit: a collective .* uses the axis 'i', but no enclosing mapping binds"):
        statemap.jit(lambda x: x + jax.lax.axis_index("i"))(arr(3))


def test_a_running_statistic_that_forgot_pmean_is_offered_pmean():
    mean = statemap.LongTermState(jnp.zeros(()), name="mean")
    saved = snapshot([mean])

    def step(x):
        mean.value = 0.9 * mean.value + 0.1 * x.mean()
        return x

    with pytest.raises(errors.BatchAxisError, match=r"(?s)State 'mean'.*average it over the lanes first: `jax\.lax\.pmean\(value, axis_name\)`, with the mapping's `axis_name=`"):
        statemap.vmap(step, axis_name="batch")(arr(4, 3))
    assert_unchanged(saved)

    def fixed(x):
        mean.value = 0.9 * mean.value + 0.1 * jax.lax.pmean(x.mean(), "batch")
        return x

    statemap.vmap(fixed, axis_name="batch")(arr(4, 3))
    assert_tree_allclose(mean.value, 0.1 * arr(4, 3).mean())


def test_a_str_filter_naming_a_state_by_its_name_warns_that_it_matches_tags(states):
    """As the filter says, the state is broadcast (a str is ``WithTag``); the likely mistake is flagged."""
    h = statemap.HiddenState(arr(4, 3), name="h")
    step = statemap.vmap(_touching(states, lambda x: h.value + x), state_in_axes={0: "h"})
    with pytest.warns(UserWarning, match=r"`state_in_axes` has the str filter 'h', which selects states by tag, and the function touches HiddenState 'h' \(shape \(4, 3\)\), whose name \(not tag\) is 'h'.*`statemap\.filters\.PathContains\('h'\)`"):
        out = step(arr(4))
    assert_tree_allclose(out, h.value[None] + arr(4)[:, None, None])
    by_name = statemap.vmap(lambda x: h.value + x, state_in_axes={0: PathContains("h")})
    assert_tree_allclose(by_name(arr(4)), h.value + arr(4)[:, None])


def test_a_str_filter_equal_to_one_state_name_still_selects_the_states_tagged_with_it():
    named = statemap.State(jnp.arange(3.0), name="h")
    tagged = statemap.HiddenState(jnp.arange(4.0), tag="h")
    step = statemap.vmap(lambda x: named.value.sum() + tagged.value + x, state_in_axes="h")
    with pytest.warns(UserWarning, match="str filter 'h'"):
        out = step(jnp.arange(4.0))
    assert_tree_allclose(out, 3.0 + 2 * jnp.arange(4.0))


def test_a_str_filter_in_state_out_axes_and_in_a_list_is_checked_too():
    c = statemap.State(jnp.zeros(()), name="c")
    step = statemap.vmap(lambda x: setattr(c, "value", c.value + 1) or x, state_out_axes={0: [statemap.ParamState, "c"]})
    with pytest.warns(UserWarning, match=r"`state_out_axes` has the str filter 'c'"):
        step(arr(3))
    assert_tree_allclose(c.value, 1.0)  # not selected: written as is


def test_an_explicit_with_tag_filter_is_taken_at_its_word():
    h = statemap.State(arr(3), name="h")
    step = statemap.vmap(lambda x: h.value + x, state_in_axes={0: WithTag("h")})
    assert_tree_allclose(step(arr(2)), arr(3)[None, :] + arr(2)[:, None])


def test_a_str_filter_that_selects_by_tag_is_not_flagged():
    h = statemap.State(arr(3), name="h", tag="h")
    assert statemap.vmap(lambda x: h.value + x, state_in_axes={0: "h"})(arr(3)).shape == (3,)


def test_branching_on_a_state_names_the_state_and_the_fix(states):
    training = statemap.State(jnp.array(True), name="training")
    saved = snapshot([training, *states])

    def step(x):
        if training.value:
            return x * 0.5
        return x

    with pytest.raises(errors.TracedStateError, match=r"statemap\.vmap: Python control flow \(`if`/`while`/`bool\(\)`\) on the value of State 'training' \(shape \(\)\), at .*test_errors\.py:\d+ \(`if training\.value:`\).*`jnp\.where\(cond, a, b\)`.*`statemap\.cond\(pred, true_fn, false_fn\)`.*`static_argnames=`") as info:
        statemap.vmap(_touching(states, step))(arr(3))
    assert isinstance(info.value.__cause__, jax.errors.TracerBoolConversionError)
    assert_unchanged(saved)


def test_a_state_value_branched_on_through_a_local_is_named():
    count = statemap.State(jnp.int32(3), name="count")

    def step(x):
        n = count.value
        for _ in range(n):
            x = x + 1
        return x

    with pytest.raises(errors.TracedStateError, match=r"\(`int\(\)`/`range\(\)`/indexing\) on the value of State 'count'"):
        statemap.jit(step)(arr(3))


def test_a_branch_on_an_argument_keeps_jax_error():
    def step(x):
        return x if x.sum() > 0 else -x

    with pytest.raises(jax.errors.TracerBoolConversionError):
        statemap.vmap(step)(arr(3))


def test_explain_titles_a_partial_with_the_wrapped_function_name():
    def scale(x, k):
        return x * k

    mapping = statemap.vmap(functools.partial(scale, k=2.0))
    assert mapping.__name__ == "scale"
    assert str(mapping.explain(arr(3))).startswith("statemap.vmap plan for scale: 3 lanes")


def test_warnings_name_the_users_line():
    """Under Python's default filters a warning shows once per line it names: the user's, not statemap's."""
    s = statemap.State(jnp.zeros(4), name="s")
    stacked = statemap.vmap(lambda x: setattr(s, "value", x) or x, unexpected_out_state_mapping="warn")
    with pytest.warns(UserWarning, match="was written with a value that varies") as record:
        stacked(arr(4, 4))
    assert record[0].filename == __file__
    tag = statemap.State(arr(3), name="h")
    with pytest.warns(UserWarning, match="str filter 'h'") as record:
        statemap.vmap(lambda x: tag.value + x, state_in_axes="h")(arr(2))
    assert record[0].filename == __file__
