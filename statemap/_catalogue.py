"""The catalogue of states one lane trace reads, writes and creates."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import attrs
import jax
import numpy as np

from ._axes import StateAxes, axis_in_range, lane_aval
from ._random import RandomState, is_key
from ._identity import IdentityDict
from ._jax_internals import LaneTrace
from ._state import State, Watcher, describe, label, read_through
from .errors import BatchAxisError, StatemapError

__all__ = ["Decide", "Entry", "LaneRecorder", "MappedEntries", "SizeSources", "StateIn", "pass_through"]


class Entry(enum.Enum):
    """How a state's value enters a lane."""

    SPLIT = "split"
    BROADCAST = "broadcast"
    LANE_KEY = "per-lane key"


@attrs.frozen
class StateIn:
    """How one input state enters: split, broadcast or per-lane key, with per-leaf axes."""

    entry: Entry
    axis: int | None
    leaf_axes: tuple[int | None, ...]
    treedef: Any
    is_leaf: bool = attrs.field(init=False)

    @is_leaf.default
    def _is_leaf(self) -> bool:
        return jax.tree_util.treedef_is_leaf(self.treedef) and self.treedef.num_leaves == 1


@attrs.define
class SizeSources:
    """Everything that fixes the axis size, for one call; conflicts list each source."""

    api: str
    size: int | None = None
    origin: str | None = None
    seen: list[str] = attrs.field(factory=list)

    def copy(self) -> SizeSources:
        """An independent copy, for one trace to add states to."""
        return attrs.evolve(self, seen=list(self.seen))

    def add(self, origin: str, axis: int, leaf: Any) -> None:
        """Record that ``origin`` maps ``leaf`` on ``axis``; raise if sizes disagree."""
        shape = tuple(np.shape(leaf))
        detail = f"{origin} has axis {axis} of size {shape[axis]} (shape {shape}, dtype {leaf.dtype})"
        self.add_size(f"{origin}, axis {axis}", shape[axis], detail)

    def add_size(self, origin: str, size: int, detail: str) -> None:
        """Record that ``origin`` gives ``size``; raise if sizes disagree."""
        self.seen.append(f"  * {detail}")
        if self.size is None:
            self.size, self.origin = size, origin
        elif size != self.size:
            bullets = "\n".join(self.seen)
            raise ValueError(
                f"{self.api} got inconsistent sizes for the mapped axis:\n{bullets}\n"
                f"Make every mapped argument and split state the same size along its mapped axis."
            )


Decide = Callable[[State, Any, SizeSources], tuple[Entry, "int | None"]]
"""How a state enters: given the state, its value outside and the size sources."""


def pass_through(state: State, value: Any, sizes: SizeSources) -> tuple[Entry, int | None]:
    """Every state enters as it is: the rule of transforms without a mapped axis."""
    return Entry.BROADCAST, None


class LaneRecorder(Watcher):
    """Watches the lane trace: each state first touched becomes a lane input.

    The function sees lane values (tracers) through ``read``/``write``; the
    states themselves keep their values, so a failed trace changes nothing.
    """

    def __init__(self, api: str, decide: Decide, sizes: SizeSources, parent: Watcher | None):
        self.api = api
        self.decide = decide
        self.sizes = sizes
        self.parent = parent
        self.lane: LaneTrace | None = None
        self.inputs: IdentityDict[State, StateIn] = IdentityDict()
        self.before: IdentityDict[State, Any] = IdentityDict()
        self.lane_values: IdentityDict[State, Any] = IdentityDict()
        self.written: IdentityDict[State, None] = IdentityDict()
        self.made: IdentityDict[State, None] = IdentityDict()
        # States read inside a nested JAX trace since they were last written.
        self.read_nested: IdentityDict[State, None] = IdentityDict()

    def read(self, state: State) -> Any:
        if state in self.made:
            return state._value
        if state not in self.inputs:
            self._enter(state)
        assert self.lane is not None
        if not self.lane.is_current():
            self.read_nested[state] = None
        return self.lane_values[state]

    def write(self, state: State, value: Any) -> None:
        assert self.lane is not None
        if not self.lane.is_current():
            raise StatemapError(
                f"{self.api}: {describe(state)} is written (or drawn from) inside a JAX "
                f"transform that statemap does not manage (jax.jit, jax.lax.scan, fori_loop, "
                f"while_loop, cond, switch, jax.checkpoint, jax.vmap, ...), whose values cannot "
                f"leave it. Use statemap's own transform instead (statemap.jit, statemap.scan, "
                f"statemap.for_loop, statemap.fori_loop, statemap.while_loop, statemap.cond, "
                f"statemap.switch, statemap.vmap), or return the value and write the state outside."
            )
        if state in self.made:
            state._value = value
            return
        if state not in self.inputs:
            self._enter(state)
        if state in self.read_nested:
            # A nested trace JAX may reuse read the old value: make it trace again.
            del self.read_nested[state]
            self.lane.forget_nested_traces()
        self.lane_values[state] = value
        self.written[state] = None

    def created(self, state: State) -> None:
        if self.parent is not None:
            self.parent.created(state)
        self.made[state] = None

    def _enter(self, state: State) -> None:
        value = read_through(self.parent, state)
        self.before[state] = value
        entry, axis = self.decide(state, value, self.sizes)
        leaves, treedef = jax.tree.flatten(value)
        leaf_axes = tuple(self._split_axis(state, axis, leaf) for leaf in leaves)
        assert self.lane is not None
        tracers = [self.lane.new_input(lane_aval(x, a)) for x, a in zip(leaves, leaf_axes)]
        self.inputs[state] = StateIn(entry, axis, leaf_axes, treedef)
        self.lane_values[state] = jax.tree.unflatten(treedef, tracers)

    def _split_axis(self, state: State, axis: int | None, leaf: Any) -> int | None:
        if axis is None:
            return None
        ndim = np.ndim(leaf)
        fixed = axis_in_range(axis, ndim)
        if fixed is None:
            raise BatchAxisError(
                f"{self.api}: `state_in_axes` splits {describe(state)} on axis {axis}, "
                f"which is out of range for a value of rank {ndim}. Use an axis in "
                f"[{-ndim}, {ndim}), or leave the state out of `state_in_axes` to broadcast it."
            )
        self.sizes.add(label(state), fixed, leaf)
        return fixed


@attrs.frozen
class MappedEntries:
    """How a mapping's states enter: split by ``state_in_axes`` or ``in_axes``, keys per lane."""

    api: str
    state_in_axes: StateAxes
    arg_axes: IdentityDict[State, tuple[str, int | None]]

    def __call__(self, state: State, value: Any, sizes: SizeSources) -> tuple[Entry, int | None]:
        selected, axis = self.state_in_axes.match(state)
        argument = None
        if state in self.arg_axes:
            argument, arg_axis = self.arg_axes[state]
            if selected and axis != arg_axis:
                raise BatchAxisError(
                    f"{self.api}: {describe(state)} is reached twice with different axes: "
                    f"`in_axes` maps argument {argument} on axis {arg_axis}, and `state_in_axes` "
                    f"on axis {axis}. Give it one axis: change `in_axes`, or leave the state "
                    f"out of `state_in_axes`."
                )
            selected, axis = True, arg_axis
        # A key given as an argument with `in_axes` None is read like a closed-over one.
        if isinstance(state, RandomState) and (not selected or (argument is not None and axis is None)):
            if not is_key(value):
                raise TypeError(
                    f"{self.api}: {describe(state)} does not hold a PRNG key, so it cannot "
                    f"give each lane its own key. Reseed it with `state.seed(0)`."
                )
            return Entry.LANE_KEY, None
        if selected and axis is not None:
            if isinstance(state, RandomState) and is_key(value):
                raise BatchAxisError(self._split_key_message(state, axis, argument))
            return Entry.SPLIT, axis
        return Entry.BROADCAST, None

    def _split_key_message(self, state: State, axis: int, argument: str | None) -> str:
        if argument is None:
            where, fix = f"`state_in_axes` splits {describe(state)} on axis {axis}", "Leave it out of `state_in_axes`"
        else:
            where = f"`in_axes` maps argument {argument}, {describe(state)}, on axis {axis}"
            fix = "Pass `None` for it in `in_axes`"
        return (
            f"{self.api}: {where}, but it holds a single key. {fix} to give each lane its own "
            f"key, or store one key per lane (`state.value = jax.random.split(key, n)`)."
        )
