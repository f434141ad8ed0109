"""One call's arguments: static/dynamic split, flat leaves, signature, axes."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

import jax

from ._axes import axis_in_range, lane_aval, leaf_axes
from ._catalogue import SizeSources
from ._identity import IdentityDict
from ._jax_internals import at_eval_trace, fast_aval, trace_settings
from ._state import State, describe
from .errors import BatchAxisError

if TYPE_CHECKING:
    from ._transform import StatefulTransform

__all__ = ["Call", "StaticKey", "infer_static"]


def _arg_name(path: Sequence[Any], positions: Sequence[int]) -> str:
    """``args[2]['w']`` or ``kwargs['x']`` for a path into ``(dynamic_args, kwargs)``."""
    head, rest = path[0].idx, jax.tree_util.keystr(tuple(path[2:]))
    if head == 0:
        return f"args[{positions[path[1].idx]}]{rest}"
    return f"kwargs[{path[1].key!r}]{rest}"


class Call:
    """The arguments of one call, flattened; plan-time facts are computed on demand."""

    state_args: tuple[tuple[int, State], ...] = ()

    def __init__(self, mapping: StatefulTransform, args: tuple, kwargs: dict[str, Any]):
        self.mapping = mapping
        self.num_args, self.num_kwargs = len(args), len(kwargs)
        self.statics = _statics(mapping, args) if mapping.static_argnums else ()
        self.static_kwargs = _static_kwargs(mapping, kwargs) if kwargs and mapping.static_argnames else ()
        if self.static_kwargs:
            kwargs = {k: v for k, v in kwargs.items() if k not in mapping.static_argnames}
        self.dynamic = tuple(args[i] for i in self.positions) if self.statics else args
        self.all_leaves, self.treedef = jax.tree_util.tree_flatten((self.dynamic, kwargs))
        self.leaves = self.all_leaves
        try:
            self.avals = tuple(map(fast_aval, self.leaves))
        except TypeError:
            self.avals = self._without_states()
        identities = tuple((i, id(state)) for i, state in self.state_args) if self.state_args else ()
        statics = _static_key(self.statics + self.static_kwargs) if self.statics or self.static_kwargs else ()
        self.settings = trace_settings()
        # Outside every JAX transform a plan donates its written states' old buffers;
        # inside one (jax.grad, say), those buffers are still the transform's inputs.
        self.outside = at_eval_trace()
        self.key: Hashable = (self.treedef, statics, self.avals, identities, self.settings, self.outside)

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
        if self.static_kwargs:
            kwargs = {**kwargs, **dict(self.static_kwargs)}
        return args, kwargs

    @cached_property
    def _paths(self) -> list[str]:
        tree = jax.tree.unflatten(self.treedef, [0] * len(self.all_leaves))
        paths = jax.tree_util.tree_flatten_with_path(tree)[0]
        return [_arg_name(path, self.positions) for path, _ in paths]

    @cached_property
    def _axes(self) -> list[int | None]:
        """One axis (or None) per leaf, States included, from ``in_axes``; kwargs use 0 in a mapping."""
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
        kwargs_axis = 0 if self.mapping.has_lanes else None
        return axes + [kwargs_axis] * (len(self.all_leaves) - len(axes))

    @cached_property
    def state_arg_axes(self) -> IdentityDict[State, tuple[str, int | None]]:
        """For each State passed as an argument (by identity): its argument name and ``in_axes`` entry."""
        found: IdentityDict[State, tuple[str, int | None]] = IdentityDict()
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
        if fixed is None and ndim == 0:
            raise ValueError(self._scalar_message(name, axis))
        if fixed is None:
            raise ValueError(
                f"{self.mapping.api}: `in_axes` maps argument {name} (shape "
                f"{tuple(jax.numpy.shape(leaf))}) on axis {axis}, which is out of range. "
                f"Use an axis in [{-ndim}, {ndim}), or None to broadcast it."
            )
        return fixed

    def _scalar_message(self, name: str, axis: int) -> str:
        """The error for a scalar on a mapped axis: it has no axis, so the fix is to not map it."""
        api = self.mapping.api
        if name.startswith("kwargs"):
            return (
                f"{api}: keyword argument {name} is a scalar (shape ()), so it has no axis to map, "
                f"and keyword arguments are always mapped on axis 0 (as in jax.vmap). Pass it "
                f"positionally with `None` for it in `in_axes` (`in_axes=(0, None)`) to give every "
                f"lane the same value, close over it, or give it an axis (one value per lane)."
            )
        # With one int for every argument, show the exact tuple to write.
        in_axes, top, example = self.mapping.in_axes, [f"args[{i}]" for i in range(self.num_args)], "(0, None)"
        if isinstance(in_axes, int) and name in top:
            example = repr(tuple(None if n == name else in_axes for n in top))
        return (
            f"{api}: `in_axes` maps argument {name} on axis {axis}, but it is a scalar (shape ()) "
            f"with no axis to map. Give it `None` in `in_axes` (`in_axes={example}`) to pass "
            f"every lane the same value, mark it static if it is a Python number "
            f"(`{self.mapping.static_argnums_name}`), or give it an axis (one value per lane)."
        )

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
                    f"(`{self.mapping.static_argnums_name}`)."
                )
        return TypeError(f"{self.mapping.api}: an argument is not an array.")


class StaticKey:
    """A static value as a plan key: equal only to an equal value of the same type.

    ``2``, ``2.0`` and ``True`` are equal in Python but trace differently (an
    int, a float, a bool), so they must not share a plan; ``jax.jit`` keys its
    static arguments the same way.

    Example:
      >>> StaticKey(2) == StaticKey(2.0), StaticKey(2) == StaticKey(2)
      (False, True)
    """

    __slots__ = ("value",)

    def __init__(self, value: Hashable):
        self.value = value

    def __hash__(self) -> int:
        return hash(self.value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StaticKey) or type(self.value) is not type(other.value):
            return False
        return bool(self.value == other.value)

    def __repr__(self) -> str:
        return f"StaticKey({self.value!r})"


def _static_key(statics: tuple[tuple[int | str, Any], ...]) -> tuple[tuple[int | str, StaticKey], ...]:
    return tuple((where, StaticKey(value)) for where, value in statics)


def _statics(mapping: StatefulTransform, args: tuple) -> tuple[tuple[int, Any], ...]:
    """The static positional arguments, as (position, value), by position."""
    statics: dict[int, Any] = {}
    for i in mapping.static_argnums:
        if not -len(args) <= i < len(args):
            if _static_by_name(mapping, i):
                continue  # passed by keyword, or left to its default
            raise ValueError(
                f"{mapping.api}: `{mapping.static_argnums_name}` names argument {i}, but the "
                f"function was called with {len(args)} positional arguments."
            )
        position = i % len(args)
        _check_hashable(mapping, f"args[{position}]", args[position])
        statics[position] = args[position]
    return tuple(sorted(statics.items()))


def _static_kwargs(mapping: StatefulTransform, kwargs: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The static keyword arguments, as (name, value), by name."""
    statics = []
    for name in sorted(kwargs):
        if name in mapping.static_argnames:
            _check_hashable(mapping, f"kwargs[{name!r}]", kwargs[name])
            statics.append((name, kwargs[name]))
    return tuple(statics)


def _check_hashable(mapping: StatefulTransform, where: str, value: Any) -> None:
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"{mapping.api}: static argument {where} is a {type(value).__name__}, which is "
            f"not hashable; static arguments are compile-time constants and must be hashable "
            f"(use a tuple, not a list)."
        ) from None


def _static_by_name(mapping: StatefulTransform, position: int) -> bool:
    """Whether the parameter at ``position`` of the function is also static by name."""
    if not mapping.static_argnames:
        return False
    try:
        parameters = list(inspect.signature(mapping.fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in _POSITIONAL]
    return -len(positional) <= position < len(positional) and positional[position].name in mapping.static_argnames


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def infer_static(
    api: str, fn: Callable[..., Any], static_argnums: Any, static_argnames: Any, argnums_name: str = "static_argnums"
) -> tuple[Any, Any]:
    """Complete static argument numbers and names from each other, as ``jax.jit`` does.

    A parameter that can be passed either way is static both ways, whichever
    form named it. Numbers and names that ``fn``'s signature cannot take raise
    at once; values of the wrong type are returned as they are, for the
    mapping's own checks to report.

    Raises:
      ValueError: a static argument number or name that ``fn`` does not take.
    """
    nums = (static_argnums,) if isinstance(static_argnums, int) else static_argnums
    names = (static_argnames,) if isinstance(static_argnames, str) else static_argnames
    if nums == () and names == ():
        return (), ()  # nothing to complete or check: skip ``inspect.signature`` (mappings built inline)
    well_typed = isinstance(nums, (tuple, list)) and all(type(i) is int for i in nums)
    if not (well_typed and isinstance(names, (tuple, list)) and all(isinstance(n, str) for n in names)):
        return static_argnums, static_argnames
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return tuple(nums), tuple(names)
    positional = [p.name for p in parameters if p.kind in _POSITIONAL]
    by_name = [p.name for p in parameters if p.kind in _BY_NAME]
    _check_static(api, argnums_name, parameters, nums, names, positional, by_name)
    either_way = [n for n in positional if n in by_name]
    more_nums = [positional.index(n) for n in names if n in either_way]
    more_names = [positional[i] for i in nums if -len(positional) <= i < len(positional)]
    more_names = [n for n in more_names if n in either_way]
    return tuple(dict.fromkeys([*nums, *more_nums])), tuple(dict.fromkeys([*names, *more_names]))


_BY_NAME = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _check_static(
    api: str,
    argnums_name: str,
    parameters: Sequence[inspect.Parameter],
    nums: Sequence[int],
    names: Sequence[str],
    positional: Sequence[str],
    by_name: Sequence[str],
) -> None:
    kinds = {p.kind for p in parameters}
    for i in nums:
        if inspect.Parameter.VAR_POSITIONAL not in kinds and not -len(positional) <= i < len(positional):
            raise ValueError(
                f"{api}: `{argnums_name}` names argument {i}, but `fn` takes {len(positional)} "
                f"positional arguments ({', '.join(positional) or 'none'}). Give the position of one of them."
            )
    for name in names:
        if inspect.Parameter.VAR_KEYWORD not in kinds and name not in by_name:
            raise ValueError(
                f"{api}: `static_argnames` names {name!r}, which `fn` does not take as a keyword "
                f"(it takes {', '.join(by_name) or 'none'}). Give the name of one of its parameters."
            )
