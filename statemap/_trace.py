"""StateTrace: record which states a piece of code reads and writes."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from ._identity import IdentityDict
from ._state import (
    State,
    Watcher,
    current_watcher,
    pop_watcher,
    push_watcher,
    read_through,
    write_through,
)

__all__ = ["StateTrace"]


class StateTrace:
    """Record every state read or written while the context is active.

    Traces nest: an outer trace also sees what an inner one saw. A trace is
    thread-local: touches from other threads are not recorded.

    Attributes:
      states: the states touched, in first-touch order.
      written: the subset that was written, in first-write order.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> a = statemap.State(jnp.zeros(2), name='a')
      >>> b = statemap.State(jnp.ones(2), name='b')
      >>> with statemap.StateTrace() as trace:
      ...     a.value = a.value + b.value
      >>> [s.name for s in trace.states], [s.name for s in trace.written]
      (['a', 'b'], ['a'])
      >>> trace.restore()
      >>> a.value
      Array([0., 0.], dtype=float32)
    """

    def __init__(self) -> None:
        # By identity: a State subclass may define ``__eq__``/``__hash__``.
        self._before: IdentityDict[State, Any] = IdentityDict()
        self._written: IdentityDict[State, None] = IdentityDict()
        self._parent: Watcher | None = None
        self._active = False

    def __enter__(self) -> StateTrace:
        if self._active:
            raise RuntimeError("statemap.StateTrace: this trace is already active; use a new one.")
        self._active = True
        self._parent = push_watcher(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pop_watcher(self)
        self._active = False
        self._parent = None

    def read(self, state: State) -> Any:
        """Record a read of ``state`` and return its value as the enclosing code sees it."""
        value = read_through(self._parent, state)
        self._before.setdefault(state, value)
        return value

    def write(self, state: State, value: Any) -> None:
        """Record a write of ``state`` and pass it outwards."""
        if state not in self._before:
            self._before[state] = read_through(self._parent, state)
        self._written[state] = None
        write_through(self._parent, state, value)

    def created(self, state: State) -> None:
        """States created inside a trace are not recorded, only passed outwards."""
        if self._parent is not None:
            self._parent.created(state)

    @property
    def states(self) -> tuple[State, ...]:
        """The states read or written, in first-touch order."""
        return tuple(self._before)

    @property
    def written(self) -> tuple[State, ...]:
        """The states written, in first-write order."""
        return tuple(self._written)

    def restore(self) -> None:
        """Put back the values every recorded state had when first touched."""
        watcher = current_watcher()
        for state, value in self._before.items():
            write_through(watcher, state, value)
