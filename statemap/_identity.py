"""Identity, not equality: a dict and a state filter keyed on objects, whatever their ``__eq__``."""

from __future__ import annotations

import typing
import weakref
from collections.abc import Iterable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from ._state import State

K = TypeVar("K")
V = TypeVar("V")

__all__ = ["IdentityDict", "IsState"]


class IdentityDict(MutableMapping[K, V], Generic[K, V]):
    """A mapping whose keys compare by ``is``, in insertion order; keys are kept alive.

    Catalogues key states this way, so a ``State`` subclass that defines
    ``__eq__``/``__hash__`` (by name, say) is never merged with another state.
    """

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: dict[int, tuple[K, V]] = {}

    def __getitem__(self, key: K) -> V:
        return self._items[id(key)][1]

    def __setitem__(self, key: K, value: V) -> None:
        self._items[id(key)] = (key, value)

    def __delitem__(self, key: K) -> None:
        del self._items[id(key)]

    def __contains__(self, key: object) -> bool:
        return id(key) in self._items

    def __iter__(self) -> Iterator[K]:
        return (key for key, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"IdentityDict({list(self._items.values())!r})"


class IsState:
    """Selects exactly the given states, by identity (a state is not a value).

    It holds them weakly: a mapping's options, which key the plans shared by
    mappings of one function (see ``_cache.py``), keep no state alive. A state
    that died is selected no more, not even by a new one at its address.
    """

    __slots__ = ("_refs", "_ids")

    def __init__(self, states: Iterable[State]):
        self._refs = {id(state): weakref.ref(state) for state in _unique(states)}
        self._ids = frozenset(self._refs)

    @property
    def states(self) -> tuple[State, ...]:
        """The selected states still alive."""
        return tuple(s for s in (ref() for ref in self._refs.values()) if s is not None)

    def __call__(self, path: tuple[typing.Any, ...], state: State) -> bool:
        ref = self._refs.get(id(state))
        return ref is not None and ref() is state

    def __eq__(self, other: object) -> bool:  # equal filters select the same objects
        return isinstance(other, IsState) and self._ids == other._ids

    def __hash__(self) -> int:
        return hash(self._ids)

    def __repr__(self) -> str:
        return f"IsState(states={self.states!r})"


def _unique(states: Iterable[State]) -> tuple[State, ...]:
    """``states`` without repeats, by identity: a State subclass may define ``__eq__``."""
    return tuple({id(state): state for state in states}.values())
