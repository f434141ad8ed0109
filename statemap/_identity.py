"""A dict keyed by object identity: a State is an identity, whatever its ``__eq__``."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

__all__ = ["IdentityDict"]


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
