"""Mutable state boxes and the thread-local stack of contexts that watch them."""

from __future__ import annotations

import itertools
import threading
from typing import Any, Protocol

import jax
import numpy as np

__all__ = [
    "HiddenState",
    "LongTermState",
    "ParamState",
    "ShortTermState",
    "State",
    "describe",
    "label",
]


class Watcher(Protocol):
    """Sees every state read and write of its thread while it is innermost.

    A watcher decides what a read returns and where a write goes, so a lane
    trace can show the function tracers while ``State._value`` (what other
    threads and outer code see) stays untouched.
    """

    def read(self, state: State) -> Any: ...

    def write(self, state: State, value: Any) -> None: ...

    def created(self, state: State) -> None: ...


class _Watchers(threading.local):
    def __init__(self) -> None:
        self.stack: list[Watcher] = []
        self.top: Watcher | None = None


_watchers = _Watchers()
_created = itertools.count()  # each State's place in creation order


def push_watcher(watcher: Watcher) -> Watcher | None:
    """Make ``watcher`` the innermost watcher of this thread; return its parent."""
    parent = _watchers.top
    _watchers.stack.append(watcher)
    _watchers.top = watcher
    return parent


def pop_watcher(watcher: Watcher) -> None:
    """Remove ``watcher``, which must be the innermost watcher of this thread.

    If watchers entered after it were never exited, they are dropped too (the
    thread must not keep reading through them) and the mistake is reported;
    popping a watcher dropped that way later does nothing.
    """
    if drop_watcher(watcher) == 0:
        return
    raise RuntimeError(
        "statemap: state watchers (StateTrace or a mapping's trace) must be exited in "
        "the reverse order they were entered; a StateTrace entered inside this one was "
        "never exited. Use `with statemap.StateTrace() as trace:`."
    )


def drop_watcher(watcher: Watcher) -> int:
    """Remove ``watcher`` and any entered after it; return how many were after it.

    Safe to call again (a watcher already gone is left alone), so cleanup code
    can call it even if an interrupt cut the first attempt short.
    """
    stack = _watchers.stack
    position = next((i for i in range(len(stack) - 1, -1, -1) if stack[i] is watcher), None)
    if position is None:
        return 0
    # The new top first: reads consult ``top`` only, so they are right at every step.
    _watchers.top = stack[position - 1] if position else None
    left_open = len(stack) - 1 - position
    del stack[position:]
    return left_open


def current_watcher() -> Watcher | None:
    """The innermost watcher of this thread, or None."""
    return _watchers.top


def read_through(watcher: Watcher | None, state: State) -> Any:
    """``state``'s value as ``watcher`` (None: no watcher) sees it."""
    return state._value if watcher is None else watcher.read(state)


def write_through(watcher: Watcher | None, state: State, value: Any) -> None:
    """Write ``value`` to ``state`` as ``watcher`` (None: no watcher) would."""
    if watcher is None:
        state._value = value
    else:
        watcher.write(state, value)


def _check_value(owner: str, value: Any) -> None:
    for leaf in jax.tree.leaves(value):
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex, bool)):
            raise TypeError(
                f"statemap.{owner}: `value` must be a pytree of arrays, but it has a leaf "
                f"of type {type(leaf).__name__}: {leaf!r}. Wrap numbers with "
                f"`jnp.asarray(...)` or keep non-array data outside the state."
            )


def _leaf_summary(leaf: Any) -> str:
    shape = getattr(leaf, "shape", ())
    dtype = getattr(leaf, "dtype", type(leaf).__name__)
    return f"{dtype}{list(shape)}"


class State:
    """A mutable box around a pytree of arrays that mapped functions may read and write.

    A ``State`` is an identity, not a pytree: filters, traces and mapping plans
    refer to the object itself. Read and write it through ``.value``.

    Args:
      value: a pytree of arrays (or numbers).
      tag: an optional string that ``statemap.filters.WithTag`` (or a bare
        string filter) selects on.
      name: an optional name, used in messages and as the state's path.

    Raises:
      TypeError: if ``value`` has a non-array leaf, or ``tag``/``name`` is not a str.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> w = statemap.State(jnp.zeros(3), name='w')
      >>> w.value = w.value + 1
      >>> w
      State(name='w', value=float32[3])
      >>> w.value
      Array([1., 1., 1.], dtype=float32)
    """

    __slots__ = ("_value", "tag", "name", "_order", "__weakref__")

    def __init__(self, value: Any, *, tag: str | None = None, name: str | None = None):
        kind = type(self).__name__
        for arg, given in (("tag", tag), ("name", name)):
            if given is not None and not isinstance(given, str):
                raise TypeError(
                    f"statemap.{kind}: `{arg}` must be a str or None, got "
                    f"{type(given).__name__}: {given!r}."
                )
        _check_value(kind, value)
        self._value = value
        self.tag = tag
        self.name = name
        self._order = next(_created)
        watcher = _watchers.top
        if watcher is not None:
            watcher.created(self)

    def __lt__(self, other: object) -> bool:
        # States order by creation, so a dict keyed by states (``statemap.grad``'s
        # gradients) is a pytree: JAX sorts dict keys when it flattens one.
        if not isinstance(other, State):
            return NotImplemented
        return self._order < other._order

    @property
    def value(self) -> Any:
        """The current value; reading it is recorded by any active trace."""
        watcher = _watchers.top
        return self._value if watcher is None else watcher.read(self)

    @value.setter
    def value(self, value: Any) -> None:
        _check_value(f"{type(self).__name__}.value", value)
        write_through(_watchers.top, self, value)

    def __repr__(self) -> str:
        fields = []
        if self.name is not None:
            fields.append(f"name={self.name!r}")
        if self.tag is not None:
            fields.append(f"tag={self.tag!r}")
        summary = jax.tree.map(_leaf_summary, self._value)
        shown = summary if isinstance(summary, str) else str(summary).replace("'", "")
        fields.append(f"value={shown}")
        return f"{type(self).__name__}({', '.join(fields)})"


class ParamState(State):
    """A trainable parameter.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> statemap.ParamState(jnp.ones((2, 3)), name='w')
      ParamState(name='w', value=float32[2, 3])
    """

    __slots__ = ()


class ShortTermState(State):
    """State that lives for one episode or sequence, such as a counter.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> statemap.ShortTermState(jnp.zeros(()), tag='counter')
      ShortTermState(tag='counter', value=float32[])
    """

    __slots__ = ()


class LongTermState(State):
    """State that persists across episodes, such as running statistics.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> statemap.LongTermState(jnp.zeros(4), name='running_mean')
      LongTermState(name='running_mean', value=float32[4])
    """

    __slots__ = ()


class HiddenState(State):
    """A recurrent hidden variable, often split across the mapped axis.

    Example:
      >>> import jax.numpy as jnp
      >>> import statemap
      >>> statemap.HiddenState(jnp.zeros((8, 16)), name='h')
      HiddenState(name='h', value=float32[8, 16])
    """

    __slots__ = ()


def label(state: State) -> str:
    """The state's type and its name (or tag), for messages."""
    if state.name is not None:
        return f"{type(state).__name__} {state.name!r}"
    if state.tag is not None:
        return f"{type(state).__name__} tagged {state.tag!r}"
    return type(state).__name__


def describe(state: State) -> str:
    """A short description for messages: type, name or tag, and shape."""
    value = state._value
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(value)) and value is not None:
        return f"{label(state)} (shape {tuple(np.shape(value))})"
    shapes = jax.tree.map(lambda x: tuple(np.shape(x)), value)
    return f"{label(state)} (shapes {shapes})"
