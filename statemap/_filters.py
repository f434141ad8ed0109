"""Filters: small frozen predicates that select states, and ``to_predicate``."""

from __future__ import annotations

import builtins
import typing
from collections.abc import Callable, Iterable, Mapping
from types import EllipsisType

import attrs

from ._identity import IsState
from ._state import State

__all__ = [
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

#: A normalised filter: ``predicate(path, state) -> bool``.
Predicate: typing.TypeAlias = Callable[[tuple[typing.Any, ...], State], bool]

#: Every form accepted wherever statemap takes a filter; see :func:`to_predicate`.
Filter: typing.TypeAlias = (
    type | str | bool | EllipsisType | None | State | Iterable["Filter"] | Predicate
)

_FORMS = (
    "Use a State type, a tag str, True/False/..., None, a State, an iterable of States, "
    "a list/tuple of filters, or a callable predicate(path, state) -> bool."
)


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_type(instance: OfType, attribute: attrs.Attribute[type], value: object) -> None:
    if not isinstance(value, type):
        raise TypeError(
            f"statemap.filters.OfType: `type` must be a class, got {_describe(value)}. "
            f"Use a State subclass, e.g. `OfType(statemap.ParamState)`."
        )


def _check_tag(instance: WithTag, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(
            f"statemap.filters.WithTag: `tag` must be a str, got {_describe(value)}. "
            f"Use the tag given to the state, e.g. `WithTag('batch_stats')`."
        )


@attrs.frozen
class OfType:
    """Selects the states that are instances of ``type`` (subclasses included).

    A bare type used as a filter means ``OfType(type)``.

    Args:
      type: the class to select, usually a ``State`` subclass.

    Raises:
      TypeError: if ``type`` is not a class.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> from statemap import filters
      >>> w = statemap.ParamState(jnp.zeros(3), name='w')
      >>> h = statemap.HiddenState(jnp.zeros(3), name='h')
      >>> params = filters.OfType(statemap.ParamState)
      >>> params(('w',), w), params(('h',), h)
      (True, False)
      >>> params
      OfType(type=ParamState)
    """

    type: builtins.type = attrs.field(validator=_check_type, repr=lambda t: t.__qualname__)

    def __call__(self, path: tuple[typing.Any, ...], state: State) -> bool:
        return isinstance(state, self.type)


@attrs.frozen
class WithTag:
    """Selects the states whose ``tag`` equals ``tag``.

    A bare str used as a filter means ``WithTag(str)``.

    Args:
      tag: the tag to select.

    Raises:
      TypeError: if ``tag`` is not a str.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> from statemap import filters
      >>> stats = statemap.LongTermState(jnp.zeros(3), tag='batch_stats')
      >>> filters.WithTag('batch_stats')((), stats)
      True
      >>> filters.WithTag('other')((), stats)
      False
    """

    tag: str = attrs.field(validator=_check_tag)

    def __call__(self, path: tuple[typing.Any, ...], state: State) -> bool:
        return state.tag == self.tag


@attrs.frozen
class PathContains:
    """Selects the states whose path contains ``key``.

    The path of a closed-over state is ``()``, or ``(state.name,)`` when it
    has a name, so ``PathContains('w')`` selects the state named ``'w'``.

    Args:
      key: the path entry to look for.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> from statemap import filters
      >>> w = statemap.ParamState(jnp.zeros(3), name='w')
      >>> filters.PathContains('w')(('w',), w)
      True
      >>> filters.PathContains('w')((), w)
      False
    """

    key: typing.Hashable

    def __call__(self, path: tuple[typing.Any, ...], state: State) -> bool:
        return self.key in path


def _to_predicate(filter: Filter) -> Predicate:
    return to_predicate(filter)  # defined below; looked up when called


def _predicates(filters: tuple[Filter, ...]) -> tuple[Predicate, ...]:
    return tuple(to_predicate(f) for f in filters)


def _repr_args(name: str, filters: tuple[Predicate, ...]) -> str:
    return f"{name}({', '.join(map(repr, filters))})"


@attrs.frozen(init=False, repr=False)
class Any:
    """Selects the states that any of ``filters`` selects; ``Any()`` selects none.

    A list or tuple used as a filter means ``Any(*items)``.

    Args:
      *filters: filters in any form :func:`to_predicate` accepts.

    Raises:
      TypeError: if one of ``filters`` is not a filter.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> from statemap import filters
      >>> h = statemap.HiddenState(jnp.zeros(3), name='h')
      >>> either = filters.Any(statemap.ParamState, 'rnn')
      >>> either
      Any(OfType(type=ParamState), WithTag(tag='rnn'))
      >>> either(('h',), h)
      False
    """

    filters: tuple[Predicate, ...]

    def __init__(self, *filters: Filter) -> None:
        self.__attrs_init__(_predicates(filters))

    def __call__(self, path: tuple[typing.Any, ...], state: State) -> bool:
        return any(f(path, state) for f in self.filters)

    def __repr__(self) -> str:
        return _repr_args("Any", self.filters)


@attrs.frozen(init=False, repr=False)
class All:
    """Selects the states that every one of ``filters`` selects; ``All()`` selects all.

    Args:
      *filters: filters in any form :func:`to_predicate` accepts.

    Raises:
      TypeError: if one of ``filters`` is not a filter.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> from statemap import filters
      >>> w = statemap.ParamState(jnp.zeros(3), name='w', tag='encoder')
      >>> filters.All(statemap.ParamState, 'encoder')(('w',), w)
      True
      >>> filters.All(statemap.ParamState, 'decoder')(('w',), w)
      False
    """

    filters: tuple[Predicate, ...]

    def __init__(self, *filters: Filter) -> None:
        self.__attrs_init__(_predicates(filters))

    def __call__(self, path: tuple[typing.Any, ...], state: State) -> bool:
        return all(f(path, state) for f in self.filters)

    def __repr__(self) -> str:
        return _repr_args("All", self.filters)


@attrs.frozen
class Not:
    """Selects the states that ``filter`` does not select.

    Args:
      filter: a filter in any form :func:`to_predicate` accepts.

    Raises:
      TypeError: if ``filter`` is not a filter.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> from statemap import filters
      >>> w = statemap.ParamState(jnp.zeros(3), name='w')
      >>> filters.Not(statemap.ParamState)(('w',), w)
      False
      >>> filters.Not(statemap.ParamState)
      Not(filter=OfType(type=ParamState))
    """

    filter: Predicate = attrs.field(converter=_to_predicate)

    def __call__(self, path: tuple[typing.Any, ...], state: State) -> bool:
        return not self.filter(path, state)


@attrs.frozen
class Everything:
    """Selects every state; ``True`` and ``...`` used as filters mean this.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> from statemap import filters
      >>> filters.Everything()((), statemap.State(jnp.zeros(3)))
      True
    """

    def __call__(self, path: tuple[typing.Any, ...], state: State) -> bool:
        return True


@attrs.frozen
class Nothing:
    """Selects no state; ``False`` and ``None`` used as filters mean this.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> from statemap import filters
      >>> filters.Nothing()((), statemap.State(jnp.zeros(3)))
      False
    """

    def __call__(self, path: tuple[typing.Any, ...], state: State) -> bool:
        return False


def _only_states(filter: Iterable[typing.Any]) -> IsState:
    """The identity filter of an iterable other than a list or tuple, which must hold only States."""
    try:
        items = tuple(filter)
    except TypeError:  # iterable by type but not by value, e.g. a 0-d array
        raise TypeError(
            f"statemap.filters.to_predicate: cannot use {_describe(filter)} as a filter. {_FORMS}"
        ) from None
    for item in items:
        if not isinstance(item, State):
            kind = type(filter).__name__
            raise TypeError(
                f"statemap.filters.to_predicate: cannot use {_describe(filter)} as a filter: "
                f"this {kind} may hold only States, but it holds {_describe(item)}. "
                f"Combine filters in a list or tuple instead, e.g. `[statemap.ParamState, 'tag']`."
            )
    return IsState(items)


def _from_sequence(filter: list[typing.Any] | tuple[typing.Any, ...]) -> Predicate:
    if filter and all(isinstance(item, State) for item in filter):
        return IsState(filter)
    return Any(*filter)


def to_predicate(filter: Filter) -> Predicate:
    """Normalises any accepted filter form to a ``predicate(path, state) -> bool``.

    The forms, checked in this order:

    - ``True`` or ``...``: :class:`Everything`; ``False`` or ``None``: :class:`Nothing`.
    - a class: :class:`OfType`; a str: :class:`WithTag`.
    - a ``State`` instance: that one state, by identity.
    - a list or tuple: the listed states by identity if it holds only
      States, else :class:`Any` of its items.
    - any other callable, including the filter classes here: used as is.
    - any other iterable of States (a set, a generator): those states.

    Args:
      filter: the filter to normalise.

    Returns:
      A callable ``predicate(path, state) -> bool``.

    Raises:
      TypeError: if ``filter`` is none of the forms above.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> from statemap import filters
      >>> w = statemap.ParamState(jnp.zeros(3), name='w')
      >>> h = statemap.HiddenState(jnp.zeros(3), tag='rnn')
      >>> filters.to_predicate('rnn')
      WithTag(tag='rnn')
      >>> pick = filters.to_predicate([statemap.ParamState, 'rnn'])
      >>> pick(('w',), w), pick((), h)
      (True, True)
      >>> filters.to_predicate(w)(('w',), w), filters.to_predicate(w)((), h)
      (True, False)
    """
    if isinstance(filter, bool):
        return Everything() if filter else Nothing()
    if filter is None:
        return Nothing()
    if filter is Ellipsis:
        return Everything()
    if isinstance(filter, type):
        return OfType(filter)
    if isinstance(filter, str):
        return WithTag(filter)
    if isinstance(filter, State):
        return IsState((filter,))
    if isinstance(filter, (list, tuple)):
        return _from_sequence(filter)
    if callable(filter):
        return filter
    if isinstance(filter, Iterable) and not isinstance(filter, Mapping):
        return _only_states(filter)
    raise TypeError(
        f"statemap.filters.to_predicate: cannot use {_describe(filter)} as a filter. {_FORMS}"
    )
