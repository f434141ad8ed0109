"""Axis specs: validating and normalising in/out axes and state axes."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any

import attrs
import jax
from jax.sharding import PartitionSpec

from ._filters import to_predicate
from ._state import State, describe
from ._warn import warn

__all__ = [
    "StateAxes",
    "axis_in_range",
    "check_axes_tree",
    "leaf_axes",
    "lane_aval",
    "partition_spec",
]

Predicate = Callable[[tuple, State], bool]


def _is_axis(x: Any) -> bool:
    return x is None or (isinstance(x, int) and not isinstance(x, bool))


def check_axes_tree(api: str, argname: str, axes: Any) -> None:
    """Check that ``axes`` is an int, None, or a pytree of those."""
    leaves = jax.tree.leaves(axes, is_leaf=lambda x: x is None)
    bad = [x for x in leaves if not _is_axis(x)]
    if bad:
        raise TypeError(
            f"{api}: `{argname}` must be an int, None, or a pytree of ints and None "
            f"(as in jax.vmap), but it contains {bad[0]!r} ({type(bad[0]).__name__})."
        )


def leaf_axes(api: str, argname: str, axes: Any, tree: Any, what: str) -> list[int | None]:
    """Broadcast the pytree prefix ``axes`` to one axis per leaf of ``tree``."""
    try:
        per_leaf = jax.tree.map(
            lambda axis, sub: _Group([axis] * len(jax.tree.leaves(sub))),
            axes,
            tree,
            is_leaf=lambda x: x is None,
        )
    except ValueError as err:
        raise ValueError(
            f"{api}: `{argname}` {axes!r} is not a pytree prefix of the {what} "
            f"(structure {jax.tree.structure(tree)}). Give one axis per {what[:-1]} "
            f"or an int for all. JAX said: {err}"
        ) from None
    return [a for group in jax.tree.leaves(per_leaf) for a in group.axes]


class _Group:
    """One prefix leaf's axis, once per leaf of the subtree it covers: a pytree leaf, unlike the user's lists."""

    __slots__ = ("axes",)

    def __init__(self, axes: list[int | None]):
        self.axes = axes


def axis_in_range(axis: int, ndim: int) -> int | None:
    """``axis`` made non-negative for an array of rank ``ndim``, or None if out of range."""
    return axis + ndim if -ndim <= axis < 0 else (axis if 0 <= axis < ndim else None)


def lane_aval(x: Any, axis: int | None) -> Any:
    """The abstract value one lane sees of ``x`` mapped on ``axis`` (None: all of it)."""
    aval = jax.typeof(x)
    shape = aval.shape if axis is None else aval.shape[:axis] + aval.shape[axis + 1 :]
    # A fresh aval: the value's sharding (a pmap output's mesh, say) is not the lane's.
    return jax.core.ShapedArray(shape, aval.dtype, weak_type=aval.weak_type)


def partition_spec(axis: int | None, name: Hashable) -> PartitionSpec:
    """The partition of a value mapped on ``axis`` (None: replicated) over mesh axis ``name``."""
    return PartitionSpec() if axis is None else PartitionSpec(*([None] * axis), name)


@attrs.frozen
class StateAxes:
    """A normalised ``state_in_axes``/``state_out_axes``: (axis, predicate) pairs, first match wins."""

    entries: tuple[tuple[int | None, Predicate], ...]
    bare_tags: frozenset[str] = frozenset()
    """The tags given as plain strs (not ``WithTag``), which a user may have meant as names."""
    api: str = attrs.field(default="", eq=False)
    argname: str = attrs.field(default="", eq=False)

    @classmethod
    def parse(cls, api: str, argname: str, spec: Any) -> StateAxes:
        """Read ``{axis: filter}`` or a bare filter (``{0: filter}``); None selects nothing."""
        if spec is None:
            return cls((), api=api, argname=argname)
        if not isinstance(spec, Mapping):
            spec = {0: spec}
        entries = []
        for axis, filt in spec.items():
            if not _is_axis(axis):
                raise TypeError(
                    f"{api}: `{argname}` keys must be ints or None, got {axis!r} "
                    f"({type(axis).__name__}). Write `{argname}={{0: filter}}`."
                )
            try:
                entries.append((axis, to_predicate(filt)))
            except TypeError as err:
                raise TypeError(f"{api}: `{argname}` for axis {axis!r}: {err}") from None
        return cls(tuple(entries), frozenset(_bare_strs(spec.values())), api=api, argname=argname)

    def match(self, state: State) -> tuple[bool, int | None]:
        """(selected, axis) for ``state``: the first entry whose filter selects it.

        A state selected by nothing whose name is a str filter here (which
        matches tags, not names) is most likely a mistake: it is left alone,
        as the filter says, with a ``UserWarning`` when the function is traced.
        """
        path = () if state.name is None else (state.name,)
        for axis, predicate in self.entries:
            if predicate(path, state):
                return True, axis
        if state.name in self.bare_tags:
            warn(
                f"{self.api}: `{self.argname}` has the str filter {state.name!r}, which selects "
                f"states by tag, and the function touches {describe(state)}, whose name (not "
                f"tag) is {state.name!r}: the filter does not select it. Select it by name with "
                f"`statemap.filters.PathContains({state.name!r})`, give it `tag={state.name!r}`, "
                f"or write `statemap.filters.WithTag({state.name!r})` if you mean only the tag."
            )
        return False, None


def _bare_strs(filters: Iterable[Any]) -> Iterator[str]:
    """The strs among ``filters``, inside lists and tuples too (each means ``WithTag``)."""
    for filt in filters:
        if isinstance(filt, str):
            yield filt
        elif isinstance(filt, (list, tuple)):
            yield from _bare_strs(filt)
