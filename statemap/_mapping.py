"""StatefulMapping: the engine every stateful mapping shares."""

from __future__ import annotations

import abc
import functools
import operator
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import attrs
import jax

from ._axes import StateAxes, check_axes_tree, leaf_axes
from ._call import Call
from ._donation import donatable
from ._catalogue import Decide, LaneRecorder, MappedEntries
from ._jax_internals import AxisSizeNeeded
from ._plan import Plan
from ._planner import (
    LaneOutputs,
    decide_outputs,
    make_lane_fn,
    normalise_out_axes,
    probe_batched,
    state_in_axes_per_leaf,
)
from ._policy import PolicyName, WritePolicy
from ._state import State
from ._transform import MISSING, StatefulTransform


__all__ = [
    "MISSING",
    "KeptCopies",
    "MapSpec",
    "StatefulMapping",
    "all_in_place",
    "refuse_deleted",
    "shardings_of",
]


@attrs.frozen
class MapSpec:
    """What a subclass's ``_map`` hook receives.

    Attributes:
      lane_fn: ``lane_fn(lane_index, *inputs) -> list of outputs`` for one lane;
        ``lane_index`` is the lane's position (an int32 scalar, traced).
      in_axes: one axis (or None) per flat input.
      out_axes: one axis (or None: the same on every lane) per flat output.
      axis_size: the number of lanes.
      axis_name: the name collectives in the function use.
      donated: positions of inputs whose buffers may be donated: the leaves of
        ``donate_argnums`` and written states' old values (pass it to the
        primitive's ``donate_argnums``).

    Example:
      >>> import statemap
      >>> spec = statemap.MapSpec(lambda i, x: [x], in_axes=(0,), out_axes=[0],
      ...                         axis_size=3, axis_name='i')
      >>> spec.lane_fn(0, 'x'), spec.donated
      (['x'], ())
    """

    lane_fn: Callable[..., list[Any]]
    in_axes: tuple[int | None, ...]
    out_axes: list[int | None]
    axis_size: int
    axis_name: Hashable
    donated: tuple[int, ...] = ()


class StatefulMapping(StatefulTransform):
    """A JAX mapping transform over a function that reads and writes ``State`` objects.

    The base owns everything shared: validating the axis specs and write policy,
    tracing the function once per call signature to catalogue the states it
    touches, the plan cache, batched-ness and policy decisions, per-lane keys,
    and the all-or-nothing write-back. A subclass supplies three hooks:
    ``_map`` (the primitive), ``_resolve_axis_size`` (defaults and limits) and,
    optionally, ``_lane_key`` (how a lane derives its key).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import statemap
      >>> class SequentialMapping(statemap.StatefulMapping):
      ...     api = 'SequentialMapping'
      ...     def _map(self, spec):
      ...         def run(*inputs):
      ...             def one(i):
      ...                 picked = [x if a is None else jnp.take(x, i, axis=a)
      ...                           for x, a in zip(inputs, spec.in_axes)]
      ...                 return spec.lane_fn(i, *picked)
      ...             outs = jax.lax.map(one, jnp.arange(spec.axis_size))
      ...             return [o[0] if a is None else jnp.moveaxis(o, 0, a)
      ...                     for o, a in zip(outs, spec.out_axes)]
      ...         return jax.jit(run)
      ...     def _resolve_axis_size(self, size):
      ...         return size
      >>> scale = statemap.State(jnp.float32(3.0), name='scale')
      >>> SequentialMapping(lambda x: x * scale.value)(jnp.arange(3.0))
      Array([0., 3., 6.], dtype=float32)
    """

    api: str = "statemap.StatefulMapping"
    default_size_origin: str = "the mapping's default"
    has_lanes = True

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        in_axes: Any = 0,
        out_axes: Any = 0,
        axis_name: Hashable | None = None,
        axis_size: int | None = None,
        state_in_axes: Any = None,
        state_out_axes: Any = None,
        unexpected_out_state_mapping: PolicyName | str = "raise",
        static_argnums: int | Sequence[int] = (),
        static_argnames: str | Sequence[str] = (),
        donate_argnums: int | Sequence[int] = (),
    ):
        super().__init__(
            fn, static_argnums=static_argnums, static_argnames=static_argnames, donate_argnums=donate_argnums
        )
        api = self.api
        check_axes_tree(api, "in_axes", in_axes)
        check_axes_tree(api, "out_axes", out_axes)
        if axis_size is not None and (not isinstance(axis_size, int) or isinstance(axis_size, bool) or axis_size < 1):
            raise ValueError(f"{api}: `axis_size` must be a positive int or None, got {axis_size!r}.")
        if axis_name is not None:
            try:
                hash(axis_name)
            except TypeError:
                raise TypeError(f"{api}: `axis_name` must be hashable, got {axis_name!r}.") from None
        self.in_axes = in_axes
        self.out_axes = out_axes
        self.axis_name = axis_name
        self.axis_size = axis_size
        self.state_in_axes = StateAxes.parse(api, "state_in_axes", state_in_axes)
        self.state_out_axes = StateAxes.parse(api, "state_out_axes", state_out_axes)
        self.policy = WritePolicy.parse(api, unexpected_out_state_mapping)
        # One private name per kind of unnamed mapping: nested vmaps shadow it, as
        # JAX allows, and JAX's caches keyed by axis names do not grow per mapping.
        # Kinds differ: a vmap batching a pmap's body would take the pmap's
        # ``axis_index`` of the same name for its own, and every device of a
        # lane would draw the same numbers.
        self._lane_axis = axis_name if axis_name is not None else f"statemap-lane of {self.api}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__name__}, axis_name={self.axis_name!r})"

    # Hooks for subclasses.

    @abc.abstractmethod
    def _map(self, spec: MapSpec) -> Callable[..., Sequence[Any]]:
        """Return a compiled callable mapping ``spec.lane_fn`` over ``spec.axis_size`` lanes.

        It receives the flat inputs, each mapped on its ``spec.in_axes`` entry
        (None: the same value for every lane), must call ``spec.lane_fn`` with
        the lane's index first, and returns the flat outputs, stacked on their
        ``spec.out_axes`` entry (None: the value is the same on every lane, which
        the base has verified, so any lane's copy will do).
        """

    @abc.abstractmethod
    def _resolve_axis_size(self, size: int | None) -> int:
        """Return the number of lanes, given the size arguments and states imply.

        ``size`` is None when nothing mapped fixes it: return a default or raise
        ``ValueError``. Raise ``ValueError`` too for a size the mapping cannot run.
        """

    def _lane_key(self, key: jax.Array, lane_index: jax.Array) -> jax.Array:
        """The key lane ``lane_index`` uses, derived inside the compiled program.

        ``fold_in(key, i)`` equals ``split(key, n)[i]`` bit for bit, so every
        mapping that keeps this default gives lane i the same key.
        """
        return jax.random.fold_in(key, lane_index)

    def _options(self) -> Hashable:
        return (
            super()._options(),
            _hashable_axes(self.in_axes),
            _hashable_axes(self.out_axes),
            self.axis_name,
            self.axis_size,
            self.state_in_axes,
            self.state_out_axes,
            self.policy,
        )

    def _entries(self, call: Call) -> Decide:
        return MappedEntries(self.api, self.state_in_axes, call.state_arg_axes)

    def _build(self, call: Call) -> tuple[Plan, list[State]]:
        hint = None if call.sizes.size is None else self._resolve_axis_size(call.sizes.size)
        sizes = call.sizes.copy()
        try:
            lane, recorder, outputs = self._trace(call, sizes, self._lane_axis, hint)
        except AxisSizeNeeded:
            # The function needed the size while tracing (``psum`` of a constant,
            # ``axis_size``) and only split states give it: trace again with it.
            try:
                hint = self._resolve_axis_size(sizes.size)
            except ValueError:
                raise ValueError(
                    f"{self.api}: the function needs the axis size while it is traced "
                    f"(`jax.lax.psum` of a constant, `jax.lax.axis_size`), before any mapped "
                    f"argument or split state gives it. Pass `axis_size=n`."
                ) from None
            sizes = call.sizes.copy()
            lane, recorder, outputs = self._trace(call, sizes, self._lane_axis, hint)
        size = self._resolve_axis_size(sizes.size)
        origin = sizes.origin or self.default_size_origin
        return self._make_plan(call, lane, recorder, outputs, size, origin), list(recorder.made)

    def _make_plan(
        self, call: Call, lane: Any, recorder: LaneRecorder, outputs: LaneOutputs, size: int, origin: str
    ) -> Plan:
        ins = list(recorder.inputs.values())
        in_axes = (*call.leaf_axes, *state_in_axes_per_leaf(ins))
        # Plans are shared by every mapping of the same function (see _cache.py):
        # they must not keep this one alive.
        lane_key = functools.partial(type(self)._lane_key, weakref.proxy(self))  # type: ignore[arg-type]
        lane_fn = make_lane_fn(lane, len(call.leaves), ins, lane_key)
        user_avals = lane.out_avals[: outputs.num_user_leaves]
        user_axes = normalise_out_axes(self.api, self._user_out_axes(outputs), user_avals)
        inputs = [*call.leaves, *(leaf for value in recorder.before.values() for leaf in jax.tree.leaves(value))]
        decisions = decide_outputs(
            self.api, lane, recorder, outputs, user_axes, self.state_out_axes, self.policy,
            probe_batched(lane_fn, inputs, in_axes, self._lane_axis, size),
        )
        donated = donatable(call, lane, recorder, outputs, decisions, size)
        spec = MapSpec(lane_fn, in_axes, decisions.out_axes, size, self._lane_axis, (*call.donated_leaves, *donated))
        return self._assemble(call, lane, recorder, outputs, decisions, self._map(spec), size, origin, donated)

    def _user_out_axes(self, outputs: LaneOutputs) -> list[int | None]:
        tree = jax.tree.unflatten(outputs.out_tree, [0] * len(outputs.out_slots))
        axes = leaf_axes(self.api, "out_axes", self.out_axes, tree, "outputs")
        return [axis for axis, slot in zip(axes, outputs.out_slots) if slot is None]


def shardings_of(inputs: Sequence[Any]) -> list[Any] | None:
    """Each input's sharding, or None if one is not a concrete array (a number, a NumPy array, a tracer)."""
    try:
        return [x.sharding for x in inputs]
    except AttributeError:
        return None


def all_in_place(inputs: Sequence[Any], shardings: Sequence[Any], matched: Sequence[Any]) -> bool:
    """Whether every input is live and its sharding (from ``shardings_of``) is (``is``) the one ``matched`` holds.

    Few Python steps, for the warm calls of programs that lay out their inputs.
    """
    return all(map(operator.is_, shardings, matched)) and not any(map(_is_deleted, inputs))


_is_deleted = operator.methodcaller("is_deleted")


class KeptCopies:
    """The copy a program's layout needed of each input, kept for as long as its source lives.

    A state only read is never written back, and an argument is often the same
    array call after call: its copy on the devices is reused, so a warm call
    does not send it again. A copy the program consumed (donated) is made again.
    One copy per input at most: a new source replaces the copy of the last.
    """

    def __init__(self) -> None:
        self._copies: dict[int, tuple[weakref.ref[Any], Any]] = {}

    def get(self, i: int, x: Any) -> Any:
        """The live copy kept of ``x`` as input ``i``, or None."""
        kept = self._copies.get(i)
        if kept is None or kept[0]() is not x or kept[1].is_deleted():
            return None
        return kept[1]

    def put(self, i: int, x: jax.Array, copy: Any) -> Any:
        """Keep ``copy`` of ``x`` (an immutable ``jax.Array``) as input ``i``; return it."""
        self._copies[i] = (weakref.ref(x), copy)
        return copy


def refuse_deleted(api: str, x: jax.Array) -> None:
    """Raise for an input whose buffer is gone, which ``jax.pmap`` and ``jit(shard_map)`` crash on (jax 0.10.2)."""
    if x.is_deleted():
        raise RuntimeError(f"{api}: an input Array has been deleted (donated to an earlier call?).")


def _hashable_axes(axes: Any) -> Hashable:
    leaves, treedef = jax.tree.flatten(axes, is_leaf=lambda x: x is None)
    return tuple(leaves), treedef
