"""One call's arguments: static/dynamic split, flat leaves, signature, axes."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

import jax

from ._axes import axis_in_range, lane_aval, leaf_axes
from ._catalogue import SizeSources
from ._jax_internals import fast_aval
from ._state import State, describe
from .errors import BatchAxisError

if TYPE_CHECKING:
    from ._mapping import StatefulMapping

__all__ = ["Call"]


def _arg_name(path: Sequence[Any], positions: Sequence[int]) -> str:
    """``args[2]['w']`` or ``kwargs['x']`` for a path into ``(dynamic_args, kwargs)``."""
    head, rest = path[0].idx, jax.tree_util.keystr(tuple(path[2:]))
    if head == 0:
        return f"args[{positions[path[1].idx]}]{rest}"
    return f"kwargs[{path[1].key!r}]{rest}"


class Call:
    """The arguments of one call, flattened; plan-time facts are computed on demand."""

    state_args: tuple[tuple[int, State], ...] = ()

    def __init__(self, mapping: StatefulMapping, args: tuple, kwargs: dict[str, Any]):
        self.mapping = mapping
        self.num_args = len(args)
        self.statics = _statics(mapping, args) if mapping.static_argnums else ()
        self.dynamic = tuple(args[i] for i in self.positions) if self.statics else args
        self.all_leaves, self.treedef = jax.tree.flatten((self.dynamic, kwargs))
        self.leaves = self.all_leaves
        try:
            avals = tuple(map(fast_aval, self.leaves))
        except TypeError:
            avals = self._without_states()
        identities = tuple((position, id(state)) for position, state in self.state_args)
        self.key: Hashable = (self.treedef, self.statics, avals, identities)

    @cached_property
    def positions(self) -> list[int]:
        """The original positions of the dynamic (non-static) positional arguments."""
        static = dict(self.statics)
        return [i for i in range(self.num_args) if i not in static]

    def passes(self, refs: Sequence[Any]) -> bool:
        """Whether the States passed as arguments are the ones ``refs`` point to."""
        return all(ref() is state for ref, (_, state) in zip(refs, self.state_args))

    def _without_states(self) -> tuple[Any, ...]:
        """Set States passed as arguments aside (they are read like closed-over ones)."""
        self.state_args = tuple((i, x) for i, x in enumerate(self.all_leaves) if isinstance(x, State))
        self.leaves = [x for x in self.all_leaves if not isinstance(x, State)]
        try:
            return tuple(map(fast_aval, self.leaves))
        except TypeError:
            raise self._non_array_error() from None

    def rebuild(self, leaves: Sequence[Any]) -> tuple[list[Any], dict[str, Any]]:
        """Positional and keyword arguments with ``leaves`` in place of the array leaves."""
        if self.state_args:
            merged = list(leaves)
            for i, state in self.state_args:
                merged.insert(i, state)
            leaves = merged
        dynamic, kwargs = jax.tree.unflatten(self.treedef, leaves)
        args: list[Any] = [None] * self.num_args
        for i, value in zip(self.positions, dynamic):
            args[i] = value
        for i, value in self.statics:
            args[i] = value
        return args, kwargs

    @cached_property
    def _paths(self) -> list[str]:
        tree = jax.tree.unflatten(self.treedef, [0] * len(self.all_leaves))
        paths = jax.tree_util.tree_flatten_with_path(tree)[0]
        return [_arg_name(path, self.positions) for path, _ in paths]

    @cached_property
    def _axes(self) -> list[int | None]:
        """One axis (or None) per leaf, States included, from ``in_axes``; kwargs use 0."""
        api, in_axes = self.mapping.api, self.mapping.in_axes
        if isinstance(in_axes, (tuple, list)):
            if len(in_axes) != self.num_args:
                raise ValueError(
                    f"{api}: `in_axes` has {len(in_axes)} entries but the function was "
                    f"called with {self.num_args} positional arguments. Give one entry "
                    f"per positional argument, or an int for all."
                )
            in_axes = tuple(in_axes[i] for i in self.positions)
        axes = leaf_axes(api, "in_axes", in_axes, self.dynamic, "positional arguments")
        return axes + [0] * (len(self.all_leaves) - len(axes))

    @cached_property
    def state_arg_axes(self) -> dict[State, tuple[str, int | None]]:
        """For each State passed as an argument: its argument name and ``in_axes`` entry."""
        found: dict[State, tuple[str, int | None]] = {}
        for i, state in self.state_args:
            name, axis = self._paths[i], self._axes[i]
            if state in found and found[state][1] != axis:
                raise BatchAxisError(
                    f"{self.mapping.api}: {describe(state)} is reached twice with different "
                    f"axes: `in_axes` maps argument {found[state][0]} on axis {found[state][1]} "
                    f"and argument {name} on axis {axis}. Pass it once, or give both the same axis."
                )
            found.setdefault(state, (name, axis))
        return found

    @cached_property
    def leaf_axes(self) -> list[int | None]:
        """One non-negative axis (or None) per array leaf."""
        chosen = [i for i, x in enumerate(self.all_leaves) if not isinstance(x, State)]
        return [self._checked(self._paths[i], self._axes[i], self.all_leaves[i]) for i in chosen]

    @cached_property
    def sizes(self) -> SizeSources:
        """The axis size the mapped arguments imply (filled in by ``leaf_axes``)."""
        sizes = SizeSources(self.mapping.api)
        if self.mapping.axis_size is not None:
            size = self.mapping.axis_size
            sizes.add_size("`axis_size`", size, f"`axis_size` is {size}")
        names = [p for p, x in zip(self._paths, self.all_leaves) if not isinstance(x, State)]
        for name, axis, leaf in zip(names, self.leaf_axes, self.leaves):
            if axis is not None:
                sizes.add(f"argument {name}", axis, leaf)
        return sizes

    @cached_property
    def lane_avals(self) -> list[Any]:
        """What one lane sees of each leaf."""
        return [lane_aval(x, a) for x, a in zip(self.leaves, self.leaf_axes)]

    @cached_property
    def donated_leaves(self) -> tuple[int, ...]:
        """Flat positions of the leaves of the arguments in ``donate_argnums``."""
        donate = {i % max(self.num_args, 1) for i in self.mapping.donate_argnums}
        out: list[int] = []
        pos = 0
        for i, arg in zip(self.positions, self.dynamic):
            n = sum(not isinstance(x, State) for x in jax.tree.leaves(arg))
            if i in donate:
                out += range(pos, pos + n)
            pos += n
        return tuple(out)

    def _checked(self, name: str, axis: int | None, leaf: Any) -> int | None:
        if axis is None:
            return None
        ndim = jax.numpy.ndim(leaf)
        fixed = axis_in_range(axis, ndim)
        if fixed is None:
            raise ValueError(
                f"{self.mapping.api}: `in_axes` maps argument {name} (shape "
                f"{tuple(jax.numpy.shape(leaf))}) on axis {axis}, which is out of range. "
                f"Use an axis in [{-ndim}, {ndim}), or None to broadcast it."
            )
        return fixed

    def _non_array_error(self) -> TypeError:
        for name, leaf in zip(self._paths, self.all_leaves):
            if isinstance(leaf, State):
                continue
            try:
                jax.typeof(leaf)
            except TypeError:
                return TypeError(
                    f"{self.mapping.api}: argument {name} is a {type(leaf).__name__} "
                    f"({leaf!r}), not an array. Pass arrays (or pytrees of arrays); close "
                    f"over other values, or mark the argument static "
                    f"(`static_broadcasted_argnums` in pmap)."
                )
        return TypeError(f"{self.mapping.api}: an argument is not an array.")


def _statics(mapping: StatefulMapping, args: tuple) -> tuple[tuple[int, Any], ...]:
    statics = []
    for i in mapping.static_argnums:
        if not -len(args) <= i < len(args):
            raise ValueError(
                f"{mapping.api}: `static_broadcasted_argnums` names argument {i}, but the "
                f"function was called with {len(args)} positional arguments."
            )
        position = i % len(args)
        try:
            hash(args[position])
        except TypeError:
            raise TypeError(
                f"{mapping.api}: static argument args[{position}] is a "
                f"{type(args[position]).__name__}, which is not hashable; static arguments "
                f"are compile-time constants and must be hashable (use a tuple, not a list)."
            ) from None
        statics.append((position, args[position]))
    return tuple(sorted(statics, key=lambda s: s[0]))

